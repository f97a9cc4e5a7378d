"""`finetune=`: which weights train. full; lora (low-rank adapters on the native model); freeze;
prefix (P-Tuning v2: learned per-layer keys and values, llama_zh.prefix).

LoRA is written here on the native `Transformer` rather than taken from peft: peft wraps
Hugging Face modules by their names and class types, and our model is not a Hugging Face one, so
peft would need a converted model, another naming scheme in our checkpoints, and its own save
format. The adapter is ~40 lines; tests check it against peft on the same weights.

Whatever the method, the model keeps its native parameter names for the base weights and writes
native checkpoints: `native_tensors` merges adapters into the weights as it streams them out.

QLoRA (`base_quant: nf4 | int8`): the frozen block projections are quantized by bitsandbytes as the
checkpoint streams in (llama_zh.quant.quantize_stream, the inference loader's machinery) and the
adapters train in full precision on top. The quantized weights are only an approximation of the
base, so saving merges the adapters into the original weights read again from the source
checkpoint (`source_merged_stream`), never into dequantized ones; `logit_gap` measures how far the
trained model (quantized base + adapters) is from that merged checkpoint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llama_zh.atomic import write_with
from llama_zh.checkpoint import WeightStream, expected_specs
from llama_zh.config import ConfigError
from llama_zh.errors import LlamaZhError
from llama_zh.model import Transformer
from llama_zh.train.strategies import gathered, is_partitioned

# Hugging Face module names (as in Chinese-LLaMA-Alpaca's recipes) -> llama_zh's.
HF_ALIASES = {
    "q_proj": "wq",
    "k_proj": "wk",
    "v_proj": "wv",
    "o_proj": "wo",
    "gate_proj": "w_gate",
    "up_proj": "w_up",
    "down_proj": "w_down",
    "embed_tokens": "embed",
    "lm_head": "head",
    "norm": "norm",
}
PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
TOP_MODULES = ("embed", "head", "norm")
METHODS = ("full", "lora", "freeze", "prefix")
BASE_QUANTS = ("nf4", "int8")


@dataclass
class FinetuneConfig:
    """One object for every method; each field's default is the value of the conf/finetune/ file of the
    method that reads it (lora.yaml, freeze.yaml, prefix.yaml), so code and YAML build the same run."""

    method: str = "full"
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(PROJECTIONS))
    modules_to_save: list[str] = field(default_factory=lambda: ["embed", "head"])
    train_modules: list[str] = field(default_factory=lambda: ["embed", "head"])
    train_last_n_blocks: int = 0
    base_quant: str | None = None  # lora: nf4 | int8 quantizes the frozen block projections (QLoRA); null: none
    logit_gap: bool = (
        True  # base_quant: after the final save, compare the trained model's logits with the merged checkpoint's
    )
    prefix_len: int = 16  # prefix: key/value slots per layer
    prefix_hidden: int = 0  # prefix: > 0 reparameterises through an MLP of this hidden width (folded away on save)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LlamaZhError(f"finetune.method={self.method!r}; expected one of {', '.join(METHODS)}")
        if self.base_quant in ("none", "null", ""):
            self.base_quant = None
        if self.base_quant is not None and self.base_quant not in BASE_QUANTS:
            raise LlamaZhError(
                f"finetune.base_quant={self.base_quant!r}; expected one of {', '.join(BASE_QUANTS)} or null"
            )
        if self.base_quant is not None and self.method != "lora":
            raise LlamaZhError(
                f"finetune.base_quant={self.base_quant} quantizes the frozen base under LoRA adapters, but "
                f"finetune.method={self.method} trains the base weights themselves; use finetune=lora "
                "or finetune.base_quant=null"
            )
        if self.method == "lora" and (self.rank <= 0 or self.alpha <= 0 or not 0 <= self.dropout < 1):
            raise LlamaZhError("finetune: lora needs rank > 0, alpha > 0 and 0 <= dropout < 1")
        if isinstance(self.prefix_len, bool) or not isinstance(self.prefix_len, int) or self.prefix_len <= 0:
            raise ConfigError(f"finetune.prefix_len must be an integer > 0, got {self.prefix_len!r}")
        if isinstance(self.prefix_hidden, bool) or not isinstance(self.prefix_hidden, int) or self.prefix_hidden < 0:
            raise ConfigError(f"finetune.prefix_hidden must be an integer >= 0 (0: no MLP), got {self.prefix_hidden!r}")
        if self.train_last_n_blocks < 0:
            raise LlamaZhError("finetune.train_last_n_blocks must be >= 0")
        self.target_modules = [
            canonical(n, "finetune.target_modules", PROJECTIONS + ("head",)) for n in self.target_modules
        ]
        self.modules_to_save = [canonical(n, "finetune.modules_to_save", TOP_MODULES) for n in self.modules_to_save]
        self.train_modules = [canonical(n, "finetune.train_modules", TOP_MODULES) for n in self.train_modules]


def canonical(name: str, field_name: str, allowed: tuple[str, ...]) -> str:
    name = HF_ALIASES.get(name, name)
    if name not in allowed:
        raise LlamaZhError(
            f"{field_name}: unknown module {name!r}; expected some of {', '.join(allowed)} "
            f"(or the Hugging Face names {', '.join(k for k, v in HF_ALIASES.items() if v in allowed)})"
        )
    return name


def linear_shape(linear: nn.Linear) -> tuple[int, int]:
    """(out, in) of a linear layer: also for a ZeRO-3 placeholder and a bitsandbytes layer, whose
    weights are flattened or packed."""
    shape = getattr(linear.weight, "ds_shape", None)
    return tuple(shape) if shape is not None else (linear.out_features, linear.in_features)


def is_quantized(linear: nn.Module) -> bool:
    """Whether a layer's weight is stored quantized (bitsandbytes int8 or packed nf4)."""
    return not linear.weight.is_floating_point()


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / rank) * B A dropout(x); A (rank, in) Kaiming-uniform, B (out, rank) zero,
    so training starts from the base model exactly. `base` may be a bitsandbytes layer (QLoRA): the
    adapters are then in `dtype` (default fp32), the base's output cast to the input's dtype by it."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, dtype: torch.dtype | None = None):
        super().__init__()
        self.base, self.rank, self.scale = base, rank, alpha / rank
        weight = base.weight
        out_features, in_features = linear_shape(base)
        dtype = dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=weight.device))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True  # off: exactly the base layer (see `adapters_disabled`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scale

    def delta(self) -> torch.Tensor:
        """scale * B A in fp32."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scale

    def merged_weight(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """`base` (default: the base layer's weight) + scale * B A, computed in fp32 and returned in
        that weight's dtype (needs full tensors). A quantized base layer has no full-precision weight to
        merge into: the source checkpoint's must be given."""
        if base is None:
            if is_quantized(self.base):
                raise LlamaZhError(
                    "LoRA on a quantized base: merge into the source checkpoint's weights "
                    "(finetune.source_merged_stream), not into the quantized ones"
                )
            base = self.base.weight
        return (base.float() + self.delta().to(base.device)).to(base.dtype)  # a source tensor is read on the CPU


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Every LoRALinear of `model` computes its base layer alone inside the block, and a prefix
    (finetune=prefix) is off: the model before tuning, bit for bit, without a second copy of it (DPO's
    reference policy under LoRA or prefix tuning). The previous states are restored on leaving, also
    on an exception."""
    from llama_zh.prefix import prefix_disabled

    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    before = [m.enabled for m in adapters]
    for m in adapters:
        m.enabled = False
    try:
        with prefix_disabled(model):  # a prefix (finetune=prefix) is an adapter too
            yield
    finally:
        for m, state in zip(adapters, before, strict=False):
            m.enabled = state


def lora_targets(model: Transformer, target_modules: list[str]) -> Iterator[tuple[str, nn.Module, str, nn.Linear]]:
    """(full name, parent, child name, linear) of each projection LoRA wraps: what `apply_finetune`
    wraps and what `load_adapter` expects shapes for, from one rule."""
    targets = set(target_modules)
    for i, block in enumerate(model.layers):
        for part, parent in (("attn", block.attn), ("ffn", block.ffn)):
            for child_name, child in list(parent.named_children()):
                if child_name in targets and isinstance(child, nn.Linear):
                    yield f"layers.{i}.{part}.{child_name}", parent, child_name, child
    if "head" in targets and isinstance(model.head, nn.Linear):
        yield "head", model, "head", model.head


def apply_finetune(model: Transformer, ft: FinetuneConfig) -> Transformer:
    """Freeze and wrap `model` in place for `ft`; returns it."""
    if ft.method == "full":
        return model
    model.requires_grad_(False)
    if ft.method == "freeze":
        for name in ft.train_modules:
            getattr(model, name).requires_grad_(True)
        if ft.train_last_n_blocks:
            if ft.train_last_n_blocks > len(model.layers):
                raise LlamaZhError(
                    f"finetune.train_last_n_blocks={ft.train_last_n_blocks} but the model has "
                    f"{len(model.layers)} blocks"
                )
            for block in model.layers[len(model.layers) - ft.train_last_n_blocks :]:
                block.requires_grad_(True)
            model.norm.requires_grad_(True)
    elif ft.method == "prefix":
        from llama_zh.prefix import PrefixEncoder, attach_prefix

        weight = model.embed.weight
        attach_prefix(
            model,
            PrefixEncoder(model.config, ft.prefix_len, ft.prefix_hidden, dtype=weight.dtype, device=weight.device),
        )
    else:  # lora
        if model.config.tie_word_embeddings and "head" in ft.target_modules:
            # the merged head would differ from the embedding it must equal in a tied checkpoint
            raise LlamaZhError(
                "finetune.target_modules: head is tied to the embedding in this model "
                "(model.tie_word_embeddings); drop head, or train it with modules_to_save=[embed]"
            )
        dtype = model.embed.weight.dtype  # adapters on a quantized base: the model's float dtype
        for _, parent, child_name, child in lora_targets(model, ft.target_modules):
            setattr(parent, child_name, LoRALinear(child, ft.rank, ft.alpha, ft.dropout, dtype=dtype))
        for name in ft.modules_to_save:
            module = getattr(model, name)
            (module.base if isinstance(module, LoRALinear) else module).requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise LlamaZhError(f"finetune={ft.method}: the settings leave no weight to train")
    return model


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (ZeRO-3 placeholders counted by their full size)."""

    def numel(p: torch.Tensor) -> int:
        return getattr(p, "ds_numel", p.numel())

    return sum(numel(p) for p in model.parameters() if p.requires_grad), sum(numel(p) for p in model.parameters())


def _native_tensor(model: Transformer, name: str) -> torch.Tensor:
    """The native tensor `name`, adapters merged, ZeRO-3 shards gathered; a copy only when it must be."""
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path)
    if isinstance(module, LoRALinear):
        with gathered([module.base.weight, module.lora_a, module.lora_b]):
            return module.merged_weight()
    param = getattr(module, leaf)
    if is_partitioned(param):
        with gathered([param]):
            return param.detach().clone()
    return param.detach()


def native_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under their native names, one at a time (every process must iterate
    under ZeRO-3: each tensor is gathered collectively)."""
    for name in expected_specs(model.config):
        tensor = _native_tensor(model, name)
        yield name, tensor
        del tensor


def export_stream(model: Transformer, tokenizer=None) -> WeightStream:
    """A WeightStream over the model's native weights (merged adapters), for `write_native`."""
    shapes = expected_specs(model.config)
    dtype = next(model.parameters()).dtype
    specs = {n: (dtype, s) for n, s in shapes.items()}
    return WeightStream(model.config, specs, lambda: native_tensors(model), tokenizer, source="training model")


def _saved_weight(model: Transformer, name: str) -> nn.Parameter:
    """The trained weight of a `modules_to_save` module (the base weight, unmerged, if LoRA also wraps it)."""
    module = getattr(model, name)
    return (module.base if isinstance(module, LoRALinear) else module).weight


def adapter_state(model: Transformer, ft: FinetuneConfig | None) -> dict[str, torch.Tensor]:
    """What turns the base model into the tuned one: the LoRA matrices by native module name
    (`layers.0.attn.wq.lora_a`) and the fully trained `modules_to_save` weights (`embed.weight`).
    Empty unless `ft` is LoRA. Collective under ZeRO-3: every process must call it."""
    if ft is None or ft.method != "lora":
        return {}
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            with gathered([module.lora_a, module.lora_b]):
                state[f"{name}.lora_a"] = module.lora_a.detach().clone()
                state[f"{name}.lora_b"] = module.lora_b.detach().clone()
    # Without these an adapter applied to the base model silently keeps the base embeddings and head.
    for name in ft.modules_to_save:
        weight = _saved_weight(model, name)
        with gathered([weight]):
            state[f"{name}.weight"] = weight.detach().clone()
    return state


ADAPTER_FILE, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"


def save_adapter(adapters: dict[str, torch.Tensor], directory: Path, ft: FinetuneConfig) -> None:
    """adapter.safetensors (A, B matrices and the modules_to_save weights) + adapter_config.json (rank,
    alpha, targets) in `directory`, each written under a temporary name and renamed into place."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = {k: v.contiguous() for k, v in adapters.items()}
    write_with(directory / ADAPTER_FILE, lambda tmp: save_file(tensors, str(tmp)))
    config = {
        "rank": ft.rank,
        "alpha": ft.alpha,
        "target_modules": ft.target_modules,
        "modules_to_save": ft.modules_to_save,
    }
    write_with(directory / ADAPTER_CONFIG, lambda tmp: tmp.write_text(json.dumps(config, indent=2)))


def _read_adapter_config(directory: Path) -> FinetuneConfig:
    path = directory / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LlamaZhError(f"{path}: cannot read the adapter config ({e})") from None
    keys = ("rank", "alpha", "target_modules", "modules_to_save")
    missing = [k for k in keys if not isinstance(config, dict) or k not in config]
    if missing:
        raise LlamaZhError(f"{path}: missing {', '.join(missing)}")
    try:
        return FinetuneConfig(
            method="lora",
            rank=config["rank"],
            alpha=config["alpha"],
            dropout=0.0,
            target_modules=list(config["target_modules"]),
            modules_to_save=list(config["modules_to_save"]),
        )
    except (LlamaZhError, TypeError) as e:
        raise LlamaZhError(f"{path}: {e}") from None


def _adapter_shapes(model: Transformer, ft: FinetuneConfig) -> dict[str, tuple[int, ...]]:
    """The shape each tensor of an adapter for `ft` must have on `model` (not yet wrapped)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, _, _, linear in lora_targets(model, ft.target_modules):
        out_features, in_features = linear_shape(linear)
        shapes[f"{name}.lora_a"] = (ft.rank, in_features)
        shapes[f"{name}.lora_b"] = (out_features, ft.rank)
    for name in ft.modules_to_save:
        shapes[f"{name}.weight"] = tuple(_saved_weight(model, name).shape)
    return shapes


def read_adapter(directory: Path, model: Transformer) -> tuple[FinetuneConfig, dict[str, torch.Tensor]]:
    """The config and tensors of the adapter saved in `directory`, every tensor checked for presence
    and shape against `model` (the base, unwrapped; a meta-device model will do)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    ft = _read_adapter_config(directory)
    path = directory / ADAPTER_FILE
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise LlamaZhError(f"{path}: cannot read the adapter ({e})") from None
    expected = _adapter_shapes(model, ft)
    for name, shape in expected.items():
        if name not in state:
            raise LlamaZhError(f"{path}: missing tensor {name} (adapter_config.json lists it)")
        if tuple(state[name].shape) != shape:
            raise LlamaZhError(
                f"{path}: {name} has shape {tuple(state[name].shape)}, the model expects {shape} "
                f"(an adapter of another model?)"
            )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise LlamaZhError(f"{path}: unexpected tensor {unexpected[0]} for the config in {ADAPTER_CONFIG}")
    return ft, state


def load_adapter(model: Transformer, directory: Path) -> Transformer:
    """Wrap `model` (the base weights) with the adapter saved in `directory` (unmerged, dropout off) and
    put in its modules_to_save weights. The adapter is checked against the model before anything changes."""
    directory = Path(directory)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise LlamaZhError(f"{directory}: the model already carries LoRA adapters; load an adapter onto the base model")
    ft, state = read_adapter(directory, model)

    apply_finetune(model, ft)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoRALinear):
                module.lora_a.copy_(state[f"{name}.lora_a"])
                module.lora_b.copy_(state[f"{name}.lora_b"])
        for name in ft.modules_to_save:
            _saved_weight(model, name).copy_(state[f"{name}.weight"])
    return model


def merge_lora(model: Transformer) -> Transformer:
    """Replace every LoRALinear by a plain Linear holding the merged weight (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_path, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            module.base.weight.data = module.merged_weight()
            setattr(parent, child, module.base)
    return model


# ------------------------------------------------------------------------------------------- QLoRA


def base_quant_config(ft: FinetuneConfig):
    """The QuantConfig of `finetune.base_quant`: llama_zh/conf/quant's defaults (nf4: blocks of 64, bf16 compute,
    no double quantization; int8: outlier threshold 6)."""
    from llama_zh.quant import QuantConfig

    return QuantConfig(name=ft.base_quant)


def load_quantized_base(stream: WeightStream, ft: FinetuneConfig, device: str | torch.device = "cpu"):
    """(model, QuantReport): the checkpoint of `stream` with its block projections quantized by
    `ft.base_quant` as they stream in, every weight frozen, not yet wrapped with adapters. Layers
    bitsandbytes cannot take on `device` stay in full precision and are named in the report."""
    from llama_zh.quant import quantize_stream

    return quantize_stream(stream, base_quant_config(ft), device)


def source_merged_stream(model: Transformer, source: WeightStream, tokenizer=None) -> WeightStream:
    """The tuned model's native weights, streamed from the source checkpoint: each adapted projection
    is the SOURCE weight + scale * B A (not the quantized base it trained on), each trained weight
    (modules_to_save) the model's, every other weight the source's, in the source's dtypes."""
    modules = dict(model.named_modules())

    def tensors():
        for name, t in source.tensors():
            module_path, _, leaf = name.rpartition(".")
            module = modules.get(module_path)
            dtype = source.specs[name][0]
            if isinstance(module, LoRALinear):
                trained = module.base.weight.requires_grad  # an adapted module that also trains fully
                out = module.merged_weight(module.base.weight.detach() if trained else t).to(dtype)
            else:
                param = model.get_parameter(name)
                out = param.detach().to(dtype) if param.requires_grad else t.to(dtype)
            del t
            yield name, out
            del out

    return WeightStream(source.config, dict(source.specs), tensors, tokenizer, source=f"{source.source} + adapters")


@torch.no_grad()
def logit_gap(model: Transformer, merged: Transformer, input_ids: torch.Tensor) -> dict[str, float]:
    """How far the trained QLoRA model (quantized base + adapters, on its device, dropout off) is from
    the merged full-precision checkpoint on `input_ids`: max and mean absolute difference of the
    logits (fp32), with the merged model's logit scale (mean |logit|) to read them against."""
    was_training = model.training
    model.eval()
    try:
        device = next(p.device for p in model.parameters())
        ours = model(input_ids.to(device)).float().cpu()
    finally:
        model.train(was_training)
    theirs = merged.eval()(input_ids.to(next(merged.parameters()).device)).float().cpu()
    diff = (ours - theirs).abs()
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "mean_abs_logit": float(theirs.abs().mean()),
        "tokens": int(input_ids.numel()),
    }
