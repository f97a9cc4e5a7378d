"""The DPO step's table: held-out accuracy and perplexity of the tuned arm before and after preference
tuning, and the last validation rewards of each preference run (from outputs/zh_sentiment).

    python experiments/zh_sentiment/dpo_report.py [--study outputs/zh_sentiment] [--arm mixed]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

# (label, evaluation run dir, preference run dir) relative to the study dir; {arm} is filled in
RUNS = [
    ("sft (before)", "eval/{arm}-none", None),
    ("dpo, lr 3e-5", "dpo_eval/{arm}-none", "dpo/{arm}"),
    ("dpo, lr 1e-5", "dpo_eval/{arm}-lr1e-5-none", "dpo/{arm}-lr1e-5"),
    ("orpo, lr 3e-5", "dpo_eval/{arm}-orpo-none", "dpo/{arm}-orpo"),
]


def last_val(metrics: Path) -> dict[str, float]:
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("val/rewards/accuracy")]
    return {k.removeprefix("val/"): float(v) for k, v in rows[-1].items() if k.startswith("val/") and v}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=Path("outputs/zh_sentiment"))
    parser.add_argument("--arm", default="mixed")
    args = parser.parse_args()
    print(
        "| model | acc. label likelihood | acc. greedy generation | ppl news | ppl reviews "
        "| val reward accuracy | val margin | val chosen reward |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, eval_dir, pref_dir in RUNS:
        path = args.study / eval_dir.format(arm=args.arm) / "eval_results.json"
        if not path.is_file():
            continue
        report = json.loads(path.read_text())
        ppl = report["perplexity"]
        cells = [
            label,
            f"{report['classification']['accuracy']:.2%}",
            f"{report['generation']['exact_match']:.2%}",
            f"{ppl['news']['ppl']:.0f}",
            f"{ppl['reviews']['ppl']:.0f}",
        ]
        if pref_dir:
            val = last_val(args.study / pref_dir.format(arm=args.arm) / "metrics.csv")
            cells += [f"{val['rewards/accuracy']:.3f}", f"{val['rewards/margin']:.2f}", f"{val['rewards/chosen']:.2f}"]
        else:
            cells += ["", "", ""]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
