"""stage=pretrain: train a causal LM on packed tokens of data=, from scratch or from a checkpoint."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from llama_zh.checkpoint import WeightStream
from llama_zh.config import ConfigError, ModelConfig, from_mapping
from llama_zh.convert import read_any
from llama_zh.data.datamodule import PretrainData
from llama_zh.data.prepare import ensure_tokenizer
from llama_zh.errors import LlamaZhError
from llama_zh.stages import chosen, data_slice, model_slice, plain, tokenizer_slice, train_settings
from llama_zh.tokenizer import Tokenizer, file_sha256
from llama_zh.train.build import ModelSource, check_seq_len, model_config
from llama_zh.train.fit import TrainJob, fit, prepare_batch

log = logging.getLogger(__name__)
SHAPE_FIELDS = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "name"]
# What `model.<field>=` may change in a run from stage.init_from: the context the model serves, not the weights.
CONTEXT_FIELDS = ("max_seq_len", "rope_scaling")


def check_init_shape(cfg: DictConfig, stream: WeightStream, given: list[str], context: list[str] = ()) -> None:
    """The checkpoint of stage.init_from brings its shape: a model= the user chose (`given`, the
    overrides that chose it) must agree with it, field by field, except the fields that `context`
    (overrides of CONTEXT_FIELDS) sets; the default model= is replaced."""
    init_from = cfg.stage.init_from
    if not given:
        log.info(
            "stage.init_from: the model's shape is the checkpoint's (%s), not model=%s",
            _shape(stream.config),
            cfg.model.get("name"),
        )
        return
    wanted = model_slice(cfg)
    skip = {_model_field(o) for o in context}
    differ = [
        f"{f} {getattr(wanted, f)} (checkpoint {getattr(stream.config, f)})"
        for f in SHAPE_FIELDS
        if getattr(wanted, f) != getattr(stream.config, f)
        and f not in skip
        and not (f == "vocab_size" and wanted.vocab_size is None)
    ]
    if differ:
        raise ConfigError(
            f"{' '.join(given)} differs from the checkpoint of stage.init_from={init_from}: "
            f"{', '.join(differ)}; drop model= to continue with the checkpoint's shape"
        )


def _model_field(override: str) -> str | None:
    """`rope_scaling` of `model.rope_scaling.factor=4` or `+model.rope_scaling={...}`; None for `model=x`."""
    parts = override.split("=", 1)[0].lstrip("+~").split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "model" else None


def split_context(given: list[str]) -> tuple[list[str], list[str]]:
    """The model overrides that set a CONTEXT_FIELDS key (`model.rope_scaling=...`), and the others."""
    context = [o for o in given if _model_field(o) in CONTEXT_FIELDS]
    return context, [o for o in given if o not in context]


def with_context(cfg: DictConfig, stream: WeightStream, context: list[str]) -> WeightStream:
    """Continued pretraining at a longer context: the checkpoint's config with model.rope_scaling and
    model.max_seq_len as given. Without an explicit max_seq_len a scaling serves its original length
    times its factor (and never less than the checkpoint did)."""
    if not context:
        return stream
    given = {_model_field(o) for o in context}
    values = stream.config.to_dict()
    model = plain(cfg.model)
    for field in given:
        values[field] = model.get(field)
    config = from_mapping(ModelConfig, values, "model", what="field")
    if "max_seq_len" not in given and config.rope_scaling is not None:
        scaling = config.rope_scaling
        extended = int(scaling["original_max_position_embeddings"] * scaling["factor"])
        config = dataclasses.replace(config, max_seq_len=max(config.max_seq_len, extended))
    log.info(
        "stage.init_from: %s on the checkpoint's shape: max_seq_len=%d, rope_scaling=%s",
        " ".join(context),
        config.max_seq_len,
        config.rope_scaling,
    )
    return dataclasses.replace(stream, config=config)


def check_init_tokenizer(cfg: DictConfig, stream: WeightStream, given: list[str]) -> None:
    """The checkpoint's own tokenizer is used; a tokenizer= the user chose is refused unless it is that one."""
    if not given:
        return
    path = OmegaConf.select(cfg, "tokenizer.path", default=None, throw_on_missing=False)
    if path is not None and Path(path).is_file() and file_sha256(path) == file_sha256(stream.tokenizer):
        return
    raise ConfigError(
        f"{' '.join(given)}: stage.init_from={cfg.stage.init_from} trains with the checkpoint's own "
        f"tokenizer ({stream.tokenizer}), not this one; drop tokenizer= (or resize the checkpoint to "
        "it with stage=tokenizer)"
    )


def _shape(config: ModelConfig) -> str:
    return ", ".join(f"{f}={getattr(config, f)}" for f in SHAPE_FIELDS)


def run(cfg: DictConfig):
    settings, data_cfg = train_settings(cfg), data_slice(cfg)
    pl.seed_everything(settings.seed, workers=True)
    plan = prepare_batch(settings, data_cfg.batch_size, data_cfg.seq_len)
    if cfg.stage.init_from:
        # Only the header is read here: the weights stream in when the model is built (per tensor under ZeRO-3).
        stream = read_any(cfg.stage.init_from)
        if stream.tokenizer is None:
            raise LlamaZhError(f"stage.init_from: {cfg.stage.init_from} has no tokenizer.model")
        context, shape = split_context(chosen("model"))
        check_init_shape(cfg, stream, shape, context)
        stream = with_context(cfg, stream, context)
        check_init_tokenizer(cfg, stream, chosen("tokenizer"))
        tokenizer = Tokenizer(stream.tokenizer)
        source = ModelSource(stream.config, stream, settings.seed)
    else:
        tokenizer = ensure_tokenizer(tokenizer_slice(cfg), data_cfg)
        source = ModelSource(model_config(model_slice(cfg), tokenizer), None, settings.seed)
    check_seq_len(data_cfg.seq_len, source.config, "data.seq_len")

    data = PretrainData(data_cfg, tokenizer, seed=settings.seed)
    data.setup("fit")
    job = TrainJob(
        "pretrain", source, tokenizer, data, plan, source_names=data.source_names, extra={"data": data_cfg.name}
    )
    return fit(settings, job)  # last val/loss (a sweeper's objective), .checkpoint: the final native checkpoint
