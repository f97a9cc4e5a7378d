"""stage=pretrain: train a causal LM on packed tokens of data=, from scratch or from a checkpoint."""

from __future__ import annotations

import logging

import pytorch_lightning as pl
from omegaconf import DictConfig

from llama_zh.callbacks import NativeCheckpoint
from llama_zh.checkpoint import load_checkpoint
from llama_zh.data.datamodule import PretrainData
from llama_zh.data.prepare import ensure_tokenizer
from llama_zh.errors import LlamaZhError
from llama_zh.model import build_model
from llama_zh.module import CausalLM, OptimConfig
from llama_zh.stages.common import build_trainer, check_seq_len, model_config, output_dir

log = logging.getLogger(__name__)


def run(cfg: DictConfig):
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.stage.init_from:
        model, tokenizer = load_checkpoint(cfg.stage.init_from)
        if tokenizer is None:
            raise LlamaZhError(f"stage.init_from: {cfg.stage.init_from} has no tokenizer.model")
    else:
        tokenizer = ensure_tokenizer(cfg.tokenizer, cfg.data)
        model = build_model(model_config(cfg.model, tokenizer), seed=cfg.seed)
    model.train()
    check_seq_len(cfg.data.seq_len, model.config, "data.seq_len")
    log.info("model %s: %.2fM parameters", model.config.name, model.config.n_params / 1e6)

    data = PretrainData(cfg.data, tokenizer, seed=cfg.seed)
    data.setup("fit")
    module = CausalLM(model, OptimConfig(**cfg.optim), total_steps=cfg.trainer.max_steps, source_names=data.source_names)
    saver = NativeCheckpoint(output_dir(cfg) / "checkpoints", tokenizer.path, cfg.stage.save_every_n_steps,
                             extra={"stage": "pretrain", "data": cfg.data.name})
    trainer = build_trainer(cfg, [saver], {"n_params": model.config.n_params, "tokenizer_sha256": tokenizer.sha256()})
    trainer.fit(module, datamodule=data)
    log.info("final checkpoint: %s", saver.final)
    return str(saver.final)
