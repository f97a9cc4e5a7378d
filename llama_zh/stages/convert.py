"""stage=convert: any supported checkpoint format to another, streaming tensor by tensor."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from llama_zh.config import ConfigError, ModelConfig, group_defaults
from llama_zh.convert import convert
from llama_zh.stages import chosen

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


ONE_FILE = ("tencentpretrain", "gguf")  # destination formats written as a single file, never sharded


def check_options(cfg: DictConfig) -> None:
    """Options this conversion would ignore are refused, not dropped (the writers' own checks are in
    llama_zh.convert.convert)."""
    stage = cfg.stage
    if stage.dtype is not None and stage.dtype not in DTYPES:
        raise ConfigError(f"stage.dtype: {stage.dtype!r}; expected null or one of {', '.join(DTYPES)}")
    given = chosen("model")
    if given and stage.src_format != "tencentpretrain":
        raise ConfigError(f"{' '.join(given)}: only stage.src_format=tencentpretrain reads model= (a {stage.src_format} "
                          "checkpoint brings its own shape), so it would be ignored; drop it")
    shard_gb = stage.max_shard_gb
    if isinstance(shard_gb, bool) or not isinstance(shard_gb, (int, float)) or not shard_gb > 0:
        raise ConfigError(f"stage.max_shard_gb must be a number > 0, got {shard_gb!r}")
    if stage.dst_format in ONE_FILE and shard_gb != group_defaults("stage", "convert")["max_shard_gb"]:
        raise ConfigError(f"stage.max_shard_gb={shard_gb}: dst_format={stage.dst_format} is written as one file, "
                          "never sharded; drop it")


def run(cfg: DictConfig):
    stage = cfg.stage
    check_options(cfg)
    model = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True), source="model")
    dst = convert(
        Path(stage.src), stage.src_format, Path(stage.dst), stage.dst_format, model=model,
        tokenizer=Path(stage.tokenizer) if stage.tokenizer else None, dtype=DTYPES.get(stage.dtype),
        overwrite=stage.overwrite, max_shard_bytes=int(stage.max_shard_gb * 1024**3),
    )
    log.info("wrote %s (%s)", dst, stage.dst_format)
    return str(dst)
