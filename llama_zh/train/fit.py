"""Training itself, as the training stages compose it: the checks a run must pass before anything
is built (hardware and batch, optimizer, finetune method, memory plan), resume, the Lightning
trainer and its callbacks, and `fit`."""

from __future__ import annotations

import inspect
import logging
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from llama_zh.atomic import claim_run_dir, release_run_dir
from llama_zh.errors import LlamaZhError
from llama_zh.model import build_model
from llama_zh.stages.rundir import output_dir
from llama_zh.tokenizer import Tokenizer
from llama_zh.tracking import TrackingConfig, build_loggers
from llama_zh.train.build import ModelSource, model_builder
from llama_zh.train.callbacks import (
    NativeCheckpoint,
    TrainingState,
    check_resumable,
    resolve_resume,
    state_checkpoint,
)
from llama_zh.train.finetune import FinetuneConfig, apply_finetune, count_trainable
from llama_zh.train.hardware import (
    BatchPlan,
    HardwareConfig,
    TrainerConfig,
    batch_plan,
    check_hardware,
    model_flops_per_token,
    peak_flops,
    uses_gpu,
)
from llama_zh.train.memory_check import memory_plan_check, plan_details
from llama_zh.train.module import CausalLM, OptimConfig, check_loss, check_optimizer
from llama_zh.train.strategies import (
    StrategyConfig,
    announce_jit_builds,
    build_strategy,
    check_strategy,
    is_deepspeed,
    offloads_optimizer,
    zero_stage,
)

log = logging.getLogger(__name__)

# The Trainer arguments `build_trainer` passes itself: the trainer= node may not set them.
TRAINER_SUPPLIED = ("strategy", "logger", "callbacks", "default_root_dir", "enable_checkpointing")
# What a run knows only once it has planned the model and the data, passed to each configured callback
# that names it as an argument (and whose node does not set it): the model FLOPs per trained token, the
# device's peak FLOP/s (None: unknown), the data sources' names, the memory plan, and whether the
# Trainer shows a progress bar.
RUN_FACTS = ("flops_per_token", "peak_flops", "source_names", "memory_plan", "progress_bar")


@dataclass
class TrainSettings:
    """What training reads of the config, built once by `llama_zh.stages.train_settings` before anything
    else runs: the groups (trainer=, hardware=, strategy=, callbacks, optim=, finetune=, logger=) and the
    root config's run keys, which have no defaults here (they are llama_zh/conf/config.yaml's).
    `make_trainer` is the trainer= node's pytorch_lightning.Trainer partial; `trainer` the arguments of it
    that llama_zh reads itself, typed; `callbacks` the callbacks node's constructors, by name."""

    output_dir: Path
    trainer: TrainerConfig
    make_trainer: Callable[..., pl.Trainer]
    hardware: HardwareConfig
    strategy: StrategyConfig
    callbacks: dict[str, Callable[..., Any]]
    optim: OptimConfig
    finetune: FinetuneConfig
    tracking: TrackingConfig
    seed: int
    global_batch_size: int | None
    resume: str | None
    state_every_n_steps: int
    state_keep_last: int
    log_progress_every_s: float
    log_progress_every_n_steps: int
    memory_check: bool
    loss: str  # auto | plain | chunked
    save_every_n_steps: int  # the stage's own: native checkpoints every N optimizer steps (0: the final one)


@dataclass(frozen=True)
class TrainResult:
    """What a training stage returns: its last val/loss (nan if it never validated) and the final
    native checkpoint's path. The entry point hands `objective` to a Hydra sweeper (Optuna)."""

    val_loss: float
    checkpoint: Path | None = None

    @property
    def objective(self) -> float:
        return float(self.val_loss)


def check_prefix(ft: FinetuneConfig, strategy: StrategyConfig, pack: bool) -> None:
    """Refuse a prefix-tuning run that cannot work, before anything is built: its tokens run through the
    KV cache, which packed sequences (`pack`: stage.pack) and activation checkpointing do not use."""
    if ft.method != "prefix":
        return
    if pack:
        raise LlamaZhError(
            "finetune=prefix runs the tokens after the prefix in the KV cache, which packed sequences "
            "(stage.pack=true) cannot use; set stage.pack=false"
        )
    if strategy.activation_checkpointing:
        raise LlamaZhError(
            "finetune=prefix runs every block with the KV cache, which activation checkpointing skips; "
            "set strategy.activation_checkpointing=false"
        )
    if zero_stage(strategy) == 3:
        raise LlamaZhError(
            "finetune=prefix is not supported with strategy=zero3* (its prefix is computed outside the "
            "blocks ZeRO-3 gathers); use strategy=auto, ddp, zero1 or zero2"
        )


def check_base_quant(ft: FinetuneConfig, source: ModelSource, deepspeed: bool) -> None:
    """Refuse a QLoRA run that cannot work, before anything is built."""
    if ft.base_quant is None:
        return
    if source.stream is None:
        raise LlamaZhError(
            f"finetune.base_quant={ft.base_quant} quantizes a checkpoint's weights and merges the adapters "
            "back into them: give one (stage=sft stage.checkpoint=..., or stage.init_from=...), "
            "or set finetune.base_quant=null"
        )
    if deepspeed:
        raise LlamaZhError(
            f"finetune.base_quant={ft.base_quant} is not supported with DeepSpeed strategies (ZeRO would "
            "partition or re-cast the bitsandbytes weights); use strategy=auto or ddp"
        )


@dataclass
class TrainJob:
    """Everything a training stage decides before `fit`."""

    stage: str
    source: ModelSource
    tokenizer: Tokenizer
    datamodule: pl.LightningDataModule
    plan: BatchPlan
    source_names: list[str] | None = None
    extra: dict | None = None  # written into native checkpoints' model_config.yaml and logged
    # Called with CausalLM's arguments: another objective (stage=dpo) passes a subclass, its own
    # settings bound with functools.partial.
    make_module: Callable[..., CausalLM] = CausalLM


def prepare_batch(settings: TrainSettings, micro_batch: int, seq_len: int) -> BatchPlan:
    """Hardware and batch checks, before anything heavy: a run that cannot start fails at once."""
    check_hardware(settings.trainer)
    check_strategy(settings.strategy)
    plan = batch_plan(micro_batch, seq_len, settings.trainer, settings.global_batch_size)
    log.info("%s", plan.describe())
    return plan


def fit(settings: TrainSettings, job: TrainJob, pack: bool = False) -> TrainResult:
    """Train `job`; `pack`: stage.pack (packed sequences), which some finetune methods cannot take."""
    out = output_dir(settings.output_dir)
    claim_run_dir(out)  # to the end of the run: a second run into `out` refuses, naming this one
    optim, ft, strategy_cfg = settings.optim, settings.finetune, settings.strategy
    deepspeed = is_deepspeed(strategy_cfg)
    config = job.source.config
    on_gpu = uses_gpu(settings.trainer)
    check_optimizer(optim, on_gpu, deepspeed)
    check_base_quant(ft, job.source, deepspeed)
    check_prefix(ft, strategy_cfg, pack)
    loss_kind = check_loss(str(settings.loss), zero_stage(strategy_cfg) == 3, settings.trainer.precision)

    # Trainable count from a meta-device copy: no memory, and before any process is launched.
    probe = apply_finetune(build_model(config, device="meta"), ft)
    trainable, total = count_trainable(probe)
    log.info(
        "model %s: %.2fM parameters, %.2fM trainable (finetune=%s%s)",
        config.name,
        total / 1e6,
        trainable / 1e6,
        ft.method,
        f", base {ft.base_quant}" if ft.base_quant else "",
    )
    memory = memory_plan_check(settings, config, trainable, job.plan, plan_details(config, probe, ft, optim, on_gpu))

    expected = {
        "model": config.to_dict(),
        "tokenizer_sha256": job.tokenizer.sha256(),
        "stage": job.stage,
        "strategy": strategy_cfg.name,
        "deepspeed": deepspeed,
        "finetune": ft.method,
        "global_batch": job.plan.global_batch,
        "world_size": job.plan.devices * job.plan.nodes,
    }
    if ft.method == "lora":
        expected["lora"] = {"rank": ft.rank, "alpha": ft.alpha}  # to merge adapters when consolidating
    # The optimizer's state and a quantized base's weights have other layouts: not resumable across them.
    expected["optimizer"], expected["base_quant"] = optim.name, ft.base_quant
    if ft.method == "prefix":  # another prefix shape cannot take the state's prefix parameters
        expected["prefix_len"], expected["prefix_hidden"] = ft.prefix_len, ft.prefix_hidden
    state_dir = out / "checkpoints" / "state"
    resume_dir = resolve_resume(settings.resume, state_dir)
    ckpt_path = None
    if resume_dir is not None:
        meta = check_resumable(resume_dir, expected)
        ckpt_path = str(state_checkpoint(resume_dir))
        log.info("resuming from %s (step %s)", resume_dir, meta.get("global_step"))

    trainable_fraction = trainable / max(total, 1)
    module = job.make_module(
        model_builder(
            job.source,
            ft,
            zero3=zero_stage(strategy_cfg) == 3,
            checkpointing=bool(strategy_cfg.activation_checkpointing),
            on_gpu=on_gpu,
        ),
        optim,
        total_steps=settings.trainer.max_steps,
        seed=settings.seed,
        cpu_adam=offloads_optimizer(strategy_cfg),
        loss_kind=loss_kind,
    )
    extra = {"stage": job.stage, "finetune": ft.method, **(job.extra or {})}
    native = NativeCheckpoint(
        out / "checkpoints",
        job.tokenizer.path,
        settings.save_every_n_steps,
        extra=extra,
        finetune=ft,
        source=job.source.stream,
    )
    state = TrainingState(
        state_dir,
        int(settings.state_every_n_steps),
        int(settings.state_keep_last),
        meta=expected,
        deepspeed=deepspeed,
        tokenizer=job.tokenizer.path,
    )
    hparams = {
        "n_params": total,
        "n_trainable": trainable,
        "tokenizer_sha256": expected["tokenizer_sha256"],
        "global_batch": job.plan.global_batch,
        "tokens_per_step": job.plan.tokens_per_step,
        "resumed_from": str(resume_dir) if resume_dir else None,
    }
    resume_step = int(meta["global_step"]) if resume_dir is not None else None
    facts = {
        "flops_per_token": model_flops_per_token(
            total, config.n_layers, config.dim, job.plan.seq_len, trainable_fraction
        ),
        "peak_flops": peak_flops(settings.hardware),
        "source_names": job.source_names,
        "memory_plan": memory,
        "progress_bar": bool(settings.trainer.enable_progress_bar),
    }
    # The configured ones after the saves: a step's time (Throughput) counts the saves in it.
    callbacks = [state, native, *configured_callbacks(settings.callbacks, facts)]
    trainer = build_trainer(settings, callbacks, hparams, job.plan, resume_step)
    trainer.fit(module, datamodule=job.datamodule, ckpt_path=ckpt_path, weights_only=True)  # no pickled code
    if native.final is None:
        # Resumed from a state at max_steps: Lightning skips training and its end hooks, but the
        # run's native checkpoint must exist (the run may have been killed right before writing it).
        native.final = native.save(trainer, module, "final")
    log.info("final checkpoint: %s", native.final)
    val = trainer.callback_metrics.get("val/loss")
    release_run_dir(out)
    return TrainResult(float(val) if val is not None else math.nan, native.final)


def quiet_library_warnings() -> None:
    """Ignore the warnings of library internals that a user can do nothing about, each matched by
    category, module and message, so that every other warning still shows:
    - torch.distributed's deprecation of all_gather_into_tensor / reduce_scatter_tensor, which
      DeepSpeed calls at every step, and which shows again at every call (1,200+ lines in a run);
    - torch's pytree deprecation of LeafSpec, which Lightning's CombinedLoader constructs."""
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.\w+` is deprecated",
        category=FutureWarning,
        module=r"torch\.distributed\.c10d_logger",
    )
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"pytorch_lightning\.utilities\._pytree",
    )


def configured_callbacks(factories: dict[str, Callable[..., Any]], facts: dict[str, Any]) -> list[pl.Callback]:
    """The callbacks node's constructors called, in its order, each with the run `facts` it names as
    arguments and its node does not set; a constructor may give one callback, a list, or None."""
    built: list[pl.Callback] = []
    for name, factory in factories.items():
        try:
            parameters = inspect.signature(factory).parameters
        except (TypeError, ValueError):  # a builtin without a signature names no fact
            parameters = {}
        given = getattr(factory, "keywords", {})
        try:
            made = factory(**{k: v for k, v in facts.items() if k in parameters and k not in given})
        except LlamaZhError:
            raise
        except Exception as e:  # a value the constructor refuses: one line naming the entry
            target = getattr(getattr(factory, "func", factory), "__qualname__", repr(factory))
            first = str(e).strip().splitlines()
            raise LlamaZhError(f"callbacks.{name} ({target}): {type(e).__name__}: {first[0] if first else ''}") from e
        made = [] if made is None else list(made) if isinstance(made, (list, tuple)) else [made]
        for callback in made:
            if not isinstance(callback, pl.Callback):
                raise LlamaZhError(f"callbacks.{name}: made a {type(callback).__name__}, not a Lightning Callback")
        built += made
    return built


def build_trainer(
    settings: TrainSettings,
    callbacks: list[pl.Callback],
    extra_hparams: dict | None = None,
    plan: BatchPlan | None = None,
    resume_step: int | None = None,
) -> pl.Trainer:
    """The trainer= node's Trainer, completed with the strategy, loggers and callbacks of this run."""
    out = output_dir(settings.output_dir)
    quiet_library_warnings()
    args = {"accumulate_grad_batches": plan.accumulation} if plan is not None else {}
    strategy = build_strategy(settings.strategy, plan.micro_batch if plan else 1)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # the other processes of a node wait for its build
        announce_jit_builds(settings.strategy, uses_gpu(settings.trainer))
    loggers = build_loggers(settings.tracking, out, extra_hparams, resume_step)
    return settings.make_trainer(
        **args,
        strategy=strategy,
        logger=loggers,
        callbacks=callbacks,
        default_root_dir=str(out),
        enable_checkpointing=False,
    )
