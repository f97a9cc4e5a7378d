"""stage=eval: perplexity of a checkpoint on the held-out split of data=, per source and overall."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from llama_zh.checkpoint import load_checkpoint
from llama_zh.data.corpus import SPLITS
from llama_zh.data.datasets import packed_shards
from llama_zh.data.prepare import prepare_tokens
from llama_zh.errors import LlamaZhError
from llama_zh.eval.perplexity import perplexity
from llama_zh.stages.common import check_seq_len, output_dir
from llama_zh.tracking import build_loggers

log = logging.getLogger(__name__)


def run(cfg: DictConfig):
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_checkpoint(cfg.stage.checkpoint)
    if tokenizer is None:
        raise LlamaZhError(f"stage.checkpoint: {cfg.stage.checkpoint} has no tokenizer.model")
    check_seq_len(cfg.data.seq_len, model.config, "data.seq_len")
    if cfg.stage.split not in SPLITS:
        raise LlamaZhError(f"stage.split: {cfg.stage.split!r}; expected one of {', '.join(SPLITS)}")
    files = prepare_tokens(cfg.data, tokenizer, splits=[cfg.stage.split])  # the other split is not tokenized
    results = {}
    for source, shards in files[cfg.stage.split].items():
        dataset = packed_shards(shards, tokenizer, cfg.data.seq_len, f"{source}.{cfg.stage.split}")
        results[source] = perplexity(model, dataset, cfg.stage.batch_size, cfg.stage.max_batches)
        log.info("%s/%s: loss %.4f  ppl %.2f  (%d tokens)", cfg.stage.split, source,
                 results[source]["loss"], results[source]["ppl"], results[source]["tokens"])
    tokens = sum(r["tokens"] for r in results.values())
    loss = sum(r["loss"] * r["tokens"] for r in results.values()) / tokens
    results["all"] = {"loss": loss, "ppl": math.exp(loss), "tokens": tokens}
    log.info("%s/all: loss %.4f  ppl %.2f", cfg.stage.split, loss, math.exp(loss))

    report = {"checkpoint": str(cfg.stage.checkpoint), "data": cfg.data.name, "split": cfg.stage.split,
              "seq_len": cfg.data.seq_len, "perplexity": results}
    out = Path(cfg.stage.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".tmp").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    os.replace(out.with_name(out.name + ".tmp"), out)
    metrics = {f"eval/{cfg.stage.split}/{source}/{k}": v for source, r in results.items() for k, v in r.items()}
    for logger in build_loggers(cfg, output_dir(cfg)):
        logger.log_metrics(metrics)
        logger.finalize("success")
    log.info("results: %s", out)
    return report
