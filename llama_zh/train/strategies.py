"""`strategy=` choices as Lightning strategies, DeepSpeed included on the CPU.

Lightning's DeepSpeedStrategy refuses any accelerator but CUDA, and checks that device indices
match local ranks (CPU devices have no index). DeepSpeed itself runs on the CPU (its CPU
accelerator, gloo, DeepSpeedCPUAdam), so `DeepSpeedAnyDevice` lifts exactly those two checks and
nothing else: CPU runs exercise the same ZeRO code paths, checkpoints and consolidation as GPU runs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning_fabric.utilities.seed import reset_seed
from pytorch_lightning.accelerators import CUDAAccelerator
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy, Strategy

from llama_zh.config import ConfigError, from_mapping
from llama_zh.errors import LlamaZhError

log = logging.getLogger(__name__)


class DeepSpeedAnyDevice(DeepSpeedStrategy):
    """DeepSpeedStrategy that also runs on CPU devices (gloo backend)."""

    strategy_name = "deepspeed_any_device"

    def _on_cuda(self) -> bool:
        return isinstance(self.accelerator, CUDAAccelerator)

    def setup_environment(self) -> None:
        if self._on_cuda():
            return super().setup_environment()
        # DeepSpeedStrategy.setup_environment is the CUDA check followed by DDPStrategy's.
        DDPStrategy.setup_environment(self)

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        if self._on_cuda():
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        # As the parent, with the local rank as DeepSpeed's device rank (a CPU device has no index).
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    def setup_distributed(self) -> None:
        if self._on_cuda():
            return super().setup_distributed()
        # As the parent, minus the device-index check (CPU devices carry no index).
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()


@dataclass
class DeepSpeedConfig:
    """`strategy.deepspeed`; the defaults are llama_zh/conf/strategy/zero2.yaml's (a test checks that they agree)."""

    stage: int = 2
    offload_optimizer: bool = False  # optimizer state and step on the CPU (DeepSpeedCPUAdam)
    offload_parameters: bool = False  # stage 3 only: weights live on the CPU between uses
    allgather_bucket_size: int = 200_000_000
    reduce_bucket_size: int = 200_000_000
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    sub_group_size: int = 1_000_000_000


@dataclass
class StrategyConfig:
    """The `strategy=` node (this class is its `_target_`): auto, ddp, or a DeepSpeed ZeRO stage
    (`deepspeed` set). `build_strategy` makes the Lightning strategy of it once the micro batch is known."""

    name: str
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    deepspeed: DeepSpeedConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.deepspeed, Mapping):  # as instantiate passes the node's `deepspeed:` block
            self.deepspeed = from_mapping(DeepSpeedConfig, self.deepspeed, "strategy.deepspeed")
        elif self.deepspeed is not None and not isinstance(self.deepspeed, DeepSpeedConfig):
            raise ConfigError(
                f"strategy.deepspeed={self.deepspeed!r}: expected a mapping of DeepSpeed settings, "
                "or null (no DeepSpeed)"
            )


def is_deepspeed(strategy_cfg: StrategyConfig) -> bool:
    return strategy_cfg.deepspeed is not None


def zero_stage(strategy_cfg: StrategyConfig) -> int:
    return int(strategy_cfg.deepspeed.stage) if is_deepspeed(strategy_cfg) else 0


def offloads_optimizer(strategy_cfg: StrategyConfig) -> bool:
    return is_deepspeed(strategy_cfg) and bool(strategy_cfg.deepspeed.offload_optimizer)


def check_strategy(strategy_cfg: StrategyConfig) -> None:
    """Refuse a strategy config that cannot work, before anything is launched."""
    name = strategy_cfg.name
    if not is_deepspeed(strategy_cfg):
        if name not in ("auto", "ddp"):
            raise LlamaZhError(f"strategy={name}: neither auto, ddp nor a DeepSpeed strategy (no `deepspeed:` block)")
        return
    ds = strategy_cfg.deepspeed
    if ds.stage not in (1, 2, 3):
        raise LlamaZhError(f"strategy.deepspeed.stage={ds.stage}: expected 1, 2 or 3")
    if ds.offload_parameters and ds.stage != 3:
        raise LlamaZhError(
            "strategy.deepspeed.offload_parameters needs stage 3 (ZeRO-1/2 keep the weights on the device)"
        )


def extensions_dir() -> Path:
    """Where torch compiles (and caches) C++ extensions such as DeepSpeed's ops: TORCH_EXTENSIONS_DIR,
    else torch's default, a per-Python, per-accelerator folder of the user's cache."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def jit_ops_to_build(strategy_cfg: StrategyConfig, on_gpu: bool) -> list[str]:
    """The DeepSpeed ops this run compiles before it trains: its CPU communication op (CPU runs)
    and DeepSpeedCPUAdam (optimizer offload), unless installed prebuilt or already compiled."""
    if not is_deepspeed(strategy_cfg):
        return []
    ops = ([] if on_gpu else ["deepspeed_shm_comm"]) + (["cpu_adam"] if offloads_optimizer(strategy_cfg) else [])
    if not ops:
        return []
    from deepspeed.git_version_info import installed_ops

    root = extensions_dir()
    return [op for op in ops if not installed_ops.get(op) and not (root / op / f"{op}.so").is_file()]


def announce_jit_builds(strategy_cfg: StrategyConfig, on_gpu: bool) -> None:
    """Say that the first DeepSpeed run compiles ops, which takes minutes without a word from DeepSpeed."""
    ops = jit_ops_to_build(strategy_cfg, on_gpu)
    if ops:
        log.info(
            "DeepSpeed: compiling %s into %s (TORCH_EXTENSIONS_DIR) before training starts; this takes a few "
            "minutes once, later runs reuse the build",
            " and ".join(ops),
            extensions_dir(),
        )


def build_strategy(strategy_cfg: StrategyConfig, micro_batch: int) -> Strategy | str:
    check_strategy(strategy_cfg)
    if not is_deepspeed(strategy_cfg):
        # ddp: Lightning picks the backend from the device (gloo on CPU, NCCL on CUDA).
        return "auto" if strategy_cfg.name == "auto" else DDPStrategy()
    ds = strategy_cfg.deepspeed
    return DeepSpeedAnyDevice(
        stage=int(ds.stage),
        offload_optimizer=bool(ds.offload_optimizer),
        offload_parameters=bool(ds.offload_parameters),
        allgather_bucket_size=int(ds.allgather_bucket_size),
        reduce_bucket_size=int(ds.reduce_bucket_size),
        overlap_comm=bool(ds.overlap_comm),
        contiguous_gradients=bool(ds.contiguous_gradients),
        sub_group_size=int(ds.sub_group_size),
        # Under offload, zero.Init creates each weight's shard in CPU RAM directly.
        remote_device="cpu" if ds.offload_parameters else None,
        logging_batch_size_per_gpu=micro_batch,
        logging_level=logging.WARNING,
    )


def is_partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (its data lives in shards across processes)."""
    return hasattr(param, "ds_id")


def gathered(params: list[torch.Tensor], modifier_rank: int | None = None):
    """Context in which ZeRO-3 parameters hold their full data (a no-op for ordinary ones).

    modifier_rank None: read-only; an int: that rank's changes are broadcast and re-partitioned on exit.
    """
    sharded = [p for p in params if is_partitioned(p)]
    if not sharded:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(sharded, modifier_rank=modifier_rank)
