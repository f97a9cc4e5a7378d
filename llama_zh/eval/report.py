"""Eval results as flat metrics, markdown tables, and the comparison table of a multirun sweep.

A sweep's jobs run one after another (or in parallel with another launcher) and none knows it is the
last, so each job, when done, drops its summary in `<sweep dir>/eval_jobs/<job>.json` and rewrites
`<sweep dir>/comparison.md` (and .json) from every summary there: after the last job the table holds
them all. Ratios compare each job with the quant=none job that has the same other overrides.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

HEADLINE = {  # metric key -> column title, in table order
    "perplexity/all/ppl": "ppl (all)",
    "rolling_perplexity/all/bits_per_byte": "bits/byte (all)",
    "mc/accuracy": "mc acc",
    "mc/acc_norm": "mc acc_norm",
    "classification/accuracy": "cls acc",
    "generation/exact_match": "EM",
    "generation/rouge_l": "ROUGE-L",
}


def quant_ratio(metrics: dict, base: dict, key: str) -> float:
    """`key` of a quantized run over the same job's quant=none run; nan where either lacks it."""
    return metrics[key] / base[key] if key in metrics and base.get(key) else float("nan")


def result_metrics(report: dict) -> dict:
    """Flat {name: value} of a report of stage=eval."""
    m: dict = {}
    for source, r in report.get("perplexity", {}).items():
        if isinstance(r, dict):
            m[f"perplexity/{source}/ppl"] = r["ppl"]
            m[f"perplexity/{source}/loss"] = r["loss"]
            m[f"perplexity/{source}/tokens"] = r["tokens"]
    for source, r in report.get("rolling_perplexity", {}).items():
        for k in ("bits_per_byte", "byte_perplexity", "word_perplexity", "token_perplexity", "documents"):
            m[f"rolling_perplexity/{source}/{k}"] = r[k]
    for task, keys in (
        ("mc", ("accuracy", "acc_norm", "acc_norm_bytes", "n")),
        ("classification", ("accuracy", "n")),
        ("generation", ("exact_match", "rouge_l", "n")),
    ):
        for k in keys:
            if k in report.get(task, {}):
                m[f"{task}/{k}"] = report[task][k]
    if "mc" in report:
        m["mc/scoring"] = report["mc"].get("scoring", "letter")
    q = report.get("quant", {})
    if q:
        m["quant"] = q["method"]
        m["weight_mib"] = q["weight_mib"]
        m["weight_ratio_to_unquantized"] = q["weight_ratio"]
        m["layers_quantized"] = q["layers_quantized"]
        m["layers_skipped"] = q["layers_skipped"]
    if "speed" in report:
        m["decode_tokens_per_s"] = report["speed"]["decode_tokens_per_s"]
    return m


def _fmt(v) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def markdown_table(columns: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in columns]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=False)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + " |" for r in cells[1:]]
    return "\n".join(lines)


def common_overrides(jobs: list[dict]) -> list[str]:
    """The overrides every job shares (shown once, above the table)."""
    if not jobs:
        return []
    return [o for o in jobs[0]["overrides"] if all(o in j["overrides"] for j in jobs[1:])]


def comparison_table(jobs: list[dict]) -> tuple[list[str], list[list]]:
    """Columns and rows: one row per job (the overrides it does not share with every job), headline
    metrics, weight memory and decode speed, with ratios to the quant=none job of the same other overrides."""
    common = set(common_overrides(jobs))
    metrics = [k for k in HEADLINE if any(k in j["metrics"] for j in jobs)]
    columns = [
        "job",
        "overrides",
        "quant",
        *[HEADLINE[k] for k in metrics],
        "weight MiB",
        "weight / none",
        "decode tok/s",
        "tok/s / none",
    ]
    baseline = {j["others"]: j["metrics"] for j in jobs if j["metrics"].get("quant") == "none"}
    rows = []
    for j in jobs:
        m, base = j["metrics"], baseline.get(j["others"], {})
        ratio = functools.partial(quant_ratio, m, base)
        own = " ".join(o for o in j["overrides"] if o not in common)
        rows.append(
            [
                j["job"],
                own or "-",
                m.get("quant", "?"),
                *[m.get(k, float("nan")) for k in metrics],
                m.get("weight_mib", float("nan")),
                ratio("weight_mib"),
                m.get("decode_tokens_per_s", float("nan")),
                ratio("decode_tokens_per_s"),
            ]
        )
    return columns, rows


@dataclass
class SweepJob:
    """One job of a multirun: the sweep's directory, the job's number and its command-line overrides."""

    dir: Path
    num: int
    overrides: list[str]


def write_comparison(results_file: Path, report: dict, sweep_job: SweepJob | None) -> Path | None:
    """In a multirun (`sweep_job` given): record this job and rewrite the sweep's comparison table; else None."""
    if sweep_job is None:
        return None
    sweep = Path(sweep_job.dir)
    overrides = list(sweep_job.overrides)
    others = " ".join(o for o in overrides if not o.startswith(("quant=", "quant.")))
    job = {
        "job": sweep_job.num,
        "overrides": overrides,
        "others": others,
        "results": str(results_file),
        "metrics": result_metrics(report),
    }
    jobs_dir = sweep / "eval_jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    tmp = jobs_dir / f".{sweep_job.num}.json.tmp"
    tmp.write_text(json.dumps(job, ensure_ascii=False, indent=2, allow_nan=True))
    os.replace(tmp, jobs_dir / f"{sweep_job.num}.json")

    jobs = sorted((json.loads(p.read_text()) for p in jobs_dir.glob("*.json")), key=lambda j: j["job"])
    columns, rows = comparison_table(jobs)
    table = markdown_table(columns, rows)
    out = sweep / "comparison.md"
    shared = " ".join(common_overrides(jobs)) or "-"
    text = (
        f"# stage=eval sweep: {len(jobs)} job(s)\n\nOverrides of every job: `{shared}`\n\n{table}\n\n"
        "weight MiB: weights as loaded (quantized layers with their scales); ratios are to the quant=none job "
        "with the same other overrides; decode tok/s: greedy, batch 1 (stage.speed_probe_tokens).\n"
    )
    data = json.dumps({"common_overrides": shared, "columns": columns, "rows": rows}, ensure_ascii=False, indent=2)
    for path, content in ((out, text), (sweep / "comparison.json", data)):
        tmp = path.with_name(f".{path.name}.{sweep_job.num}.tmp")
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, path)
    log.info("sweep comparison (%d jobs):\n%s", len(jobs), table)
    return out
