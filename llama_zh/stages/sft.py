"""stage=sft: instruction-tune a checkpoint on Alpaca-format records, loss on the response only."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig

from llama_zh.convert import read_any
from llama_zh.data.chat_template import template_record
from llama_zh.data.datamodule import InstructionData
from llama_zh.data.sft import Template, build_review_sentiment
from llama_zh.stages import plain, train_settings
from llama_zh.train.build import ModelSource, check_seq_len, checkpoint_tokenizer
from llama_zh.train.fit import TrainJob, fit, prepare_batch

log = logging.getLogger(__name__)


def run(cfg: DictConfig):
    settings = train_settings(cfg)
    pl.seed_everything(settings.seed, workers=True)
    plan = prepare_batch(settings, cfg.stage.batch_size, cfg.stage.seq_len)
    stream = read_any(cfg.stage.checkpoint)
    tokenizer = checkpoint_tokenizer(stream, "stage.checkpoint")
    check_seq_len(cfg.stage.seq_len, stream.config, "stage.seq_len")
    train_file = (
        Path(cfg.stage.data)
        if cfg.stage.data
        else build_review_sentiment(Path(cfg.paths.data_dir) / "sft_review_sentiment")["train"]
    )
    log.info("instruction data: %s", train_file)
    template = Template.from_config(plain(cfg.template))
    log.info("chat template: %s (recorded in the checkpoints, exported by stage=convert)", template.name)
    data = InstructionData(
        train_file,
        template,
        tokenizer,
        cfg.stage.seq_len,
        cfg.stage.batch_size,
        cfg.stage.val_fraction,
        settings.seed,
        pack=cfg.stage.pack,
    )
    job = TrainJob(
        "sft",
        ModelSource(stream.config, stream, settings.seed),
        tokenizer,
        data,
        plan,
        extra={"data": str(train_file), **template_record(template)},
    )
    return fit(
        settings, job, pack=cfg.stage.pack
    )  # last val/loss (a sweeper's objective), .checkpoint: the final native checkpoint
