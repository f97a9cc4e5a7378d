"""What a `trainer=` choice asks of the machine, checked before anything is launched, and what the
`hardware=` node says of it (per-device memory, peak FLOP/s).

- The hardware: a GPU trainer on a machine without CUDA fails at once, naming the CPU trainers.
- The batch arithmetic: global batch = micro batch x devices x nodes x accumulation, printed at
  start; a requested global batch that the others do not divide is refused.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from llama_zh.errors import LlamaZhError

log = logging.getLogger(__name__)

# The key of a trainer= file that is not a pytorch_lightning.Trainer argument: the option's name, for
# messages and the run's recorded choices (the stage drops it before instantiating the Trainer).
LLAMA_ZH_KEYS = ("name",)
GPU_ACCELERATORS = ("gpu", "cuda")


@dataclass
class TrainerConfig:
    """The Lightning arguments of the `trainer=` node that llama_zh itself reads (the batch arithmetic,
    the hardware check, the LR schedule's length), typed from the same node the stage instantiates the
    Trainer from. The defaults are llama_zh/conf/trainer/cpu.yaml's (a test checks that they agree)."""

    name: str = "cpu"
    accelerator: str = "cpu"
    devices: Any = 1  # a count, -1, "auto", "0,1,3" or a list of indices
    num_nodes: int = 1
    precision: str = "32-true"
    accumulate_grad_batches: int = 1
    max_steps: int = 300  # the LR schedule's length too
    enable_progress_bar: bool = True  # off (or stdout not a terminal): progress lines in the log instead


@dataclass
class HardwareConfig:
    """The `hardware=` node: facts about the machine that no Trainer argument carries, per device.
    The defaults are llama_zh/conf/hardware/cpu.yaml's (a test checks that they agree)."""

    name: str = "cpu"
    memory_gb: float | None = None  # None: detected (the GPU's memory, or RAM shared by the node's processes)
    peak_tflops: float | None = None  # at trainer.precision; None: unknown (no MFU)


def uses_gpu(trainer_cfg: TrainerConfig) -> bool:
    return str(trainer_cfg.accelerator) in GPU_ACCELERATORS or (
        str(trainer_cfg.accelerator) == "auto" and torch.cuda.is_available()
    )


def devices_per_node(trainer_cfg: TrainerConfig) -> int:
    """The number of processes per node that `trainer.devices` asks for."""
    devices = trainer_cfg.devices
    if isinstance(devices, str) and devices.lstrip("-").isdigit():
        devices = int(devices)
    if devices in ("auto", -1):
        return max(1, torch.cuda.device_count()) if uses_gpu(trainer_cfg) else 1
    if isinstance(devices, int):
        if devices <= 0:
            raise LlamaZhError(f"trainer.devices={devices}: expected a positive count, -1 or auto")
        return devices
    if isinstance(devices, str):  # "0,1,3"
        return len([d for d in devices.split(",") if d.strip()])
    return len(list(devices))  # a list of device indices


def check_hardware(trainer_cfg: TrainerConfig) -> None:
    """Refuse a trainer this machine cannot run, before any process is launched."""
    name = trainer_cfg.name
    if str(trainer_cfg.accelerator) in GPU_ACCELERATORS:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available == 0:
            raise LlamaZhError(
                f"trainer={name} needs CUDA GPUs (trainer.accelerator={trainer_cfg.accelerator}) but this machine has "
                "none; on a CPU machine use trainer=cpu (one process) or trainer=cpu_ddp2 (two processes over gloo)"
            )
        wanted = devices_per_node(trainer_cfg)
        if wanted > available:
            raise LlamaZhError(
                f"trainer={name} asks for {wanted} GPUs per node (trainer.devices) but this machine has {available}; "
                f"set trainer.devices={available} (or choose another trainer=)"
            )
    nodes = trainer_cfg.num_nodes
    if not isinstance(nodes, int) or nodes <= 0:
        raise LlamaZhError(f"trainer.num_nodes={nodes!r}: expected a positive integer")


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int  # sequences per process per forward
    devices: int  # processes per node
    nodes: int
    accumulation: int  # micro-batches per optimizer step
    seq_len: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.devices * self.nodes * self.accumulation

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch} sequences = micro batch {self.micro_batch} x devices {self.devices} "
            f"x nodes {self.nodes} x accumulation {self.accumulation} "
            f"({self.tokens_per_step:,} tokens per optimizer step at seq_len {self.seq_len})"
        )


def batch_plan(micro_batch: int, seq_len: int, trainer_cfg: TrainerConfig, global_batch: int | None) -> BatchPlan:
    """The batch arithmetic of a run; `global_batch` (if given) fixes the accumulation and must divide exactly."""
    for field, value in (("micro batch size", micro_batch), ("seq_len", seq_len)):
        if not isinstance(value, int) or value <= 0:
            raise LlamaZhError(f"{field} must be a positive integer, got {value!r}")
    devices, nodes = devices_per_node(trainer_cfg), int(trainer_cfg.num_nodes)
    accumulation = trainer_cfg.accumulate_grad_batches
    if not isinstance(accumulation, int) or accumulation <= 0:
        raise LlamaZhError(f"trainer.accumulate_grad_batches={accumulation!r}: expected a positive integer")
    if global_batch is not None:
        per_pass = micro_batch * devices * nodes
        if not isinstance(global_batch, int) or global_batch <= 0 or global_batch % per_pass:
            lower = max(per_pass, global_batch // per_pass * per_pass) if isinstance(global_batch, int) else per_pass
            raise LlamaZhError(
                f"global_batch_size={global_batch} is not a positive multiple of micro batch {micro_batch} x devices "
                f"{devices} x nodes {nodes} = {per_pass}; use {lower} or {lower + per_pass}, or change the micro batch"
            )
        derived = global_batch // per_pass
        if accumulation not in (1, derived):
            raise LlamaZhError(
                f"global_batch_size={global_batch} implies accumulation {derived} but trainer.accumulate_grad_batches="
                f"{accumulation}; set only one of them"
            )
        accumulation = derived
    return BatchPlan(micro_batch, devices, nodes, accumulation, seq_len)


def host_memory_bytes() -> int:
    """Physical RAM of this machine (cgroup limit if lower)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(limit_file).read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def device_memory_bytes(trainer_cfg: TrainerConfig, hardware: HardwareConfig) -> int:
    """Memory of one device: hardware.memory_gb if set; else the GPU's; else RAM shared by this node's processes."""
    if hardware.memory_gb:
        return int(float(hardware.memory_gb) * 1024**3)
    if uses_gpu(trainer_cfg) and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return host_memory_bytes() // devices_per_node(trainer_cfg)


def peak_flops(hardware: HardwareConfig) -> float | None:
    tflops = hardware.peak_tflops
    return float(tflops) * 1e12 if tflops else None


def model_flops_per_token(
    n_params: int, n_layers: int, dim: int, seq_len: int, trainable_fraction: float = 1.0
) -> float:
    """Training FLOPs per token: 6N for the matmuls (2N forward, 4N backward; the weight-gradient
    half skipped for frozen weights) plus attention scores 12 * layers * dim * seq (PaLM appendix B)."""
    backward = 2 * n_params * (1 + trainable_fraction)
    return 2 * n_params + backward + 12 * n_layers * dim * seq_len
