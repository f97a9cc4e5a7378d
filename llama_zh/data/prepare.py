"""On-demand preparation of a `data=` choice: split corpus, tokenizer, packed token shards.

Layout under the data directory (`data.dir`):
    corpus/<source>.{train,val}.txt        cleaned documents, held-out split by content hash
    corpus/<source>.report.json            counts, options and inputs; present only once the source is complete
    tok-<sha12>/<source>.<split>.NNNNN.bin token shards for the tokenizer with that sha256 prefix (+ .json index)
    tok-<sha12>/<source>.<split>.json      the shard manifest; present only once every shard is complete
Each step is skipped when its output is complete and still matches its inputs (a source whose
options or input files changed is rebuilt, and its shards with it), so a second run starts at once.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_zh.data.corpus import SPLITS, DataError, Source, corpus_file, report_file, source_from_block, write_source
from llama_zh.data.mix import check_source_weights
from llama_zh.data.packing import BlockEncoder, PackResult, pack_corpus_file
from llama_zh.tokenizer import Tokenizer, TokenizerError, train_sentencepiece

log = logging.getLogger(__name__)


@dataclass
class PackingConfig:
    num_proc: int | None = None  # tokenizer processes; None: min(4, CPU count)
    shard_tokens: int = 50_000_000  # a shard closes at the first document end at or past this many tokens


@dataclass
class DataConfig:
    """The `data=` slice. The defaults are llama_zh/conf/data/sample_zh.yaml's (a test checks that they agree);
    `sources` stays plain data, one block per source the user names (see `sources_of`)."""

    name: str
    dir: str
    sources: dict[str, dict[str, Any]]
    holdout_modulus: int = 10
    train_sources: list[str] | None = None  # the sources training draws from; None: all
    packing: PackingConfig = field(default_factory=PackingConfig)
    seq_len: int = 256
    batch_size: int = 8  # per device
    num_workers: int = 0
    raw_dir: str | None = None  # where a recipe's `files` point (interpolated into them), read by no code


@dataclass
class TokenizerConfig:
    """The `tokenizer=` slice: a tokenizer file, trained on data= the first time if `train` (sentencepiece's
    options) is set."""

    name: str
    path: str
    train: dict[str, Any] | None


def sources_of(data_cfg: DataConfig) -> list[Source]:
    if not data_cfg.sources:
        raise DataError(f"data.sources: the data config {data_cfg.name!r} lists no sources")
    check_source_weights(data_cfg.sources)  # here, before any corpus is built: every stage reads its sources so
    return [source_from_block(name, block) for name, block in data_cfg.sources.items()]


def corpus_dir(data_cfg: DataConfig) -> Path:
    return Path(data_cfg.dir) / "corpus"


def _current_report(directory: Path, source: Source, holdout_modulus: int) -> dict | None:
    """The source's report if its split files are complete and built from the same options and inputs."""
    try:
        report = json.loads(report_file(directory, source.name).read_text())
    except (OSError, ValueError):
        return None
    fingerprint = source.fingerprint(holdout_modulus)
    if any(report.get(k) != v for k, v in fingerprint.items()):
        return None
    for split in SPLITS:
        path = corpus_file(directory, source.name, split)
        if not path.is_file() or path.stat().st_size != report["outputs"][split]["bytes"]:
            return None
    return report


def build_corpus(data_cfg: DataConfig, require_train: bool = True) -> dict[str, dict]:
    """Every source's report, (re)writing the sources whose corpus is missing or stale; `reused` says which.

    require_train off: a source may be all held out (evaluation needs only that split)."""
    directory = corpus_dir(data_cfg)
    holdout = data_cfg.holdout_modulus
    reports = {}
    for source in sources_of(data_cfg):
        report = _current_report(directory, source, holdout)
        reused = report is not None
        if not reused:
            log.info("building corpus %s/%s in %s", data_cfg.name, source.name, directory)
            report = write_source(source, directory, holdout, require_train)
        elif require_train and report["outputs"]["train"]["documents"] == 0:  # written by an eval run
            c = report["counts"]
            raise DataError(
                f"source {source.name!r} ({', '.join(source.files)}): no documents to train on "
                f"(train 0, val {c['val']}; data.holdout_modulus={holdout})"
            )
        reports[source.name] = {**report, "reused": reused}
    return reports


def prepare_corpus(data_cfg: DataConfig) -> Path:
    build_corpus(data_cfg)
    return corpus_dir(data_cfg)


def ensure_tokenizer(tok_cfg: TokenizerConfig, data_cfg: DataConfig) -> Tokenizer:
    """The configured tokenizer; trained on the data's training split the first time if `tokenizer.train` is set."""
    path = Path(tok_cfg.path)
    if path.is_file():
        return Tokenizer(path)
    if not tok_cfg.train:
        raise TokenizerError(f"tokenizer.path: {path} does not exist")
    corpus = prepare_corpus(data_cfg)
    train_files = [corpus_file(corpus, s.name, "train") for s in sources_of(data_cfg)]
    # sentencepiece reads comma-separated input files itself.
    log.info("training tokenizer %s (%d pieces) on %s", tok_cfg.name, tok_cfg.train["vocab_size"], data_cfg.name)
    train_sentencepiece(",".join(map(str, train_files)), path, **tok_cfg.train)
    return Tokenizer(path)


def packed_dir(data_cfg: DataConfig, tokenizer: Tokenizer) -> Path:
    return Path(data_cfg.dir) / f"tok-{tokenizer.sha256()[:12]}"


def packing_options(data_cfg: DataConfig) -> tuple[int, int]:
    """(num_proc, shard_tokens) from `data.packing`; num_proc null: min(4, CPU count)."""
    num_proc = data_cfg.packing.num_proc or min(4, os.cpu_count() or 1)
    shard_tokens = data_cfg.packing.shard_tokens
    for key, value in (("num_proc", num_proc), ("shard_tokens", shard_tokens)):
        if not isinstance(value, int) or value < 1:
            raise DataError(f"data.packing.{key}: {value!r}; expected a positive integer")
    return num_proc, shard_tokens


def build_shards(
    data_cfg: DataConfig, tokenizer: Tokenizer, splits: Sequence[str] = SPLITS
) -> dict[str, dict[str, PackResult]]:
    """Token shards per split and source, packing what is missing: {split: {source: PackResult}}."""
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise DataError(f"split {unknown[0]!r}: expected one of {', '.join(SPLITS)}")
    reports = build_corpus(data_cfg, require_train="train" in splits)
    corpus = corpus_dir(data_cfg)
    out_dir = packed_dir(data_cfg, tokenizer)
    num_proc, shard_tokens = packing_options(data_cfg)
    results: dict[str, dict[str, PackResult]] = {split: {} for split in splits}
    with BlockEncoder(tokenizer, num_proc) as encoder:  # its worker processes start only if something is packed
        for name, report in reports.items():
            for split in splits:
                result = pack_corpus_file(
                    corpus_file(corpus, name, split),
                    report["outputs"][split]["sha1"],
                    tokenizer,
                    encoder,
                    out_dir,
                    name,
                    split,
                    shard_tokens,
                )
                if result.bytes_packed:
                    log.info(
                        "packed %s %s: %d shards (%d reused), %d documents, %d tokens; %.1f MB in %.1f s "
                        "(%.1f MB/s, %.0f tokens/s, %d processes)",
                        name,
                        split,
                        len(result.shards),
                        result.reused_shards,
                        result.documents,
                        result.tokens,
                        result.bytes_packed / 1e6,
                        result.seconds,
                        result.bytes_packed / 1e6 / max(result.seconds, 1e-9),
                        result.tokens_packed / max(result.seconds, 1e-9),
                        num_proc,
                    )
                results[split][name] = result
    return results


def prepare_tokens(
    data_cfg: DataConfig, tokenizer: Tokenizer, splits: Sequence[str] = SPLITS
) -> dict[str, dict[str, list[Path]]]:
    """Token shard paths in order per split and source, built if missing: {split: {source: [shards]}}."""
    return {
        split: {name: r.shards for name, r in by_source.items()}
        for split, by_source in build_shards(data_cfg, tokenizer, splits).items()
    }
