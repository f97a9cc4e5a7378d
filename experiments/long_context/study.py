"""Long-context continued pretraining: no scaling vs linear, dynamic (NTK) and YaRN RoPE scaling.

The tiny model (llama_zh/conf/model/tiny.yaml) is pretrained from scratch on data=sample_zh with 256-token
sequences (model.max_seq_len=256: its "original context"), then continued from that checkpoint at 1,024
tokens (stage.init_from, model.max_seq_len=1024) four ways for the same number of steps and tokens:

  none     plain RoPE, positions 256..1023 never seen before
  linear   model.rope_scaling {type: linear, factor: 4, original_max_position_embeddings: 256}
  dynamic  the same with type dynamic (NTK: the base grows with the sequence past 256)
  yarn     the same with type yarn (beta_fast 32, beta_slow 1, attention factor 0.1 ln 4 + 1)

Each of the five checkpoints (the base and the four continuations) is then scored with one stage=eval
(stage.lengths=[256,512,1024,2048]) on the held-out split of both sources in back-to-back windows of
each length, over the same first --eval-tokens tokens of each source at every length (so the lengths
differ in context, not in text). 2,048 is past every model's limit: extrapolation.

Every step is `python -m llama_zh ...` in a subprocess, the commands printed as they run. From the
repository root:

    python -m experiments.long_context.study [--workdir DIR] [--base-steps 300] [--steps 150] [--eval-tokens 16384]

Writes results.json, results.md (the table) and results.png (the plot) into experiments/long_context/
(or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LENGTHS = (256, 512, 1024, 2048)
ORIGINAL = 256
LONG = 1024
FACTOR = LONG // ORIGINAL
VARIANTS = {
    "none": None,
    "linear": "linear",
    "dynamic": "dynamic",
    "yarn": "yarn",
}
EVAL_BATCH = 2


def llama_zh(args: list[str], workdir: Path, log: Path) -> float:
    """Run `python -m llama_zh args` with the study's data directory; returns the wall seconds."""
    env = dict(os.environ, WANDB_MODE="offline", LLAMA_ZH_DATA=str(workdir / "data"), PYTHONUNBUFFERED="1")
    print("$ python -m llama_zh " + " ".join(args), flush=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        result = subprocess.run(
            [sys.executable, "-m", "llama_zh", *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}); see {log}:\n" + log.read_text()[-3000:])
    return time.perf_counter() - start


def train(workdir: Path, base_steps: int, steps: int) -> dict[str, Path]:
    """The base checkpoint and one continuation per variant; existing final checkpoints are reused."""
    common = [
        "logger=csv",
        "trainer.enable_progress_bar=false",
        "state_every_n_steps=0",
        "resume=null",
        "trainer.limit_val_batches=4",
    ]
    checkpoints = {}
    base = workdir / "base"
    if not (base / "checkpoints" / "final").is_dir():
        seconds = llama_zh(
            [
                "stage=pretrain",
                "model=tiny",
                f"model.max_seq_len={ORIGINAL}",
                f"data.seq_len={ORIGINAL}",
                "data.batch_size=8",
                f"trainer.max_steps={base_steps}",
                f"trainer.val_check_interval={base_steps}",
                *common,
                f"hydra.run.dir={base}",
            ],
            workdir,
            workdir / "base.log",
        )
        print(f"  base: {seconds:.0f} s", flush=True)
    checkpoints["base"] = base / "checkpoints" / "final"
    for name, kind in VARIANTS.items():
        run = workdir / name
        if not (run / "checkpoints" / "final").is_dir():
            rope = (
                [
                    f"model.rope_scaling={{type:{kind},factor:{float(FACTOR)},original_max_position_embeddings:{ORIGINAL}}}"
                ]
                if kind
                else []
            )
            # batch 2 x 1024 = 8 x 256: the continuation sees as many tokens per step as the base did
            seconds = llama_zh(
                [
                    "stage=pretrain",
                    f"stage.init_from={checkpoints['base']}",
                    *rope,
                    f"model.max_seq_len={LONG}",
                    f"data.seq_len={LONG}",
                    "data.batch_size=2",
                    f"trainer.max_steps={steps}",
                    f"trainer.val_check_interval={steps}",
                    "optim.warmup_steps=10",
                    *common,
                    f"hydra.run.dir={run}",
                ],
                workdir,
                workdir / f"{name}.log",
            )
            print(f"  {name}: {seconds:.0f} s", flush=True)
        checkpoints[name] = run / "checkpoints" / "final"
    return checkpoints


def evaluate(workdir: Path, checkpoints: dict[str, Path], eval_tokens: int) -> dict[str, dict[int, dict]]:
    """{model: {length: the stage's perplexity entries for that length}}: one stage=eval per model, all
    lengths over the same tokens (stage.max_batches counts batches of the longest window)."""
    results = {}
    lengths = ",".join(str(n) for n in LENGTHS)
    batches = max(1, eval_tokens // (EVAL_BATCH * max(LENGTHS)))
    for name, ckpt in checkpoints.items():
        out = workdir / "eval" / f"{name}.json"
        if not out.is_file():
            llama_zh(
                [
                    "stage=eval",
                    f"stage.checkpoint={ckpt}",
                    f"stage.lengths=[{lengths}]",
                    f"stage.max_batches={batches}",
                    f"stage.batch_size={EVAL_BATCH}",
                    "stage.speed_probe_tokens=0",
                    f"stage.output={out}",
                    "logger=csv",
                    f"hydra.run.dir={workdir / 'eval' / name}",
                ],
                workdir,
                workdir / "eval" / f"{name}.log",
            )
        report = json.loads(out.read_text())
        results[name] = {
            n: {k.split("@")[0]: v for k, v in report["perplexity"].items() if k.endswith(f"@{n}")} for n in LENGTHS
        }
        print(f"  {name}: " + ", ".join(f"ppl@{n} {results[name][n]['all']['ppl']:.2f}" for n in LENGTHS), flush=True)
    return results


def table(results: dict[str, dict[int, dict]], source: str = "all") -> str:
    lines = ["| model | " + " | ".join(f"ppl @ {n}" for n in LENGTHS) + " |", "|---|" + "---:|" * len(LENGTHS)]
    for name, by_length in results.items():
        label = "base (256, no scaling)" if name == "base" else f"{name} (continued at {LONG})"
        lines.append(f"| {label} | " + " | ".join(f"{by_length[n][source]['ppl']:.2f}" for n in LENGTHS) + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict[int, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_length in results.items():
        ax.plot(
            LENGTHS,
            [by_length[n]["all"]["ppl"] for n in LENGTHS],
            marker="o",
            linestyle="--" if name == "base" else "-",
            label=name,
        )
    ax.axvline(ORIGINAL, color="grey", linewidth=0.8)
    ax.axvline(LONG, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(LENGTHS, [str(n) for n in LENGTHS])
    ax.set_xlabel("evaluation window (tokens)")
    ax.set_ylabel("held-out perplexity (sample_zh, all)")
    ax.set_title(f"tiny: pretrained at {ORIGINAL}, continued at {LONG}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llama_zh-long_context"))
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--base-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens per source at every length")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "eval").mkdir(exist_ok=True)
    print(
        f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; python "
        f"{platform.python_version()}; {os.cpu_count()} CPUs; workdir {args.workdir}",
        flush=True,
    )
    print(
        f"base {args.base_steps} steps x 8 x {ORIGINAL} tokens; continuations {args.steps} steps x 2 x {LONG} tokens; "
        f"eval {args.eval_tokens} tokens per source per length",
        flush=True,
    )
    checkpoints = train(args.workdir, args.base_steps, args.steps)
    results = evaluate(args.workdir, checkpoints, args.eval_tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps(
            {"base_steps": args.base_steps, "steps": args.steps, "eval_tokens": args.eval_tokens, "results": results},
            indent=2,
        )
    )
    text = table(results)
    (args.out / "results.md").write_text(text + "\n")
    plot(results, args.out / "results.png")
    print(text)
    for source in ("news", "reviews"):
        print(f"\n{source}:\n" + table(results, source))


if __name__ == "__main__":
    main()
