"""The small-batch CPU product (llama_zh.kernels) against PyTorch's F.linear (MKL), fp32, cold weights.

For each number of rows (batch x new tokens of a decoding step) and each thread count, times the
products of one decoding step of the 130m shape of experiments/decode_throughput.py (12 blocks of
q/k/v 2304x768, o 768x768, gate/up 4096x768, down 768x2048, and the 32000x768 head: 418 MiB), each
weight read from memory as in decoding (the set is larger than the caches, and a 64 MiB buffer is
written between rounds). Three ways: F.linear on the row-major weights (nn.Linear's layout),
F.linear with the wide weights (out >= 4 x in: gate/up, head) column-major (what the loader stores
for one-row decoding), and the kernel on the row-major weights. Also `sum`: torch.sum over every
weight, a memory-read reference. Best of `--rounds` rounds, rounds of the three ways interleaved.

    python experiments/small_gemm.py                       # rows 1..128, 1 and 2 threads
    python experiments/small_gemm.py --rows 1,8 --threads 1 --rounds 7
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_zh import kernels  # noqa: E402
from llama_zh.infer.swaps import WIDE  # noqa: E402
from llama_zh.infer.swaps import column_major as _column_major  # noqa: E402

BLOCK = [(2304, 768), (768, 768), (4096, 768), (768, 2048)]
SHAPES = BLOCK * 12 + [(32000, 768)]


def step_time(weights, xs, product, rounds: int, evict: torch.Tensor) -> list[float]:
    out = []
    for _ in range(rounds):
        evict.add_(1.0)
        start = time.perf_counter()
        for w in weights:
            product(xs[w.shape[1]], w)
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if kernels.load() is None:
        sys.exit("the kernel is not available here (see the log): nothing to compare")
    kernels.MAX_ROWS = 1 << 30  # measure the kernel at every row count, past where linear() stops using it
    gen = torch.Generator().manual_seed(0)
    rows_major = [torch.randn(n, k, generator=gen) * 0.02 for n, k in SHAPES]
    mixed = [_column_major(w) if w.shape[0] >= WIDE * w.shape[1] else w for w in rows_major]
    evict = torch.zeros(16 << 20)
    mib = sum(w.numel() * 4 for w in rows_major) / 2**20
    print(
        f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; "
        f"python {platform.python_version()}; torch {torch.__version__}; {os.cpu_count()} CPUs; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"products of one 130m decoding step ({len(SHAPES)} weights, {mib:.0f} MiB), fp32, best of {args.rounds}\n")
    print(
        "| threads | rows | F.linear row-major ms | F.linear wide column-major ms | kernel ms | sum ms "
        "| F.linear row / kernel | F.linear col / kernel |"
    )
    print("|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for rows in (int(r) for r in args.rows.split(",")):
                xs = {k: torch.randn(rows, k, generator=gen) for k in (768, 2048)}
                times = {"row": [], "col": [], "kernel": [], "sum": []}
                for _ in range(args.rounds):
                    times["row"] += step_time(rows_major, xs, F.linear, 1, evict)
                    times["col"] += step_time(mixed, xs, F.linear, 1, evict)
                    times["kernel"] += step_time(rows_major, xs, kernels.linear, 1, evict)
                    times["sum"] += step_time(rows_major, xs, lambda x, w: w.sum(), 1, evict)
                best = {k: min(v) * 1e3 for k, v in times.items()}
                print(
                    f"| {threads} | {rows} | {best['row']:.1f} | {best['col']:.1f} | {best['kernel']:.1f} | "
                    f"{best['sum']:.1f} | {best['row'] / best['kernel']:.2f}x | {best['col'] / best['kernel']:.2f}x |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
