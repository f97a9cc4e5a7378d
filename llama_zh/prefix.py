"""P-Tuning v2 (`finetune=prefix`): learned keys and values that every layer's attention sees first.

The prefix is `prefix_len` key/value slots per layer, written into the first slots of the model's own
KV cache (`llama_zh.model.KVCache`); the real tokens follow in the cache, so nothing in the model
changes and every weight of the base stays as it was, bit for bit. The keys are stored as the cache
stores keys, i.e. already rotated: the prefix has no position and needs no rope.

Positions (docs/reference.md#recipe). The real tokens count their rotary positions from
`prefix_len`, as the cache gives them (its first free slot), in training, eval, infer and serve
alike; prefix.json records it (`positions_from`). Under RoPE the real tokens' scores among themselves
depend only on their distance, so the offset only changes how queries meet the (position-less)
prefix keys, and those are learned with the offset that decoding uses.

Training: `PrefixEncoder` holds the trainable parameters, either the keys and values themselves or
(`prefix_hidden > 0`, the paper's reparameterisation) an embedding of prefix_len x dim through a
two-layer MLP (tanh) to every layer's keys and values. `attach_prefix` puts it on the model as
`model.prefix` and registers a forward pre-hook: every forward without a cache (the training loss,
validation, DPO, eval's perplexity) runs with a fresh cache that holds the prefix. Saving folds the MLP
away: <checkpoint>/prefix.safetensors holds only `layers.{i}.k` / `layers.{i}.v`, each
(n_kv_heads, prefix_len, head_dim), and prefix.json the prefix_len, the shape and the fingerprint of
the base weights it was trained on.

Inference: `load_prefix` attaches the saved tensors (`FrozenPrefix`), and whoever allocates a cache
for decoding calls `allocate_cache`, which returns a cache already holding the prefix (a serving
engine's slots: `fill_prefix`, and its sequences start at position `prefix_len`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llama_zh.atomic import write_with
from llama_zh.config import ModelConfig
from llama_zh.dtypes import dtype_name
from llama_zh.errors import LlamaZhError
from llama_zh.model import KVCache, Transformer

log = logging.getLogger(__name__)

PREFIX_FILE, PREFIX_CONFIG = "prefix.safetensors", "prefix.json"
FINGERPRINT_VALUES = 1024  # values taken from each end of every tensor for the fingerprint


# ------------------------------------------------------------------------------------------- modules


class PrefixEncoder(nn.Module):
    """The trainable prefix. Without `hidden`: the keys and values are the parameters (N(0, 0.02), the
    scale of a projection's weights). With `hidden`: an embedding (prefix_len, dim) through Linear(dim,
    hidden), tanh, Linear(hidden, 2 x layers x kv width), as P-Tuning v2 reparameterises for stabler
    training; it is folded into plain keys and values when saved."""

    def __init__(
        self,
        config: ModelConfig,
        prefix_len: int,
        hidden: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.prefix_len, self.hidden = prefix_len, hidden
        self.shape = (config.n_layers, config.n_kv_heads, config.head_dim)
        width = 2 * config.n_layers * config.n_kv_heads * config.head_dim
        factory = {"dtype": dtype, "device": device}
        if hidden:
            self.embedding = nn.Embedding(prefix_len, config.dim, **factory)
            self.mlp = nn.Sequential(
                nn.Linear(config.dim, hidden, **factory), nn.Tanh(), nn.Linear(hidden, width, **factory)
            )
        else:
            self.kv = nn.Parameter(torch.empty(prefix_len, width, **factory))
            nn.init.normal_(self.kv, std=0.02)
        self.enabled = True

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values), each (layers, kv heads, prefix_len, head_dim)."""
        flat = self.mlp(self.embedding.weight) if self.hidden else self.kv  # (P, 2 L K D)
        L, K, D = self.shape
        kv = flat.view(self.prefix_len, 2, L, K, D).permute(1, 2, 3, 0, 4)
        return kv[0], kv[1]


class FrozenPrefix(nn.Module):
    """A saved prefix at inference: the folded keys and values as buffers (moved and cast with the model)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.prefix_len = keys.shape[2]
        self.register_buffer("keys", keys)
        self.register_buffer("values", values)
        self.enabled = True

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values


def prefix_of(model: nn.Module) -> PrefixEncoder | FrozenPrefix | None:
    """The prefix attached to `model` and switched on, if any."""
    prefix = getattr(model, "prefix", None)
    return prefix if prefix is not None and prefix.enabled else None


# ------------------------------------------------------------------------------------------ the cache


@dataclass
class PrefixKVCache(KVCache):
    """A KVCache whose first `prefix_len` slots hold a prefix. Left-padded rows lay out as
    [prefix][padding][prompt]: `left_pad` counts the padding after the prefix, so the model's
    positions (slot - left_pad) start at prefix_len for every row, and `visible` shows every query
    the prefix, never the padding."""

    prefix_len: int = 0

    def visible(self, T: int) -> torch.Tensor:
        key = torch.arange(self.pos + T, device=self.k.device)  # (S,)
        query = key[self.pos :, None]  # (T, 1)
        real = (key[None, :] >= self.prefix_len + self.left_pad[:, None]) | (key[None, :] < self.prefix_len)  # (B, S)
        return ((key <= query) & real[:, None] | (key == query))[:, None]


def allocate_cache(
    model: Transformer,
    batch: int,
    max_len: int,
    device=None,
    dtype=torch.float32,
    left_pad: torch.Tensor | list[int] | None = None,
) -> KVCache:
    """What decoding allocates: `KVCache.allocate(...)` for a model without a prefix; with one, a cache
    of prefix_len more slots whose first ones hold it, positioned after it (so that `max_len` tokens
    still fit). The one call a generation loop needs to decode with a prefix."""
    prefix = prefix_of(model)
    if prefix is None:
        return KVCache.allocate(model.config, batch, max_len, device=device, dtype=dtype, left_pad=left_pad)
    keys, values = prefix()
    return prefilled_cache(model.config, keys, values, batch, max_len, device, dtype, left_pad)


def prefix_len(model: nn.Module) -> int:
    """Cache slots a decoding cache of `model` must keep before its tokens: the prefix's, or 0."""
    prefix = prefix_of(model)
    return prefix.prefix_len if prefix is not None else 0


@torch.no_grad()
def fill_prefix(model: nn.Module, k: torch.Tensor, v: torch.Tensor) -> int:
    """Write `model`'s prefix into the first slots of every row of cache buffers k, v (L, rows, K, S, D)
    (a serving engine's slots, allocated prefix_len longer); returns prefix_len (0: no prefix, nothing
    written)."""
    prefix = prefix_of(model)
    if prefix is None:
        return 0
    keys, values = prefix()
    P = keys.shape[2]
    k[:, :, :, :P] = keys.to(device=k.device, dtype=k.dtype)[:, None]
    v[:, :, :, :P] = values.to(device=v.device, dtype=v.dtype)[:, None]
    return P


@torch.no_grad()
def prefilled_cache(
    config: ModelConfig,
    keys: torch.Tensor,
    values: torch.Tensor,
    batch: int,
    max_len: int,
    device=None,
    dtype=torch.float32,
    left_pad=None,
) -> PrefixKVCache:
    """A decoding cache of prefix_len + `max_len` slots, keys/values (L, K, P, D) in its first P, pos at P."""
    P = keys.shape[2]
    shape = (config.n_layers, batch, config.n_kv_heads, P + max_len, config.head_dim)
    k, v = torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
    k[:, :, :, :P] = keys.to(device=device, dtype=dtype)[:, None]
    v[:, :, :, :P] = values.to(device=device, dtype=dtype)[:, None]
    if left_pad is not None:
        left_pad = torch.as_tensor(left_pad, dtype=torch.long, device=device)
    return PrefixKVCache(k, v, pos=P, left_pad=left_pad, prefix_len=P)


def training_cache(
    keys: torch.Tensor, values: torch.Tensor, batch: int, length: int, dtype: torch.dtype | None = None
) -> PrefixKVCache:
    """A cache for one forward of `length` tokens with autograd: the prefix (L, K, P, D) in its first
    slots, pos at P. Each layer's buffer is a tensor of its own (the prefix concatenated with room for
    the tokens): the layers write their keys into the cache in place, and writes into one shared
    buffer would change the views earlier layers saved for backward. Gradients reach the prefix through
    the concatenation. `cache.k` / `cache.v` only carry the shape (a zero-stride placeholder)."""
    L, K, P, D = keys.shape
    dtype = dtype or keys.dtype
    room = torch.zeros(batch, K, length, D, device=keys.device, dtype=dtype)
    layer_k = [torch.cat((keys[i].to(dtype).expand(batch, K, P, D), room), dim=2) for i in range(L)]
    layer_v = [torch.cat((values[i].to(dtype).expand(batch, K, P, D), room), dim=2) for i in range(L)]
    placeholder = torch.zeros((), device=keys.device, dtype=dtype).expand(L, batch, K, P + length, D)
    cache = PrefixKVCache(placeholder, placeholder, pos=P, prefix_len=P)
    cache.layer_k, cache.layer_v = layer_k, layer_v
    return cache


def _activation_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The dtype the projections compute in: autocast's where it is on, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return default


FORWARD_ARGS = ("input_ids", "cache", "last_only", "return_hidden")


def _with_prefix(model: Transformer, args: tuple, kwargs: dict):
    """Forward pre-hook: a forward without a cache gets a fresh one holding the prefix. A forward with a
    cache is left alone: the cache's maker (`allocate_cache`) already put the prefix in."""
    prefix = prefix_of(model)
    if prefix is None:
        return None
    kwargs = {**dict(zip(FORWARD_ARGS, args, strict=False)), **kwargs}
    if kwargs.get("cache") is not None:
        return None
    if kwargs.get("positions") is not None or kwargs.get("segment_ids") is not None:
        raise LlamaZhError(
            "finetune=prefix runs the tokens after the prefix in the KV cache, which packed sequences "
            "(stage.pack=true: positions and segment ids) cannot use; set stage.pack=false"
        )
    input_ids = kwargs["input_ids"]
    keys, values = prefix()
    dtype = _activation_dtype(input_ids.device, model.norm.weight.dtype)
    kwargs["cache"] = training_cache(keys, values, input_ids.shape[0], input_ids.shape[1], dtype)
    return (), kwargs


def attach_prefix(model: Transformer, prefix: PrefixEncoder | FrozenPrefix) -> Transformer:
    """Put `prefix` on `model` (as `model.prefix`) and make every uncached forward use it. Its
    parameters are named `prefix.*`, outside the native names that checkpoints hold."""
    check_prefix_shape(model.config, prefix_len=prefix.prefix_len, shape=tuple(prefix()[0].shape), where="prefix")
    model.prefix = prefix
    if getattr(model, "_prefix_hook", None) is None:
        model._prefix_hook = model.register_forward_pre_hook(_with_prefix, with_kwargs=True)
    return model


@contextmanager
def prefix_disabled(model: nn.Module) -> Iterator[None]:
    """The model without its prefix inside the block: the base model, bit for bit (no cache at all)."""
    prefix = getattr(model, "prefix", None)
    before = prefix.enabled if prefix is not None else None
    if prefix is not None:
        prefix.enabled = False
    try:
        yield
    finally:
        if prefix is not None:
            prefix.enabled = before


def check_prefix_shape(config: ModelConfig, prefix_len: int, shape: tuple[int, ...], where: str) -> None:
    expected = (config.n_layers, config.n_kv_heads, prefix_len, config.head_dim)
    if shape != expected:
        raise LlamaZhError(
            f"{where}: keys of shape {shape}, the model expects {expected} (layers, kv heads, prefix_len, head_dim)"
        )


# ------------------------------------------------------------------------------------- fingerprint


class Fingerprint:
    """An identity of a model's weights, cheap enough to compute on every save and load: sha256 over
    each native tensor's name, dtype, shape and its first and last FINGERPRINT_VALUES values. It tells
    one base checkpoint from another (training changes every tensor), not a corrupted file."""

    def __init__(self):
        self._hash = hashlib.sha256()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        flat = tensor.detach().reshape(-1)
        n = FINGERPRINT_VALUES
        sample = flat if flat.numel() <= 2 * n else torch.cat((flat[:n], flat[-n:]))
        self._hash.update(f"{name}|{str(tensor.dtype)}|{tuple(tensor.shape)}|".encode())
        self._hash.update(sample.cpu().contiguous().view(torch.uint8).numpy().tobytes())

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def fingerprinted(stream):
    """(a WeightStream passing the same tensors, the Fingerprint they build as they pass): a save
    fingerprints the base weights while writing them, without a second read."""
    from llama_zh.checkpoint import WeightStream

    fingerprint = Fingerprint()

    def tensors():
        for name, t in stream.tensors():
            fingerprint.add(name, t)
            yield name, t
            del t

    return (
        WeightStream(stream.config, dict(stream.specs), tensors, stream.tokenizer, source=stream.source),
        fingerprint,
    )


def model_fingerprint(model: Transformer) -> str | None:
    """The fingerprint of a loaded model's native weights; None where they are not plain tensors under
    their native names (a quantized model: nothing to compare)."""
    from llama_zh.checkpoint import expected_specs

    state = model.state_dict()
    fingerprint = Fingerprint()
    for name, shape in expected_specs(model.config).items():
        t = state.get(name)
        if t is None or not t.is_floating_point() or tuple(t.shape) != shape:
            return None
        fingerprint.add(name, t)
    return fingerprint.hexdigest()


# ---------------------------------------------------------------------------------------- save, load


def fold(prefix: PrefixEncoder | FrozenPrefix) -> dict[str, torch.Tensor]:
    """The prefix as saved: `layers.{i}.k` / `layers.{i}.v`, each (K, P, D); an MLP is evaluated once
    and gone."""
    with torch.no_grad():
        keys, values = prefix()
        tensors = {}
        for i in range(keys.shape[0]):
            tensors[f"layers.{i}.k"] = keys[i].detach().clone().contiguous()
            tensors[f"layers.{i}.v"] = values[i].detach().clone().contiguous()
    return tensors


def save_prefix(
    directory: Path, prefix: PrefixEncoder | FrozenPrefix, config: ModelConfig, base_fingerprint: str | None
) -> Path:
    """prefix.safetensors + prefix.json in `directory` (beside a checkpoint), each written under a
    temporary name and renamed into place."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = fold(prefix)
    write_with(directory / PREFIX_FILE, lambda tmp: save_file(tensors, str(tmp)))
    meta = {
        "prefix_len": prefix.prefix_len,
        "n_layers": config.n_layers,
        "n_kv_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "dtype": dtype_name(tensors["layers.0.k"].dtype),
        "trained_with_mlp": bool(getattr(prefix, "hidden", 0)),
        "positions_from": "prefix_len",
        "base_model": config.to_dict(),
        "base_fingerprint": base_fingerprint,
    }
    write_with(directory / PREFIX_CONFIG, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    return directory / PREFIX_FILE


def _prefix_files(path: Path) -> tuple[Path, Path]:
    path = Path(path)
    if path.is_dir():
        return path / PREFIX_FILE, path / PREFIX_CONFIG
    return path, path.parent / PREFIX_CONFIG


def read_prefix(path: Path, config: ModelConfig) -> tuple[FrozenPrefix, dict]:
    """(the prefix, its prefix.json) saved at `path` (a checkpoint directory or the .safetensors file),
    every tensor checked for presence and shape against `config`: a bad one is named."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file, meta_file = _prefix_files(path)
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise LlamaZhError(f"{meta_file}: cannot read the prefix config ({e})") from None
    P = meta.get("prefix_len") if isinstance(meta, dict) else None
    if isinstance(P, bool) or not isinstance(P, int) or P <= 0:
        raise LlamaZhError(f"{meta_file}: prefix_len must be an integer > 0, got {P!r}")
    try:
        state = load_file(str(file))
    except (OSError, SafetensorError) as e:
        raise LlamaZhError(f"{file}: cannot read the prefix ({e})") from None
    expected = (config.n_kv_heads, P, config.head_dim)
    for i in range(config.n_layers):
        for kind in ("k", "v"):
            name = f"layers.{i}.{kind}"
            if name not in state:
                raise LlamaZhError(f"{file}: missing tensor {name} (the model has {config.n_layers} layers)")
            if tuple(state[name].shape) != expected:
                raise LlamaZhError(
                    f"{file}: {name} has shape {tuple(state[name].shape)}, the model expects {expected} "
                    "(kv heads, prefix_len, head_dim): a prefix of another model?"
                )
    unexpected = sorted(set(state) - {f"layers.{i}.{k}" for i in range(config.n_layers) for k in ("k", "v")})
    if unexpected:
        raise LlamaZhError(f"{file}: unexpected tensor {unexpected[0]} (the model has {config.n_layers} layers)")
    keys = torch.stack([state[f"layers.{i}.k"] for i in range(config.n_layers)])
    values = torch.stack([state[f"layers.{i}.v"] for i in range(config.n_layers)])
    return FrozenPrefix(keys, values), meta


def find_prefix(checkpoint: Path | str | None, option) -> Path | None:
    """The prefix a decoding stage uses: `stage.prefix` (a path; "none" turns the automatic one off), or
    <checkpoint>/prefix.safetensors where it exists."""
    if option is not None and str(option).lower() in ("none", "false", "off"):
        return None
    if option is not None and str(option) != "":
        path = Path(str(option))
        if not _prefix_files(path)[0].is_file():
            raise LlamaZhError(f"stage.prefix={option}: no {PREFIX_FILE} there")
        return path
    if checkpoint is not None and (Path(checkpoint) / PREFIX_FILE).is_file():
        return Path(checkpoint)
    return None


def load_prefix(model: Transformer, checkpoint: Path | str | None, option=None) -> FrozenPrefix | None:
    """Attach the prefix `find_prefix` picks to a loaded model (on its device, in its norm's dtype), logged;
    None where there is none. A prefix trained on other base weights is used, with a warning."""
    path = find_prefix(checkpoint, option)
    if path is None:
        return None
    prefix, meta = read_prefix(path, model.config)
    recorded = meta.get("base_fingerprint")
    if recorded:
        ours = model_fingerprint(model)
        if ours is not None and ours != recorded:
            log.warning(
                "prefix %s was trained on other base weights (fingerprint %s..., this checkpoint's %s...): "
                "its output may be meaningless",
                path,
                recorded[:12],
                ours[:12],
            )
    weight = model.norm.weight
    attach_prefix(model, prefix.to(device=weight.device, dtype=weight.dtype))
    log.info(
        "prefix: %s (%d key/value slots per layer, before every prompt)", _prefix_files(path)[0], prefix.prefix_len
    )
    return prefix


def prefix_saved_bytes(config: ModelConfig, prefix_len: int, hidden: int, bytes_per_value: int = 4) -> tuple[int, int]:
    """(per row, per step) bytes the prefix adds to what autograd keeps for backward: each layer's
    cache buffers hold the prefix's keys and values for every row (saved by attention); the MLP's
    hidden and output activations once a step."""
    kv = 2 * config.n_layers * config.n_kv_heads * config.head_dim * prefix_len * bytes_per_value
    mlp = prefix_len * (config.dim + 2 * hidden) * bytes_per_value + kv if hidden else 0
    return kv, mlp
