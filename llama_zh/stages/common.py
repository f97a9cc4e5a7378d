"""What several stages share: the run directory, the model's shape, and training itself
(hardware and batch checks, memory plan, strategy, resume, the Lightning trainer)."""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from llama_zh.atomic import claim_run_dir, release_run_dir
from llama_zh.callbacks import (
    MemoryReport,
    NativeCheckpoint,
    ProgressLog,
    TrainingState,
    check_resumable,
    resolve_resume,
    state_checkpoint,
    step_progress_bar,
)
from llama_zh.checkpoint import WeightStream, load_model
from llama_zh.config import ConfigError, ModelConfig
from llama_zh.errors import LlamaZhError
from llama_zh.finetune import FinetuneConfig, apply_finetune, base_quant_config, count_trainable, load_quantized_base
from llama_zh.hardware import (
    BatchPlan,
    TrainerConfig,
    batch_plan,
    check_hardware,
    device_memory_bytes,
    host_memory_bytes,
    lightning_args,
    model_flops_per_token,
    peak_flops,
    uses_gpu,
)
from llama_zh.memory_plan import MemoryPlan, PlanInputs, fits, peak_rss, plan_memory, reset_peak_rss
from llama_zh.model import Transformer, build_model
from llama_zh.module import MIN_8BIT_SIZE, CausalLM, OptimConfig, check_optimizer, enable_activation_checkpointing
from llama_zh.stages import finetune_slice, optim_slice, plain, strategy_slice, tracking_slice, trainer_slice
from llama_zh.strategies import (
    StrategyConfig,
    announce_jit_builds,
    build_strategy,
    check_strategy,
    gathered,
    is_deepspeed,
    offloads_optimizer,
    zero_stage,
)
from llama_zh.tokenizer import Tokenizer
from llama_zh.tracking import TrackingConfig, build_loggers

log = logging.getLogger(__name__)


def output_dir(cfg: DictConfig | Path) -> Path:
    """The run directory (paths.output_dir), made if missing."""
    path = Path(cfg.paths.output_dir) if isinstance(cfg, DictConfig) else Path(cfg)
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class TrainSettings:
    """What training reads of the config, typed once by `train_settings` before anything else runs:
    the groups (trainer=, strategy=, optim=, finetune=, logger=) and the root config's run keys, which
    have no defaults here (they are llama_zh/conf/config.yaml's)."""

    output_dir: Path
    trainer: TrainerConfig
    strategy: StrategyConfig
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
    save_every_n_steps: int  # the stage's own: native checkpoints every N optimizer steps (0: the final one)


# The root config's keys TrainSettings takes as they are.
RUN_KEYS = (
    "seed",
    "global_batch_size",
    "resume",
    "state_every_n_steps",
    "state_keep_last",
    "log_progress_every_s",
    "log_progress_every_n_steps",
    "memory_check",
)


def train_settings(cfg: DictConfig) -> TrainSettings:
    return TrainSettings(
        output_dir=Path(cfg.paths.output_dir),
        trainer=trainer_slice(cfg),
        strategy=strategy_slice(cfg),
        optim=optim_slice(cfg),
        finetune=finetune_slice(cfg),
        tracking=tracking_slice(cfg),
        save_every_n_steps=int(cfg.stage.save_every_n_steps),
        **{key: plain(cfg[key]) for key in RUN_KEYS},
    )


def model_config(model: ModelConfig, tokenizer: Tokenizer) -> ModelConfig:
    """The `model=` shape with its vocabulary checked against (or taken from) the tokenizer."""
    config = model
    if config.vocab_size is None:
        return config.with_vocab(tokenizer.vocab_size)
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(
            f"model.vocab_size={config.vocab_size} but the tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces"
        )
    return config


def checkpoint_tokenizer(stream: WeightStream, field: str) -> Tokenizer:
    """The tokenizer a checkpoint (given as `field`) carries, refused if it has none or more pieces than
    the model has embedding rows."""
    if stream.tokenizer is None:
        raise LlamaZhError(f"{field}: {stream.source} has no tokenizer.model")
    tokenizer = Tokenizer(stream.tokenizer)
    if tokenizer.vocab_size > stream.config.vocab_size:
        raise LlamaZhError(
            f"{stream.tokenizer}: tokenizer has {tokenizer.vocab_size} pieces, the model's vocab_size "
            f"is {stream.config.vocab_size}"
        )
    return tokenizer


def check_seq_len(seq_len: int, config: ModelConfig, field: str) -> None:
    if seq_len > config.max_seq_len:
        raise ConfigError(f"{field}={seq_len} exceeds the model's max_seq_len={config.max_seq_len}")


# ------------------------------------------------------------------------------------- the model


@dataclass
class ModelSource:
    """Where the weights come from: a checkpoint stream, or a random init of `config`."""

    config: ModelConfig
    stream: WeightStream | None = None
    seed: int = 0


class _OneParameterAtATime:
    """Stands in for a ZeRO-3 model in `Transformer.init_weights`: yields each parameter gathered
    whole, and re-partitions it (rank 0's values) before the next, so the init is the plain one."""

    def __init__(self, model: Transformer):
        self.model, self.config = model, model.config

    def named_parameters(self):
        for name, p in self.model.named_parameters():
            with gathered([p], modifier_rank=0):
                yield name, p


def load_partitioned(model: Transformer, stream: WeightStream) -> None:
    """Copy a checkpoint into a ZeRO-3 model one tensor at a time (rank 0 reads; each gather holds
    one full tensor, then it is re-partitioned)."""
    # Shapes are checked against the partitioned parameters' full shapes (a meta-device model built
    # here would be partitioned by zero.Init too).
    params = dict(model.named_parameters())
    for name, (_, shape) in stream.specs.items():
        if name not in params or tuple(getattr(params[name], "ds_shape", params[name].shape)) != tuple(shape):
            raise LlamaZhError(
                f"{stream.source}: tensor {name} {tuple(shape)} does not fit the model "
                f"({tuple(params[name].ds_shape) if name in params else 'no such parameter'})"
            )
    if set(params) != set(stream.specs):
        raise LlamaZhError(f"{stream.source}: missing tensors {', '.join(sorted(set(params) - set(stream.specs))[:4])}")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    names = iter(stream.tensors()) if rank == 0 else ((n, None) for n in stream.specs)
    for name, tensor in names:
        param = model.get_parameter(name)
        with gathered([param], modifier_rank=0), torch.no_grad():
            if rank == 0:
                param.copy_(tensor.to(param.dtype))
        del tensor


def quant_device(on_gpu: bool) -> torch.device:
    """Where a QLoRA base is quantized: the process's training device (bitsandbytes' layers quantize
    as their weights arrive there; CPU rules for nf4 differ from CUDA's)."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_gpu else torch.device("cpu")


def model_builder(
    source: ModelSource, ft: FinetuneConfig, zero3: bool, checkpointing: bool, on_gpu: bool = False
) -> Callable[[], Transformer]:
    """The callable CausalLM.configure_model runs: under ZeRO-3 it runs inside deepspeed.zero.Init,
    so every weight is partitioned as it is created and never exists whole on one process.
    With finetune.base_quant the projections are quantized as the checkpoint streams in, so the
    full-precision model never exists either."""

    def build() -> Transformer:
        measured = reset_peak_rss()
        before = peak_rss()
        model = _build()
        if measured:
            full = source.config.n_params * 4
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            log.info(
                "rank %d: model built, peak RSS growth %.1f MiB (the whole model in fp32: %.1f MiB)",
                rank,
                (peak_rss() - before) / 2**20,
                full / 2**20,
            )
        return model

    def _build() -> Transformer:
        model = _construct()
        if source.stream is not None:  # else a run from a checkpoint is indistinguishable from a random init
            n = sum(math.prod(shape) for _, shape in source.stream.specs.values())
            log.info("loaded weights from %s (%d params)", source.stream.source, n)
        apply_finetune(model, ft)
        if checkpointing:
            enable_activation_checkpointing(model)
        return model.train()

    def _construct() -> Transformer:
        if ft.base_quant is not None:
            model, report = load_quantized_base(source.stream, ft, quant_device(on_gpu))
            log.info("finetune.base_quant: %s", report.summary())
            return model
        if zero3:
            model = Transformer(source.config)  # zero.Init partitions each module as it is constructed
            if source.stream is not None:
                load_partitioned(model, source.stream)
            else:
                Transformer.init_weights(_OneParameterAtATime(model), source.seed)
        elif source.stream is not None:
            model = load_model(source.stream)
        else:
            model = build_model(source.config, seed=source.seed)
        return model

    return build


# -------------------------------------------------------------------------------------- training


def plan_details(config: ModelConfig, probe: Transformer, ft: FinetuneConfig, optim: OptimConfig, on_gpu: bool) -> dict:
    """The memory plan's inputs that depend on the finetune method and the optimizer, from the
    meta-device `probe` (the model as `ft` wraps it): adapter parameters, the QLoRA base's quantized
    projections, the tensors an 8-bit optimizer keeps in 8 bits."""
    from llama_zh.quant import planned_layers

    trainable = [p for p in probe.parameters() if p.requires_grad]
    details = {
        "adapter_params": sum(p.numel() for p in probe.parameters()) - config.n_params,
        "optimizer": optim.name,
        "adapter_saved_per_token": adapter_saved_per_token(probe, ft),
    }
    if ft.method == "prefix":
        from llama_zh.prefix import prefix_saved_bytes

        per_row, per_step = prefix_saved_bytes(config, ft.prefix_len, ft.prefix_hidden)
        details.update(prefix_saved_per_row=per_row, prefix_saved_per_step=per_step)
    if optim.name != "adamw":
        eight = [p.numel() for p in trainable if p.numel() >= MIN_8BIT_SIZE]
        details.update(eight_bit_params=sum(eight), eight_bit_tensors=len(eight))
    if ft.base_quant is not None:
        qcfg = base_quant_config(ft)
        base = build_model(config, device="meta")
        taken = [
            base.get_submodule(name)
            for name, why in planned_layers(base, qcfg, quant_device(on_gpu)).items()
            if why is None
        ]
        details.update(
            base_quant=ft.base_quant,
            quant_blocksize=qcfg.blocksize,
            quantized_layers=len(taken),
            quantized_params=sum(m.out_features * m.in_features for m in taken),
            quantized_rows=sum(m.out_features for m in taken),
        )
    return details


def adapter_saved_per_token(probe: Transformer, ft: FinetuneConfig) -> int:
    """Bytes per token the adapters add to what autograd saves (fp32): each adapter's rank-wide A x,
    and with dropout its own dropped copy of the input (fp32) and mask (bool). Measured with
    saved_tensors_hooks at dim 128/256: dropout 0.05 adds 5 (6 C + F) + 28 r per token and block."""
    if ft.method != "lora":
        return 0
    from llama_zh.finetune import LoRALinear, linear_shape

    total = 0
    for module in probe.modules():
        if isinstance(module, LoRALinear):
            total += 4 * module.rank + (5 * linear_shape(module.base)[1] if ft.dropout > 0 else 0)
    return total


def memory_plan_check(
    settings: TrainSettings, config: ModelConfig, trainable: int, plan: BatchPlan, details: dict | None = None
) -> MemoryPlan:
    strategy, trainer = settings.strategy, settings.trainer
    ds = strategy.deepspeed
    inputs = PlanInputs(
        model=config,
        trainable_params=trainable,
        micro_batch=plan.micro_batch,
        seq_len=plan.seq_len,
        world_size=plan.devices * plan.nodes,
        local_processes=plan.devices,
        precision=str(trainer.precision),
        on_gpu=uses_gpu(trainer),
        zero_stage=zero_stage(strategy),
        ddp=strategy.name == "ddp" or (strategy.name == "auto" and plan.devices * plan.nodes > 1),
        offload_optimizer=bool(ds and ds.offload_optimizer),
        offload_parameters=bool(ds and ds.offload_parameters),
        reduce_bucket_size=int(ds.reduce_bucket_size) if ds else 0,
        activation_checkpointing=bool(strategy.activation_checkpointing),
        **(details or {}),
    )
    memory = plan_memory(inputs)
    available = device_memory_bytes(trainer)
    notes = "".join(
        [
            f", base {inputs.base_quant} ({inputs.quantized_layers} projections)" if inputs.base_quant else "",
            f", optim={inputs.optimizer}" if inputs.optimizer != "adamw" else "",
        ]
    )
    log.info(
        "memory plan per device (model %s, trainer=%s, strategy=%s, micro batch %d x %d tokens%s):\n%s",
        config.name,
        trainer.name,
        strategy.name,
        plan.micro_batch,
        plan.seq_len,
        notes,
        memory.table(available),
    )
    ok, why = fits(memory, available, host_memory_bytes(), inputs.on_gpu)
    if not ok:
        message = (
            f"memory plan: {why}. Lower the micro batch, use strategy=zero3 / zero3_offload or "
            "strategy.activation_checkpointing=true, or set memory_check=false to run anyway"
        )
        if settings.memory_check:
            raise LlamaZhError(message)
        log.warning("%s (memory_check=false: running anyway)", message)
    return memory


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


class TrainResult(float):
    """What a training stage returns: its last val/loss (the objective of a Hydra sweeper such as
    Optuna; nan if it never validated), carrying the final native checkpoint's path."""

    checkpoint: Path

    def __new__(cls, val_loss: float, checkpoint: Path | None = None) -> TrainResult:
        result = super().__new__(cls, val_loss)
        result.checkpoint = checkpoint
        return result

    def __reduce__(self):  # launchers pickle job results back (submitit)
        return TrainResult, (float(self), self.checkpoint)


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
        source_names=job.source_names,
        seed=settings.seed,
        cpu_adam=offloads_optimizer(strategy_cfg),
        flops_per_token=model_flops_per_token(total, config.n_layers, config.dim, job.plan.seq_len, trainable_fraction),
        peak_flops=peak_flops(settings.trainer),
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
    trainer = build_trainer(settings, [state, native, MemoryReport(memory)], hparams, job.plan, resume_step)
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


def progress_callbacks(settings: TrainSettings, enable_bar: bool) -> list[pl.Callback]:
    """The progress bar (labelled in optimizer steps) and, where no bar is seen (stdout not a
    terminal, or the bar turned off), periodic progress lines in the log."""
    callbacks: list[pl.Callback] = [step_progress_bar()] if enable_bar else []
    if not enable_bar or not sys.stdout.isatty():
        every_s, every_n = float(settings.log_progress_every_s), int(settings.log_progress_every_n_steps)
        callbacks.append(ProgressLog(every_s, every_n))
    return callbacks


def build_trainer(
    settings: TrainSettings,
    callbacks: list[pl.Callback],
    extra_hparams: dict | None = None,
    plan: BatchPlan | None = None,
    resume_step: int | None = None,
) -> pl.Trainer:
    out = output_dir(settings.output_dir)
    quiet_library_warnings()
    args = lightning_args(settings.trainer)
    if plan is not None:
        args["accumulate_grad_batches"] = plan.accumulation
    args["strategy"] = build_strategy(settings.strategy, plan.micro_batch if plan else 1)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # the other processes of a node wait for its build
        announce_jit_builds(settings.strategy, uses_gpu(settings.trainer))
    callbacks = callbacks + progress_callbacks(settings, bool(args["enable_progress_bar"]))
    loggers = build_loggers(settings.tracking, out, extra_hparams, resume_step)
    return pl.Trainer(
        **args, logger=loggers, callbacks=callbacks, default_root_dir=str(out), enable_checkpointing=False
    )
