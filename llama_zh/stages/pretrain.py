"""stage=pretrain: train a causal LM on packed tokens of data=, from scratch or from a checkpoint."""

from __future__ import annotations

import logging

import pytorch_lightning as pl
from omegaconf import DictConfig

from llama_zh.checkpoint import read_any
from llama_zh.data.datamodule import PretrainData
from llama_zh.data.prepare import ensure_tokenizer
from llama_zh.errors import LlamaZhError
from llama_zh.stages.common import ModelSource, TrainJob, check_seq_len, fit, model_config, prepare_batch
from llama_zh.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def run(cfg: DictConfig):
    pl.seed_everything(cfg.seed, workers=True)
    plan = prepare_batch(cfg, cfg.data.batch_size, cfg.data.seq_len)
    if cfg.stage.init_from:
        # Only the header is read here: the weights stream in when the model is built (per tensor under ZeRO-3).
        stream = read_any(cfg.stage.init_from)
        if stream.tokenizer is None:
            raise LlamaZhError(f"stage.init_from: {cfg.stage.init_from} has no tokenizer.model")
        tokenizer = Tokenizer(stream.tokenizer)
        source = ModelSource(stream.config, stream, cfg.seed)
    else:
        tokenizer = ensure_tokenizer(cfg.tokenizer, cfg.data)
        source = ModelSource(model_config(cfg.model, tokenizer), None, cfg.seed)
    check_seq_len(cfg.data.seq_len, source.config, "data.seq_len")

    data = PretrainData(cfg.data, tokenizer, seed=cfg.seed)
    data.setup("fit")
    job = TrainJob("pretrain", source, tokenizer, data, plan, source_names=data.source_names,
                   extra={"data": cfg.data.name})
    return fit(cfg, job)  # last val/loss (a sweeper's objective), .checkpoint: the final native checkpoint
