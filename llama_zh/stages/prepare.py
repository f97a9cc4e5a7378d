"""stage=prepare: build the corpus, tokenizer and token shards of data= ahead of training, with a summary."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from llama_zh.atomic import write_text
from llama_zh.data.packing import PackResult
from llama_zh.data.prepare import build_corpus, build_shards, corpus_dir, ensure_tokenizer, packed_dir, packing_options
from llama_zh.stages import data_slice, tokenizer_slice

log = logging.getLogger(__name__)
COUNTS = ("read", "kept", "train", "val", "empty", "too_short", "too_long", "duplicates", "bad_utf8")


def run(cfg: DictConfig):
    began = time.perf_counter()
    data = data_slice(cfg)
    reports = build_corpus(data)  # first, so the summary can tell what this run built
    tokenizer = ensure_tokenizer(tokenizer_slice(cfg), data)
    shards = build_shards(data, tokenizer)
    summary = {
        "data": data.name,
        "tokenizer": str(tokenizer.path),
        "tokenizer_sha256": tokenizer.sha256(),
        "corpus_dir": str(corpus_dir(data)),
        "shard_dir": str(packed_dir(data, tokenizer)),
        "num_proc": packing_options(data)[0],
        "seconds": round(time.perf_counter() - began, 3),
        "corpus": {name: corpus_row(r) for name, r in reports.items()},
        "shards": {split: {name: shard_row(r) for name, r in by_source.items()} for split, by_source in shards.items()},
    }
    log.info("summary:\n%s", format_summary(summary))
    out = Path(cfg.stage.summary)
    write_text(out, json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


def corpus_row(report: dict) -> dict:
    row = {k: report["counts"][k] for k in COUNTS}
    row.update(
        input_mb=report["input_bytes"] / 1e6,
        seconds=report["seconds"],
        reused=report["reused"],
        bad_utf8_lines=report["counts"]["bad_utf8_lines"],
    )
    return row


def shard_row(result: PackResult) -> dict:
    seconds = max(result.seconds, 1e-9)
    return {
        "documents": result.documents,
        "tokens": result.tokens,
        "shards": len(result.shards),
        "reused_shards": result.reused_shards,
        "packed_mb": result.bytes_packed / 1e6,
        "seconds": result.seconds,
        "mb_per_s": result.bytes_packed / 1e6 / seconds if result.bytes_packed else None,
        "tokens_per_s": result.tokens_packed / seconds if result.bytes_packed else None,
    }


def _table(header: list[str], rows: list[list], text_columns: int = 1) -> str:
    """Aligned columns: the first `text_columns` to the left, figures to the right."""
    cells = [header] + [
        [f"{v:,}" if isinstance(v, int) else f"{v:.2f}" if isinstance(v, float) else str(v) for v in row]
        for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False))
        )
        for r in cells
    )


def format_summary(s: dict) -> str:
    corpus_rows = [
        [
            name,
            *(r[k] for k in COUNTS),
            r["input_mb"],
            "reused" if r["reused"] else r["input_mb"] / max(r["seconds"], 1e-9),
        ]
        for name, r in s["corpus"].items()
    ]
    shard_rows, total = (
        [],
        {"documents": 0, "tokens": 0, "shards": 0, "packed_mb": 0.0, "seconds": 0.0, "tokens_packed": 0},
    )
    for split, by_source in s["shards"].items():
        for name, r in by_source.items():
            packed = r["packed_mb"] > 0
            shard_rows.append(
                [
                    name,
                    split,
                    r["documents"],
                    r["tokens"],
                    r["shards"],
                    r["reused_shards"],
                    r["packed_mb"],
                    r["mb_per_s"] if packed else "-",
                    round(r["tokens_per_s"]) if packed else "-",
                ]
            )
            for k in ("documents", "tokens", "shards", "packed_mb", "seconds"):
                total[k] += r[k]
            total["tokens_packed"] += round(r["tokens_per_s"] * r["seconds"]) if packed else 0
    seconds = max(total["seconds"], 1e-9)
    packed = total["packed_mb"] > 0
    shard_rows.append(
        [
            "total",
            "",
            total["documents"],
            total["tokens"],
            total["shards"],
            "",
            total["packed_mb"],
            total["packed_mb"] / seconds if packed else "-",
            round(total["tokens_packed"] / seconds) if packed else "-",
        ]
    )
    return "\n".join(
        [
            f"corpus {s['data']} ({s['corpus_dir']}); MB = 10^6 bytes",
            _table(["source", *COUNTS, "input MB", "MB/s"], corpus_rows),
            f"token shards ({s['shard_dir']}; tokenizer {s['tokenizer']}, {s['num_proc']} processes)",
            _table(
                ["source", "split", "documents", "tokens", "shards", "reused", "packed MB", "MB/s", "tokens/s"],
                shard_rows,
                text_columns=2,
            ),
            f"prepared in {s['seconds']:.1f} s",
        ]
    )
