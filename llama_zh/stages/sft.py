"""stage=sft: instruction-tune a checkpoint on Alpaca-format records, loss on the response only."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig

from llama_zh.callbacks import NativeCheckpoint
from llama_zh.checkpoint import load_checkpoint
from llama_zh.data.datamodule import InstructionData
from llama_zh.data.sft import Template, build_review_sentiment
from llama_zh.errors import LlamaZhError
from llama_zh.module import CausalLM, OptimConfig
from llama_zh.stages.common import build_trainer, check_seq_len, output_dir

log = logging.getLogger(__name__)


def run(cfg: DictConfig):
    pl.seed_everything(cfg.seed, workers=True)
    model, tokenizer = load_checkpoint(cfg.stage.checkpoint)
    if tokenizer is None:
        raise LlamaZhError(f"stage.checkpoint: {cfg.stage.checkpoint} has no tokenizer.model")
    model.train()
    check_seq_len(cfg.stage.seq_len, model.config, "stage.seq_len")
    train_file = Path(cfg.stage.data) if cfg.stage.data else build_review_sentiment(Path(cfg.paths.data_dir) / "sft_review_sentiment")["train"]
    log.info("instruction data: %s", train_file)
    data = InstructionData(train_file, Template.from_config(cfg.template), tokenizer, cfg.stage.seq_len,
                           cfg.stage.batch_size, cfg.stage.val_fraction, cfg.seed, pack=cfg.stage.pack)
    module = CausalLM(model, OptimConfig(**cfg.optim), total_steps=cfg.trainer.max_steps)
    saver = NativeCheckpoint(output_dir(cfg) / "checkpoints", tokenizer.path, cfg.stage.save_every_n_steps,
                             extra={"stage": "sft", "data": str(train_file)})
    trainer = build_trainer(cfg, [saver], {"n_params": model.config.n_params, "tokenizer_sha256": tokenizer.sha256()})
    trainer.fit(module, datamodule=data)
    log.info("final checkpoint: %s", saver.final)
    return str(saver.final)
