"""Training memory and speed of LoRA on an fp32 base vs QLoRA (nf4 / int8 base), each with AdamW and
8-bit AdamW, at the 134M shape of experiments/train_throughput.py (hidden 768, 12 layers, ffn 2048,
vocab 32000; seq 256 x batch 4), on CPU.

A random fp32 checkpoint of that shape is written once; each configuration then runs in a fresh
subprocess (so that one's freed memory does not hide the next one's peak): it loads the base as
training does (`load_model`, or `finetune.load_quantized_base` streaming and quantizing it), wraps it
with adapters (rank 8, alpha 32, the seven projections, no modules_to_save unless --saved), builds
the optimizer as `CausalLM.configure_optimizers` does, and runs warmup + timed steps of the
production loss (`CausalLM.loss`), backward, optimizer step.

Memory: peak RSS growth, i.e. VmHWM at the end minus VmRSS right before the checkpoint is read (the
imports excluded; VmHWM reset there through /proc/self/clear_refs), in MiB. Also printed: the bytes
of the weights as held (`quant.weight_bytes`) and of the optimizer state after the steps, and the
memory plan's params + grads + optimizer + activations for the same run (llama_zh.train.memory_plan).
Speed: tokens/s over the timed steps. Configurations alternate in rounds (A B C ... A B C ...) so
that load from other processes on a shared machine hits all alike; figures are medians over rounds.

From the repository root:

    python -m experiments.qlora_memory                 # 2 rounds, 1 warmup + 3 timed steps
    python -m experiments.qlora_memory --rounds 1 --steps 2 --batch 1 --saved embed,head
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = [
    ("fp32", "adamw"),
    ("fp32", "adamw8bit"),
    ("nf4", "adamw"),
    ("nf4", "adamw8bit"),
    ("int8", "adamw"),
    ("int8", "adamw8bit"),
]


def shape(batch: int = 4):
    from llama_zh.config import ModelConfig

    return (
        ModelConfig(name="134m", vocab_size=32000, dim=768, n_layers=12, n_heads=12, ffn_dim=2048, max_seq_len=512),
        256,
        batch,
    )


def write_checkpoint(path: Path) -> None:
    from llama_zh.checkpoint import save_checkpoint
    from llama_zh.model import build_model

    config, _, _ = shape()
    save_checkpoint(build_model(config, seed=0), path)


def run_one(args) -> dict:
    """One configuration, in this process; returns its figures."""
    import logging
    import warnings

    import torch

    from llama_zh.checkpoint import load_model, read_native
    from llama_zh.model import build_model
    from llama_zh.quant import weight_bytes
    from llama_zh.train.finetune import FinetuneConfig, apply_finetune, count_trainable, load_quantized_base
    from llama_zh.train.memory_check import plan_details
    from llama_zh.train.memory_plan import PlanInputs, current_rss, peak_rss, plan_memory, reset_peak_rss
    from llama_zh.train.module import CausalLM, OptimConfig

    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    config, seq, batch = shape(args.batch)
    saved = [s for s in args.saved.split(",") if s]
    ft = FinetuneConfig(
        method="lora",
        rank=8,
        alpha=32,
        dropout=0.05,
        modules_to_save=saved,
        base_quant=None if args.base == "fp32" else args.base,
    )
    optim = OptimConfig(name=args.optim, lr=1e-4, weight_decay=0.1, warmup_steps=0)
    g = torch.Generator().manual_seed(0)
    windows = [
        torch.randint(0, config.vocab_size, (batch, seq + 1), generator=g) for _ in range(args.warmup + args.steps)
    ]
    data = [{"input_ids": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous()} for w in windows]

    reset_peak_rss()
    before = current_rss()
    stream = read_native(Path(args.checkpoint))
    model = load_model(stream) if ft.base_quant is None else load_quantized_base(stream, ft)[0]
    apply_finetune(model, ft).train()
    module = CausalLM(model, optim, total_steps=100)
    optimizer = module.configure_optimizers()["optimizer"]
    loaded = peak_rss() - before
    times = []
    for b in data:
        start = time.perf_counter()
        loss = module.loss(b)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - start)
    peak = peak_rss() - before
    state = sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t) and t.dim() > 0
    )
    probe = apply_finetune(build_model(config, device="meta"), ft)
    trainable, _ = count_trainable(probe)
    plan = plan_memory(
        PlanInputs(
            model=config,
            trainable_params=trainable,
            micro_batch=batch,
            seq_len=seq,
            world_size=1,
            local_processes=1,
            precision="32-true",
            on_gpu=False,
            **plan_details(config, probe, ft, optim, on_gpu=False),
        ),
        runtime_bytes=0,
    )
    timed = times[args.warmup :]
    return {
        "peak_mib": peak / 2**20,
        "loaded_mib": loaded / 2**20,
        "weights_mib": weight_bytes(model) / 2**20,
        "optimizer_mib": state / 2**20,
        "planned_mib": plan.device_total / 2**20,
        "tokens_per_s": batch * seq * len(timed) / sum(timed),
        "trainable": trainable,
        "loss": float(loss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4, help="micro batch (sequences of 256 tokens)")
    parser.add_argument("--saved", default="", help="finetune.modules_to_save, comma-separated (default: none)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--optim", default="adamw", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return

    import torch

    load = os.getloadavg()
    print(
        f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; python "
        f"{platform.python_version()}; torch {torch.__version__}; {os.cpu_count()} CPUs, {torch.get_num_threads()} "
        f"threads; load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (a shared machine)"
    )
    config, seq, batch = shape(args.batch)
    print(
        f"shape 134m ({config.n_params / 1e6:.1f}M params), seq {seq} x batch {batch}; LoRA rank 8 on the seven "
        f"projections; modules_to_save [{args.saved}]; {args.warmup} warmup + {args.steps} timed steps; "
        f"{args.rounds} round(s)"
    )
    results: dict[tuple[str, str], list[dict]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "base"
        write_checkpoint(ckpt)
        for _ in range(args.rounds):
            for base, optim in CONFIGS:
                cmd = [
                    sys.executable,
                    "-m",
                    "experiments.qlora_memory",
                    "--one",
                    "--base",
                    base,
                    "--optim",
                    optim,
                    "--checkpoint",
                    str(ckpt),
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                    "--saved",
                    args.saved,
                    "--batch",
                    str(args.batch),
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                line = next(x for x in out.splitlines() if x.startswith("RESULT "))
                results[(base, optim)].append(json.loads(line[len("RESULT ") :]))
                print(f"  {base:5} {optim:10} {results[(base, optim)][-1]}", file=sys.stderr, flush=True)
    reference = statistics.median(r["peak_mib"] for r in results[("fp32", "adamw")])
    print()
    print(
        "| base | optimizer | peak RSS growth MiB | vs LoRA fp32 + AdamW | weights MiB | optimizer state MiB | "
        "planned MiB | tokens/s | rounds (peak MiB / tok/s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for base, optim in CONFIGS:
        rs = results[(base, optim)]
        columns = ("peak_mib", "weights_mib", "optimizer_mib", "planned_mib", "tokens_per_s")
        med = {k: statistics.median(r[k] for r in rs) for k in columns}
        rounds = " ".join(f"{r['peak_mib']:.0f}/{r['tokens_per_s']:.0f}" for r in rs)
        print(
            f"| {base} | {optim} | {med['peak_mib']:.0f} | {med['peak_mib'] / reference:.2f}x | "
            f"{med['weights_mib']:.0f} | {med['optimizer_mib']:.1f} | {med['planned_mib']:.0f} | "
            f"{med['tokens_per_s']:.0f} | {rounds} |"
        )
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
