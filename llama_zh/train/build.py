"""The model a training run trains: its shape, where its weights come from, and the callable that
builds it (inside deepspeed.zero.Init under ZeRO-3, quantized as it streams in under QLoRA)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from llama_zh.checkpoint import WeightStream, load_model
from llama_zh.config import ConfigError, ModelConfig
from llama_zh.errors import LlamaZhError
from llama_zh.model import Transformer, build_model
from llama_zh.tokenizer import Tokenizer
from llama_zh.train.finetune import FinetuneConfig, apply_finetune, load_quantized_base
from llama_zh.train.memory_plan import peak_rss, reset_peak_rss
from llama_zh.train.module import enable_activation_checkpointing
from llama_zh.train.strategies import gathered

log = logging.getLogger(__name__)


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


@dataclass
class ModelSource:
    """Where the weights come from: a checkpoint stream, or a random init of `config`."""

    config: ModelConfig
    stream: WeightStream | None = None
    seed: int = 0


def gathered_one_at_a_time(model: Transformer) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """A ZeRO-3 model's named parameters, each gathered whole while the caller holds it and
    re-partitioned (rank 0's values) before the next: what `Transformer.init_weights` fills, so the
    init is the plain one and no more than one full tensor exists at a time."""
    for name, p in model.named_parameters():
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
                model.init_weights(source.seed, parameters=gathered_one_at_a_time(model))
        elif source.stream is not None:
            model = load_model(source.stream)
        else:
            model = build_model(source.config, seed=source.seed)
        return model

    return build
