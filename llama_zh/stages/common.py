"""What several stages share: the run directory, the model's shape, the Lightning trainer."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from llama_zh.config import ConfigError, ModelConfig
from llama_zh.tokenizer import Tokenizer
from llama_zh.tracking import build_loggers

log = logging.getLogger(__name__)


def output_dir(cfg: DictConfig) -> Path:
    path = Path(cfg.paths.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_config(model_cfg: DictConfig, tokenizer: Tokenizer) -> ModelConfig:
    """The `model=` shape with its vocabulary checked against (or taken from) the tokenizer."""
    config = ModelConfig.from_dict(OmegaConf.to_container(model_cfg, resolve=True), source="model")
    if config.vocab_size is None:
        return config.with_vocab(tokenizer.vocab_size)
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(
            f"model.vocab_size={config.vocab_size} but the tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces"
        )
    return config


def check_seq_len(seq_len: int, config: ModelConfig, field: str) -> None:
    if seq_len > config.max_seq_len:
        raise ConfigError(f"{field}={seq_len} exceeds the model's max_seq_len={config.max_seq_len}")


def build_trainer(cfg: DictConfig, callbacks: list[pl.Callback], extra_hparams: dict | None = None) -> pl.Trainer:
    out = output_dir(cfg)
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    loggers = build_loggers(cfg, out, extra_hparams)
    return pl.Trainer(**trainer_args, logger=loggers, callbacks=callbacks, default_root_dir=str(out),
                      enable_checkpointing=False)
