"""stage=tokenizer: train Chinese pieces on data=, extend a base tokenizer (sentencepiece or byte-level BPE), report,
resize a checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from llama_zh.atomic import write_text
from llama_zh.config import ConfigError
from llama_zh.convert import read_any
from llama_zh.data.corpus import read_documents
from llama_zh.data.prepare import DataConfig, prepare_corpus, sources_of
from llama_zh.stages import data_slice, tracking_slice
from llama_zh.stages.rundir import output_dir
from llama_zh.tensor_io import CheckpointError
from llama_zh.tokenizer import Tokenizer, tokenizer_kind, train_sentencepiece
from llama_zh.tracking import build_loggers
from llama_zh.vocab import (
    INITS,
    check_any_extension,
    extend_bpe_tokenizer,
    extend_tokenizer,
    resize_checkpoint,
    tokenizer_report,
)

log = logging.getLogger(__name__)


def checkpoint_tokenizer(path: str) -> Path:
    tokenizer = read_any(Path(path)).tokenizer
    if tokenizer is None:
        raise CheckpointError(f"stage.resize_checkpoint: {path} has no tokenizer.model or tokenizer.json")
    return tokenizer


def require_extension(base: Path, tokenizer: Path) -> None:
    check_any_extension(base, tokenizer)


def extend_bpe(cfg: DictConfig, data: DataConfig, base: Path, out: Path):
    """A byte-level BPE base (tokenizer.json) extended with merges learned on data='s training split."""
    stage = cfg.stage
    if stage.extra or stage.pad_token:
        raise ConfigError(
            f"stage.extra / stage.pad_token: sentencepiece only; {base} is a tokenizer.json (byte-level "
            f"BPE), extended with merges learned on data="
        )
    corpus = prepare_corpus(data)
    texts = (doc for s in sources_of(data) for doc in read_documents(corpus / f"{s.name}.train.txt"))
    log.info("learning %d-token byte-level BPE merges on %s to extend %s", stage.vocab_size, data.name, base)
    return extend_bpe_tokenizer(base, texts, stage.vocab_size, out, stage.max_new_tokens)


def train_pieces(cfg: DictConfig, data: DataConfig, output: Path) -> Path:
    stage = cfg.stage
    corpus = prepare_corpus(data)
    # sentencepiece reads comma-separated input files itself.
    files = ",".join(str(corpus / f"{s.name}.train.txt") for s in sources_of(data))
    log.info("training a %d-piece %s tokenizer on %s", stage.vocab_size, stage.model_type, data.name)
    return train_sentencepiece(files, output, stage.vocab_size, stage.model_type, stage.character_coverage)


def held_out_report(data: DataConfig, tokenizer: Path, base: Path | None) -> dict[str, dict]:
    corpus = prepare_corpus(data)
    report = {}
    for source in sources_of(data):
        held_out = corpus / f"{source.name}.val.txt"
        report[source.name] = {"tokenizer": tokenizer_report(tokenizer, read_documents(held_out))}
        if base is not None:
            report[source.name]["base"] = tokenizer_report(base, read_documents(held_out))
    return report


def describe(r: dict) -> str:
    return f"{r['tokens_per_char']:.3f} tokens/char, {100 * r['byte_char_share']:.1f}% of characters as bytes"


def run(cfg: DictConfig):
    stage, data = cfg.stage, data_slice(cfg)
    if stage.init not in INITS:
        raise ConfigError(f"stage.init: {stage.init!r}; expected one of {', '.join(INITS)}")
    if stage.tokenizer_model and (stage.extra or stage.pad_token):
        raise ConfigError(
            "stage.tokenizer_model is used as it is, stage.extra and stage.pad_token build a new one: "
            "set one or the other"
        )
    out = Path(stage.output)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_tok = checkpoint_tokenizer(stage.resize_checkpoint) if stage.resize_checkpoint else None
    base = Path(stage.base) if stage.base else checkpoint_tok
    if checkpoint_tok is not None:
        require_extension(checkpoint_tok, base)  # before any training: a wrong base fails at once

    extension = None
    if stage.tokenizer_model:
        tokenizer = Path(stage.tokenizer_model)
        if base is not None:
            require_extension(base, tokenizer)
    elif base is not None and tokenizer_kind(base) == "bpe":
        tokenizer = out / "tokenizer.json"
        extension = extend_bpe(cfg, data, base, out)
        log.info("extended %s: %s", base, extension.to_dict())
    else:
        tokenizer = out / "tokenizer.model"
        extends = base is not None or stage.pad_token is not None
        pieces = (
            Path(stage.extra)
            if stage.extra
            else train_pieces(cfg, data, out / "trained.model" if extends else tokenizer)
        )
        if extends:
            extension = extend_tokenizer(base or pieces, pieces, tokenizer, stage.pad_token)
            log.info("extended %s: %s", base or pieces, extension.to_dict())

    sources = held_out_report(data, tokenizer, base)
    for name, r in sources.items():
        log.info(
            "held-out %s: %s%s",
            name,
            describe(r["tokenizer"]),
            f" (base: {describe(r['base'])})" if "base" in r else "",
        )
    report = {
        "tokenizer": str(tokenizer),
        "vocab_size": Tokenizer(tokenizer).vocab_size,
        "base": str(base) if base else None,
        "extension": extension.to_dict() if extension else None,
        "data": data.name,
        "split": "val",
        "sources": sources,
    }
    path = out / "report.json"
    write_text(path, json.dumps(report, indent=2, ensure_ascii=False))
    metrics = {
        f"tokenizer/{source}/{which}/{k}": v
        for source, r in sources.items()
        for which, m in r.items()
        for k, v in m.items()
    }
    for logger in build_loggers(tracking_slice(cfg), output_dir(cfg)):
        logger.log_metrics(metrics)
        logger.finalize("success")
    log.info("tokenizer %s (%d pieces), report %s", tokenizer, report["vocab_size"], path)

    if stage.resize_checkpoint:
        dst = resize_checkpoint(
            Path(stage.resize_checkpoint),
            tokenizer,
            Path(stage.resize_output),
            stage.init,
            seed=cfg.seed,
            overwrite=stage.overwrite,
        )
        log.info(
            "resized %s to %d pieces (%s init): %s", stage.resize_checkpoint, report["vocab_size"], stage.init, dst
        )
        return {**report, "checkpoint": str(dst)}
    return report
