"""Weight quantization of a built model with bitsandbytes: int8 (LLM.int8(), Linear8bitLt) or nf4 (Linear4bit).

The attention and FFN projections of every block are replaced (the reference tool's
choice); the embedding and the output head stay in full precision unless the quant config asks for them.
`quantize_stream` (what llama_zh.infer.load and QLoRA's base build on) builds the model on the meta
device and streams the checkpoint one tensor at a time: each projection is quantized as it arrives,
on the target device, so the full-precision model never exists there (nor in CPU memory): the peak
is the quantized model plus one full-precision tensor.

On CPU, bitsandbytes' nf4 kernel (packed for AVX512-BF16) needs an output size that is a multiple
of 32 and an input size that is a multiple of the block size; other layers are left in
full precision and counted in the report, on any CPU, so that a report does not depend on which CPU
wrote it. int8 on CPU multiplies in fp16 after quantizing the fp32 activations (bitsandbytes says so
on every call; the warning is silenced).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from llama_zh.checkpoint import WeightStream, check_specs
from llama_zh.config import ConfigError
from llama_zh.dtypes import FLOAT_DTYPES
from llama_zh.errors import LlamaZhError
from llama_zh.model import Transformer, build_model

log = logging.getLogger(__name__)

METHODS = ("none", "int8", "nf4")
PROJECTIONS = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "ffn.w_gate", "ffn.w_up", "ffn.w_down")
NF4_CPU_MULTIPLE = 32


class QuantError(LlamaZhError, RuntimeError):
    pass


@dataclass
class QuantConfig:
    name: str = "none"  # none | int8 | nf4
    threshold: float = 6.0  # int8: activation columns with a value above it are multiplied in fp16 (LLM.int8())
    compute_dtype: str = "bfloat16"  # nf4: dtype of the matmul after dequantizing
    double_quant: bool = False  # nf4: quantize the per-block scales too (QLoRA's double quantization)
    blocksize: int = 64  # nf4: weights per scale
    quantize_embedding: bool = False
    quantize_head: bool = False

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ConfigError(f"quant.name: {self.name!r}; expected one of {', '.join(METHODS)}")
        if self.compute_dtype not in FLOAT_DTYPES:
            raise ConfigError(f"quant.compute_dtype: {self.compute_dtype!r}; expected one of {', '.join(FLOAT_DTYPES)}")
        if not isinstance(self.threshold, (int, float)) or self.threshold < 0:
            raise ConfigError(f"quant.threshold must be a number >= 0 (0: no outlier columns), got {self.threshold!r}")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ConfigError(f"quant.blocksize must be a power of two from 32 to 4096, got {self.blocksize!r}")


@dataclass
class QuantReport:
    method: str
    device: str
    bytes_full: int  # the weights in the load dtype, unquantized
    bytes_after: int  # as loaded: quantized weights with their scales, plus everything left unquantized
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why it stayed in full precision

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_full

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "device": self.device,
            "weight_mib_full": self.bytes_full / 2**20,
            "weight_mib": self.bytes_after / 2**20,
            "weight_ratio": self.ratio,
            "layers_quantized": len(self.quantized),
            "layers_skipped": len(self.skipped),
            "skipped": self.skipped,
        }

    def summary(self) -> str:
        text = (
            f"quant={self.method} on {self.device}: weights {self.bytes_full / 2**20:.1f} MiB -> "
            f"{self.bytes_after / 2**20:.1f} MiB ({self.ratio:.2f}x), {len(self.quantized)} layers quantized"
        )
        if self.skipped:
            reasons = sorted(set(self.skipped.values()))
            text += f", {len(self.skipped)} left unquantized ({'; '.join(reasons)})"
        return text


def import_bitsandbytes(method: str):
    """bitsandbytes, imported without reaching for the network.

    On a CPU with AVX512-BF16 (most recent GPU hosts), importing bitsandbytes asks the Hugging Face hub
    for a CPU kernel through the `kernels` package, with no timeout: on an offline node that is a hang
    or a wait for the TCP timeout, and elsewhere a download at run time. The import is done with
    `kernels` hidden, so bitsandbytes keeps its own CPU implementation; its warning about the missing
    kernel is held back for that moment."""
    saved = sys.modules.get("kernels")
    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = quiet.level
    try:
        sys.modules["kernels"] = None  # an import of it raises ImportError
        quiet.setLevel(logging.ERROR)
        import bitsandbytes as bnb
    except Exception as e:  # ImportError, or a broken native library raising anything at import
        raise QuantError(
            f"quant={method} needs bitsandbytes, which failed to import "
            f"({type(e).__name__}: {e}); pip install bitsandbytes, or use quant=none"
        ) from None
    finally:
        quiet.setLevel(level)
        if saved is None:
            sys.modules.pop("kernels", None)
        else:
            sys.modules["kernels"] = saved
    return bnb


def _tensor_bytes(t: torch.Tensor | None, seen: set) -> int:
    if t is None or not isinstance(t, torch.Tensor) or t.is_meta:
        return 0
    key = (t.untyped_storage().data_ptr(), t.device)
    if key in seen:
        return 0
    seen.add(key)
    return t.untyped_storage().nbytes()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, with bitsandbytes' scales (int8 SCB, nf4 quant state)."""
    seen: set = set()
    total = 0
    for module in model.modules():
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            total += _tensor_bytes(t, seen)
            total += _tensor_bytes(getattr(t, "SCB", None), seen)
            qs = getattr(t, "quant_state", None)
            if qs is not None:
                total += sum(_tensor_bytes(v, seen) for v in qs.as_dict().values())
        state = getattr(module, "state", None)  # Linear8bitLt keeps CB/SCB there after its first forward
        if state is not None and hasattr(state, "SCB"):
            total += _tensor_bytes(state.SCB, seen) + _tensor_bytes(getattr(state, "CB", None), seen)
    return total


def _drop_cast_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast from")


def cannot_quantize(cfg: QuantConfig, device: torch.device, shape: tuple[int, ...]) -> str | None:
    """Why bitsandbytes cannot quantize an (out, in) weight by `cfg` on `device` (None: it can)."""
    out_features, in_features = shape
    if cfg.name == "nf4" and torch.device(device).type == "cpu":
        if out_features % NF4_CPU_MULTIPLE:
            return f"nf4 on CPU needs an output size that is a multiple of {NF4_CPU_MULTIPLE}"
        if in_features % cfg.blocksize:
            return f"nf4 on CPU needs an input size that is a multiple of quant.blocksize={cfg.blocksize}"
    return None


class _Quantizer:
    """Makes the bitsandbytes module for one weight, quantized on `device` as it is created."""

    def __init__(self, cfg: QuantConfig, device: torch.device, dtype: torch.dtype):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.bnb = import_bitsandbytes(cfg.name)
        # Logged on every call when activations are fp32 (CPU): expected, and said once in this module's docs.
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_cast_notice)

    def cannot_take(self, weight: torch.Tensor) -> str | None:
        return cannot_quantize(self.cfg, self.device, tuple(weight.shape))

    def linear(self, weight: torch.Tensor) -> nn.Module:
        out_features, in_features = weight.shape
        nn_ = self.bnb.nn
        if self.cfg.name == "int8":  # bitsandbytes takes the rows' absmax scales from an fp16 copy
            layer = nn_.Linear8bitLt(
                in_features,
                out_features,
                bias=False,
                has_fp16_weights=False,
                threshold=float(self.cfg.threshold),
                device="meta",
            )
            layer.weight = nn_.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(self.device)
        else:
            layer = nn_.Linear4bit(
                in_features,
                out_features,
                bias=False,
                compute_dtype=FLOAT_DTYPES[self.cfg.compute_dtype],
                compress_statistics=self.cfg.double_quant,
                quant_type="nf4",
                device="meta",
            )
            # Quantized from the compute dtype, so that dequantizing yields it directly.
            weight = weight.to(FLOAT_DTYPES[self.cfg.compute_dtype])
            layer.weight = nn_.Params4bit(
                weight,
                requires_grad=False,
                blocksize=self.cfg.blocksize,
                compress_statistics=self.cfg.double_quant,
                quant_type="nf4",
                module=layer,
            ).to(self.device)
        return layer.eval()

    def embedding(self, weight: torch.Tensor) -> nn.Module:
        num, dim = weight.shape
        nn_ = self.bnb.nn
        if self.cfg.name == "int8":
            emb = nn_.Embedding8bit(num, dim, device="meta")
            emb.weight = nn_.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(self.device)
        else:
            emb = nn_.EmbeddingNF4(num, dim, device="meta")
            emb.weight = nn_.Params4bit(
                weight,
                requires_grad=False,
                blocksize=self.cfg.blocksize,
                compress_statistics=False,
                quant_type="nf4",
                module=emb,
            ).to(self.device)
        emb.dtype = self.dtype  # what its lookups return
        return emb


def _targets(model: Transformer, cfg: QuantConfig) -> dict[str, str]:
    """Module name -> "linear" | "embedding" for the modules `cfg` quantizes."""
    if cfg.name == "none":
        return {}
    targets = {f"layers.{i}.{p}": "linear" for i in range(len(model.layers)) for p in PROJECTIONS}
    if cfg.quantize_head:
        targets["head"] = "linear"
    if cfg.quantize_embedding:
        targets["embed"] = "embedding"
    return targets


def planned_layers(model: Transformer, cfg: QuantConfig, device: str | torch.device) -> dict[str, str | None]:
    """Linear module name -> None if `quantize_stream` would quantize it on `device`, else why not
    (from shapes alone: a meta-device model will do)."""
    return {
        name: cannot_quantize(cfg, torch.device(device), (m.out_features, m.in_features))
        for name, kind in _targets(model, cfg).items()
        if kind == "linear"
        for m in [model.get_submodule(name)]
    }


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_stream(
    stream: WeightStream, cfg: QuantConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[Transformer, QuantReport]:
    """The model of `stream` on `device`, quantized by `cfg` one tensor at a time, every weight frozen;
    the rest in `dtype` (None: as stored). Neither swapped for speed nor put in eval mode: what
    training builds its adapters on (finetune.base_quant) and llama_zh.infer.load swaps."""
    check_specs(stream)
    device = torch.device(device)
    model = build_model(stream.config, device="meta")
    targets = _targets(model, cfg)
    quantizer = _Quantizer(cfg, device, dtype or torch.float32) if targets else None
    full = 0
    report = QuantReport(cfg.name, str(device), 0, 0)
    for name, t in _tensors_with_head(stream, targets):
        load_dtype = dtype or t.dtype
        full += t.numel() * torch.empty(0, dtype=load_dtype).element_size()
        module_name, _, param = name.rpartition(".")
        kind = targets.get(module_name)
        reason = quantizer.cannot_take(t) if kind == "linear" else None
        if kind and reason is None:
            quantizer.dtype = load_dtype
            new = quantizer.linear(t) if kind == "linear" else quantizer.embedding(t)
            _set_module(model, module_name, new)
            report.quantized.append(module_name)
        else:
            if reason:
                report.skipped[module_name] = reason
            module = model.get_submodule(module_name)
            module._parameters[param] = nn.Parameter(t.to(device=device, dtype=load_dtype), requires_grad=False)
        del t
    model.tie_weights()  # a tied head left a plain Linear is the embedding's Parameter again
    report.bytes_full, report.bytes_after = full, weight_bytes(model)
    return model, report


def _tensors_with_head(stream: WeightStream, targets: dict[str, str]):
    """The stream's tensors, plus head.weight for a tied model whose embedding or head is quantized:
    the two can no longer share one Parameter, so the head gets its own (quantized or not) copy."""
    untie = stream.config.tie_word_embeddings and ("head" in targets or "embed" in targets)
    for name, t in stream.tensors():
        yield name, t
        if untie and name == "embed.weight":
            yield "head.weight", t
        del t  # before the next read: one tensor alive at a time
