"""stage=convert: any supported checkpoint format to another, streaming tensor by tensor."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from llama_zh.config import ConfigError, group_defaults
from llama_zh.convert import convert
from llama_zh.convert.registry import ONE_FILE_FORMATS
from llama_zh.dtypes import FLOAT_DTYPES
from llama_zh.stages import chosen, model_slice

log = logging.getLogger(__name__)


def check_options(cfg: DictConfig) -> None:
    """Options this conversion would ignore are refused, not dropped (the writers' own checks are in
    llama_zh.convert.convert)."""
    stage = cfg.stage
    if stage.dtype is not None and stage.dtype not in FLOAT_DTYPES:
        raise ConfigError(f"stage.dtype: {stage.dtype!r}; expected null or one of {', '.join(FLOAT_DTYPES)}")
    given = chosen("model")
    if given and stage.src_format != "tencentpretrain":
        raise ConfigError(
            f"{' '.join(given)}: only stage.src_format=tencentpretrain reads model= (a {stage.src_format} "
            "checkpoint brings its own shape), so it would be ignored; drop it"
        )
    shard_gb = stage.max_shard_gb
    if isinstance(shard_gb, bool) or not isinstance(shard_gb, (int, float)) or not shard_gb > 0:
        raise ConfigError(f"stage.max_shard_gb must be a number > 0, got {shard_gb!r}")
    if stage.dst_format in ONE_FILE_FORMATS and shard_gb != group_defaults("stage", "convert")["max_shard_gb"]:
        raise ConfigError(
            f"stage.max_shard_gb={shard_gb}: dst_format={stage.dst_format} is written as one file, "
            "never sharded; drop it"
        )


def run(cfg: DictConfig):
    stage = cfg.stage
    check_options(cfg)
    if stage.dst_format == "peft" or stage.adapter:
        return _run_peft(stage, cfg)
    model = model_slice(cfg)
    dst = convert(
        Path(stage.src),
        stage.src_format,
        Path(stage.dst),
        stage.dst_format,
        model=model,
        tokenizer=Path(stage.tokenizer) if stage.tokenizer else None,
        dtype=FLOAT_DTYPES.get(stage.dtype),
        overwrite=stage.overwrite,
        max_shard_bytes=int(stage.max_shard_gb * 1024**3),
        template=stage.template,
        gguf_type=stage.gguf_type,
    )
    log.info("wrote %s (%s)", dst, stage.dst_format)
    return {"checkpoint": str(dst), "format": stage.dst_format}


def _run_peft(stage: DictConfig, cfg: DictConfig):
    """dst_format=peft exports a LoRA checkpoint's adapter; stage.adapter merges a PEFT adapter while converting."""
    from llama_zh.convert import peft

    if stage.dst_format == "peft":
        if stage.adapter:
            raise ConfigError("stage.adapter merges an adapter, dst_format=peft exports one: set only one of them")
        if stage.src_format != "native":
            raise ConfigError(
                f"stage.dst_format=peft exports the adapter of a finetune=lora checkpoint: "
                f"set stage.src_format=native (got {stage.src_format!r})"
            )
        dst = peft.export(
            Path(stage.src), Path(stage.dst), dtype=FLOAT_DTYPES.get(stage.dtype), overwrite=stage.overwrite
        )
    else:
        model = model_slice(cfg)
        dst = peft.convert_merged(
            Path(stage.src),
            stage.src_format,
            Path(stage.adapter),
            Path(stage.dst),
            stage.dst_format,
            model=model,
            tokenizer=Path(stage.tokenizer) if stage.tokenizer else None,
            dtype=FLOAT_DTYPES.get(stage.dtype),
            overwrite=stage.overwrite,
            max_shard_bytes=int(stage.max_shard_gb * 1024**3),
        )
    log.info("wrote %s (%s)", dst, stage.dst_format)
    return {"checkpoint": str(dst), "format": stage.dst_format}
