"""stage=convert: any supported checkpoint format to another, streaming tensor by tensor."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from llama_zh.config import ConfigError, ModelConfig
from llama_zh.convert import convert

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run(cfg: DictConfig):
    stage = cfg.stage
    if stage.dtype is not None and stage.dtype not in DTYPES:
        raise ConfigError(f"stage.dtype: {stage.dtype!r}; expected null or one of {', '.join(DTYPES)}")
    model = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True), source="model")
    dst = convert(
        Path(stage.src), stage.src_format, Path(stage.dst), stage.dst_format, model=model,
        tokenizer=Path(stage.tokenizer) if stage.tokenizer else None, dtype=DTYPES.get(stage.dtype),
        overwrite=stage.overwrite, max_shard_bytes=int(stage.max_shard_gb * 1024**3), template=stage.get("template"),
        gguf_type=stage.get("gguf_type"),
    )
    log.info("wrote %s (%s)", dst, stage.dst_format)
    return str(dst)
