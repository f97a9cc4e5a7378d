"""The memory plan of a training run, checked before anything is built: its inputs from the run's
settings and from a meta-device probe of the model as the finetune method wraps it, the table it
prints, and the refusal of a run that would not fit (llama_zh.train.memory_plan does the arithmetic)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from llama_zh.config import ModelConfig
from llama_zh.errors import LlamaZhError
from llama_zh.model import Transformer, build_model
from llama_zh.train.build import quant_device
from llama_zh.train.finetune import FinetuneConfig, LoRALinear, base_quant_config, linear_shape
from llama_zh.train.hardware import BatchPlan, device_memory_bytes, host_memory_bytes, uses_gpu
from llama_zh.train.memory_plan import MemoryPlan, PlanInputs, fits, plan_memory
from llama_zh.train.module import MIN_8BIT_SIZE, OptimConfig
from llama_zh.train.strategies import zero_stage

if TYPE_CHECKING:  # fit.py imports this module
    from llama_zh.train.fit import TrainSettings

log = logging.getLogger(__name__)


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
    available = device_memory_bytes(trainer, settings.hardware)
    notes = "".join(
        [
            f", base {inputs.base_quant} ({inputs.quantized_layers} projections)" if inputs.base_quant else "",
            f", optim={inputs.optimizer}" if inputs.optimizer != "adamw" else "",
        ]
    )
    log.info(
        "memory plan per device (model %s, trainer=%s, hardware=%s, strategy=%s, micro batch %d x %d tokens%s):\n%s",
        config.name,
        trainer.name,
        settings.hardware.name,
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
