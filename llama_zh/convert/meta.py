"""Meta's original LLaMA release: `consolidated.NN.pth` shards + `params.json` (docs/reference.md#formats).

Model-parallel shards split each matrix along one dimension; each tensor is rebuilt by
concatenating its slices from every (memory-mapped) shard, one tensor at a time.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch

from llama_zh.checkpoint import WeightStream, check_specs
from llama_zh.config import ConfigError, ModelConfig
from llama_zh.convert.format import Format
from llama_zh.convert.keys import KeyMap, interleaved_to_halves, rope_permuter
from llama_zh.tensor_io import CheckpointError, torch_load_weights
from llama_zh.tokenizer import find_tokenizer, is_rank_file

log = logging.getLogger(__name__)

KEYS = KeyMap(
    {
        "embed.weight": "tok_embeddings.weight",
        "layers.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
        "layers.{i}.attn.wq.weight": "layers.{i}.attention.wq.weight",
        "layers.{i}.attn.wk.weight": "layers.{i}.attention.wk.weight",
        "layers.{i}.attn.wv.weight": "layers.{i}.attention.wv.weight",
        "layers.{i}.attn.wo.weight": "layers.{i}.attention.wo.weight",
        "layers.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
        "layers.{i}.ffn.w_gate.weight": "layers.{i}.feed_forward.w1.weight",
        "layers.{i}.ffn.w_up.weight": "layers.{i}.feed_forward.w3.weight",
        "layers.{i}.ffn.w_down.weight": "layers.{i}.feed_forward.w2.weight",
        "norm.weight": "norm.weight",
        "head.weight": "output.weight",
    },
    ignore=(r"^rope\.freqs$",),
)

# Dimension along which model-parallel shards split each tensor; None: replicated (norms).
SHARD_DIM = {
    "embed.weight": 1,
    "attn.wq.weight": 0,
    "attn.wk.weight": 0,
    "attn.wv.weight": 0,
    "attn.wo.weight": 1,
    "ffn.w_gate.weight": 0,
    "ffn.w_up.weight": 0,
    "ffn.w_down.weight": 1,
    "attn_norm.weight": None,
    "ffn_norm.weight": None,
    "norm.weight": None,
    "head.weight": 0,
}


# Every key of the params.json files of Meta's LLaMA-1/2/3.x releases. The shapes are read from the weights
# (ffn_dim_multiplier and multiple_of only fixed the hidden size they have); unknown keys are refused
# so that a new field that changes the model (as use_scaled_rope did) is never silently dropped.
PARAMS_KEYS = (
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "multiple_of",
    "ffn_dim_multiplier",
    "norm_eps",
    "rope_theta",
    "use_scaled_rope",
    "rope_scaling_factor",
    "max_seq_len",
)
# Llama-3.1's scaling (use_scaled_rope): low/high frequency factors 1 and 4 over 8,192 original positions;
# the factor is 8, except for the tied Llama-3.2 1B/3B, whose factor 32 params.json does not record.
LLAMA3_ROPE = {
    "type": "llama3",
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
LLAMA3_CONTEXT = 131072  # positions a use_scaled_rope model serves
LLAMA3_THETA = 500000.0  # rope_theta of the Llama-3 family, whose unscaled models serve 8,192 positions


def _shard_dim(name: str) -> int | None:
    return SHARD_DIM[name.split(".", 2)[-1] if name.startswith("layers.") else name]


def _context(params: dict, tied: bool, max_seq_len: int | None) -> dict:
    """max_seq_len and rope_scaling of a params.json, which records neither the context nor (before
    use_scaled_rope) any scaling: LLaMA-1/2 serve `max_seq_len` (2,048 unless given), Llama-3 8,192,
    and with use_scaled_rope the llama3 scaling of LLAMA3_ROPE up to 131,072."""
    if params.get("use_scaled_rope"):
        factor = params.get("rope_scaling_factor") or (32.0 if tied else 8.0)
        return {
            "max_seq_len": max_seq_len or params.get("max_seq_len") or LLAMA3_CONTEXT,
            "rope_scaling": {**LLAMA3_ROPE, "factor": float(factor)},
        }
    llama3 = float(params.get("rope_theta", 10000.0)) == LLAMA3_THETA
    return {"max_seq_len": max_seq_len or params.get("max_seq_len") or (8192 if llama3 else 2048)}


def _readable_tokenizer(path: Path | None) -> tuple[Path | None, tempfile.TemporaryDirectory | None]:
    """Llama-3's tokenizer.model is a tiktoken rank file: it becomes a tokenizer.json (Llama-3's special
    tokens and chat template) in a temporary directory, returned with it so that it outlives the stream."""
    if path is None or not path.is_file() or not is_rank_file(path):
        return path, None
    from llama_zh.convert.tiktoken import convert_rank_file
    from llama_zh.data.chat_template import ChatTemplate

    keep = tempfile.TemporaryDirectory(prefix="llama_zh-tiktoken-")
    converted = convert_rank_file(path, Path(keep.name), chat_template=ChatTemplate.named("llama-3").source)
    log.info("%s: a tiktoken rank file, converted to a tokenizer.json with Llama-3's special tokens", path)
    return converted, keep


def read(path: Path, tokenizer: Path | None = None, max_seq_len: int | None = None) -> WeightStream:
    path = Path(path)
    params_file = path / "params.json"
    if not params_file.is_file():
        raise CheckpointError(f"{path}: no params.json (not a Meta LLaMA directory)")
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"{path}: no consolidated.*.pth files")
    try:
        params = json.loads(params_file.read_text())
        n_heads = params["n_heads"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{params_file}: not a LLaMA params.json ({e})") from e
    unknown = sorted(set(params) - set(PARAMS_KEYS))
    if unknown:
        raise ConfigError(
            f"{params_file}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"(known: {', '.join(PARAMS_KEYS)})"
        )
    rename = KEYS.renamer(str(shards[0]))
    states = [torch_load_weights(f) for f in shards]  # memory-mapped: nothing read yet
    keys = {key: rename(key) for key in states[0]}
    tied = "head.weight" not in keys.values()  # Llama-3.2 1B/3B: the output layer is the embedding
    specs = {}
    for key, name in keys.items():
        if name is None:
            continue
        dim = _shard_dim(name)
        shape = list(states[0][key].shape)
        if dim is not None:
            shape[dim] = sum(s[key].shape[dim] for s in states)
        specs[name] = (states[0][key].dtype, tuple(shape))
    try:
        config = ModelConfig(
            name=path.name,
            vocab_size=specs["embed.weight"][1][0],
            dim=params["dim"],
            n_layers=params["n_layers"],
            n_heads=n_heads,
            n_kv_heads=params.get("n_kv_heads") or n_heads,
            ffn_dim=specs["layers.0.ffn.w_gate.weight"][1][0],  # from the weights: no multiple_of arithmetic
            norm_eps=float(params.get("norm_eps", 1e-6)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            **_context(params, tied, max_seq_len),
            tie_word_embeddings=tied,
        )
    except KeyError as e:
        raise CheckpointError(f"{path}: missing {e.args[0]} in params.json or the weights") from e
    del states
    permute = rope_permuter(config.n_heads, config.n_kv_heads, interleaved_to_halves)

    def tensors():
        states = [torch_load_weights(f) for f in shards]
        for key, name in keys.items():
            if name is None:
                continue
            dim = _shard_dim(name)
            t = states[0][key].clone() if dim is None else torch.cat([s[key] for s in states], dim=dim)
            yield name, permute(name, t)

    if tokenizer is None:
        tokenizer = find_tokenizer(path) or find_tokenizer(path.parent)
    tokenizer, keep = _readable_tokenizer(Path(tokenizer) if tokenizer else None)
    stream = WeightStream(config, specs, tensors, tokenizer, source=str(path), keep=keep)
    check_specs(stream)
    return stream


def is_meta(path: Path) -> bool:
    return (Path(path) / "params.json").is_file()


def _read(path: Path, model: ModelConfig | None, tokenizer: Path | None) -> WeightStream:
    return read(path, tokenizer)  # params.json and the weights give the shape: `model` is not read


FORMAT = Format(
    "meta",
    "a directory with params.json + consolidated.*.pth (Meta)",
    is_meta,
    _read,
)
