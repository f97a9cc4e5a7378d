"""The one way to get a model for inference: `load(path, device, dtype, quant, backend)`.

stage=infer, stage=eval and stage=serve (through `load_for_stage`) and the benchmarks all load here:
the checkpoint (native, Hugging Face or Meta: whatever `llama_zh.convert.read_any` reads, told apart by
what is on disk) streams in one tensor at a time, quantized as it arrives
(llama_zh.quant), then the speed-up swaps of llama_zh.infer.swaps are applied once, for the chosen
backend. Nothing re-lays or re-fuses weights afterwards. `llama_zh.load_checkpoint` stays the plain
loader (the training architecture as stored: what merges, conversions and parity checks need).

Backends (`stage.backend`):
- `torch`: fused q/k/v and gate/up products through F.linear, wide weights column-major on CPU;
- `kernel`: the same fusions through the small-batch CPU kernel (llama_zh.kernels; CPU, fp32, needs
  a C compiler and AVX2);
- `auto`: `kernel` wherever it can run (CPU, fp32, kernel built), `torch` elsewhere; `rows` (the batch
  rows the caller will mostly decode) is kept for callers, every row count now prefers the kernel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llama_zh import kernels
from llama_zh.checkpoint import WeightStream, stream_tokenizer
from llama_zh.config import ConfigError
from llama_zh.convert import read_any
from llama_zh.dtypes import PRECISION_DTYPES
from llama_zh.errors import LlamaZhError
from llama_zh.infer import swaps
from llama_zh.model import Transformer
from llama_zh.prefix import load_prefix
from llama_zh.quant import QuantConfig, QuantReport, quantize_stream
from llama_zh.tokenizer import Tokenizer
from llama_zh.train.hardware import TrainerConfig

log = logging.getLogger(__name__)
BACKENDS = ("auto", "torch", "kernel")


@dataclass
class LoadReport:
    """What `load` did: the quantization (weights before and after) and the swaps of the backend."""

    quant: QuantReport
    backend: str  # the backend in use: torch | kernel
    swapped: dict[str, int] = field(default_factory=dict)  # module kind -> how many were swapped

    def to_dict(self) -> dict:
        return {"quant": self.quant.to_dict(), "backend": self.backend, "swapped": dict(self.swapped)}

    def summary(self) -> str:
        swapped = ", ".join(f"{n} {k}" for k, n in self.swapped.items() if n)
        return f"{self.quant.summary()}; backend={self.backend} ({swapped or 'nothing'} swapped)"


def resolve_backend(backend: str, device: str | torch.device, dtype: torch.dtype | None, rows: int = 1) -> str:
    """The backend `backend` means on `device` for weights of `dtype` (None: as stored, fp32 assumed)
    when decoding about `rows` rows; `kernel` where it cannot run is a ConfigError.

    auto: the kernel wherever it runs; it was the faster one at every row count measured
    (experiments/inference.md, the backend choice). Chosen once: the weights keep that layout while the
    model lives."""
    if backend not in BACKENDS:
        raise ConfigError(f"stage.backend: {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return backend
    usable = torch.device(device).type == "cpu" and dtype in (None, torch.float32)
    if backend == "kernel":
        if not usable:
            raise ConfigError(
                f"stage.backend=kernel runs fp32 on CPU only (device {device}, dtype {dtype}); "
                "use stage.backend=torch or auto"
            )
        if kernels.load() is None:
            raise ConfigError(
                "stage.backend=kernel: the small-batch CPU kernel is unavailable here (needs an x86-64 "
                "CPU with AVX2 and a C compiler; see the log); use stage.backend=torch or auto"
            )
        return backend
    if not usable or kernels.load() is None:
        return "torch"
    return "kernel"


def load_stream(
    stream: WeightStream,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    quant: QuantConfig | None = None,
    backend: str = "auto",
    rows: int = 1,
) -> tuple[Transformer, LoadReport]:
    """The model of `stream` on `device`, quantized by `quant`, the rest in `dtype` (None: as stored),
    swapped for `backend`, in eval mode, every weight frozen."""
    chosen = resolve_backend(backend, device, dtype, rows)
    model, quant_report = quantize_stream(stream, quant or QuantConfig(), device, dtype)
    swapped = swaps.apply(model, chosen)
    if torch.device(device).type == "cpu":
        kernels.trim_heap()  # the swaps' copies freed the weights as loaded: hand that memory back
    return model.eval(), LoadReport(quant_report, chosen, swapped)


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    quant: QuantConfig | None = None,
    backend: str = "auto",
    rows: int = 1,
) -> tuple[Transformer, Tokenizer | None, LoadReport]:
    """(model, tokenizer, report) from a native, Hugging Face or Meta directory (`read_any`; a
    TencentPretrain file, a GGUF file or a PEFT adapter is refused in one line); see `load_stream`. The
    tokenizer is None if the directory has none."""
    stream = read_any(Path(path))
    tokenizer = stream_tokenizer(stream)  # checked before the weights are read
    model, report = load_stream(stream, device, dtype, quant, backend, rows)
    return model, tokenizer, report


def inference_target(trainer: TrainerConfig) -> tuple[torch.device, torch.dtype | None]:
    """Device and weight dtype from trainer= (hardware lives there): gpu -> cuda in the trainer's
    precision; cpu -> cpu, weights as stored."""
    accelerator = str(trainer.accelerator)
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={accelerator} but no CUDA device is available (use trainer=cpu)")
        return torch.device("cuda"), PRECISION_DTYPES.get(str(trainer.precision), torch.float32)
    return torch.device("cpu"), None


def load_for_stage(
    checkpoint: str | Path,
    trainer: TrainerConfig,
    quant: QuantConfig,
    backend: str | None,
    prefix: str | None,
    rows: int = 1,
) -> tuple[Transformer, Tokenizer, LoadReport]:
    """The checkpoint of stage.checkpoint (native, HF or Meta: see `load`) on trainer='s device, quantized by quant=,
    swapped for stage.backend (None: auto), with the prefix of finetune=prefix beside it (or
    stage.prefix) attached; `rows`: the batch rows the stage decodes."""
    device, dtype = inference_target(trainer)
    model, tokenizer, report = load(checkpoint, device, dtype, quant, str(backend or "auto"), rows)
    if tokenizer is None:
        raise LlamaZhError(f"stage.checkpoint: {checkpoint} has no tokenizer.model")
    log.info("%s", report.summary())
    load_prefix(model, checkpoint, prefix)  # finetune=prefix's, beside the checkpoint
    return model, tokenizer, report
