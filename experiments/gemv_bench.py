"""GB/s of the one-row (and few-row) products of a 130m decoding step, per weight shape: the GEMV
kernel (llama_zh.kernels, AVX-512 and AVX2 paths), the older tile kernel, F.linear on row-major
weights and F.linear on column-major ones (the torch backend's layout for the wide weights).

`gemv` is the library's entry point llama_zh_gemv, so at 3-4 rows the down projection (K 2048) is
the tile kernel's (the GEMV hands rows of long K over to it). `2 MiB pages`: the same kernel on
copies of the weights made by kernels.huge_page_copy, as the loader's kernel backend lays them out.

The weights are those of one 130m step (12 blocks of qkv 2304x768, wo 768x768, gate/up 4096x768,
down 768x2048, and the 32000x768 head: 437 MB of fp32, larger than the caches), each product timed on
its own while a whole step runs in model order, so every weight comes from memory as in decoding.
Methods alternate round by round (the machine is shared); GB/s is weight bytes / time, median of the
rounds with min-max; `sum` (torch.sum over the weight) is a memory-read reference.

    python experiments/gemv_bench.py                        # 1 row, 1 thread, 7 rounds
    python experiments/gemv_bench.py --rows 1 2 4 --rounds 51   # a round takes ~0.5 s per row count
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_zh import kernels  # noqa: E402

BLOCK = {"qkv": (2304, 768), "wo": (768, 768), "gate_up": (4096, 768), "down": (768, 2048)}
HEAD = {"head": (32000, 768)}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def methods(lib, isa: int):
    def c_call(fn, force=None):
        def run(x, w, y):
            if force is not None:
                lib.llama_zh_gemv_force(force)
            M, K = x.shape
            fn(M, w.shape[0], K, x.data_ptr(), K, w.data_ptr(), w.stride(0), y.data_ptr(), w.shape[0], 1)

        return run

    out = {
        "F.linear row": lambda x, w, y: F.linear(x, w),
        "F.linear col": lambda x, w, y: F.linear(x, w),  # same call; the weights are column-major
        "tile kernel": c_call(lib.llama_zh_sgemm_nt),
        "gemv avx2": c_call(lib.llama_zh_gemv, 1),
        "sum": lambda x, w, y: w.sum(),
    }
    if isa == 2:
        out["gemv avx512"] = c_call(lib.llama_zh_gemv, 2)
    out["gemv avx2, 2 MiB pages"] = out["gemv avx2"]
    if isa == 2:
        out["gemv avx512, 2 MiB pages"] = out["gemv avx512"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", type=int, default=[1])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    lib = kernels.load()
    if lib is None:
        sys.exit("the kernel is not available here (see the log): nothing to compare")
    torch.set_num_threads(1)
    isa = lib.llama_zh_gemv_isa()
    gen = torch.Generator().manual_seed(0)
    step = [(name, torch.randn(*shape, generator=gen) * 0.02) for _ in range(12) for name, shape in BLOCK.items()]
    step += [(name, torch.randn(*shape, generator=gen) * 0.02) for name, shape in HEAD.items()]
    column = [(n, w.T.contiguous().T if w.shape[0] >= 4 * w.shape[1] else w) for n, w in step]
    huge = [(n, kernels.huge_page_copy(w)) for n, w in step]  # the kernel backend's layout
    total = sum(w.numel() * 4 for _, w in step)
    print(
        f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; "
        f"torch {torch.__version__}; "
        f"{os.cpu_count()} CPUs; 1 thread; GEMV path {'AVX-512' if isa == 2 else 'AVX2'} available; "
        f"{len(step)} weights, {total / 1e6:.0f} MB; load average {load_average()}",
        flush=True,
    )
    table = methods(lib, isa)
    names = list(BLOCK) + list(HEAD)
    with torch.inference_mode():
        for rows in args.rows:
            xs = {k: torch.randn(rows, k, generator=gen) for k in (768, 2048)}
            ys = {n: torch.empty(rows, n) for n in {s[0] for s in {**BLOCK, **HEAD}.values()}}
            gbs = {m: {n: [] for n in [*names, "step"]} for m in table}
            loads = []
            for r in range(args.rounds):
                loads.append(os.getloadavg()[0])
                order = list(table) if r % 2 == 0 else list(table)[::-1]
                for m in order:
                    weights = column if m == "F.linear col" else huge if "2 MiB" in m else step
                    per = {n: 0.0 for n in names}
                    for n, w in weights:
                        start = time.perf_counter()
                        table[m](xs[w.shape[1]], w, ys[w.shape[0]])
                        per[n] += time.perf_counter() - start
                    for n in names:
                        bytes_ = sum(w.numel() * 4 for k, w in step if k == n)
                        gbs[m][n].append(bytes_ / per[n] / 1e9)
                    gbs[m]["step"].append(sum(per.values()) * 1e3)
            lib.llama_zh_gemv_force(isa)
            print(
                f"\nrows {rows}: GB/s per weight shape (12 weights each, the head once), median (min-max) of "
                f"{args.rounds} rounds; step = the 49 products in ms; load average at each round "
                f"{', '.join(f'{x:.2f}' for x in loads)}\n"
            )
            print(
                "| method | "
                + " | ".join(f"{n} {'x'.join(map(str, {**BLOCK, **HEAD}[n]))}" for n in names)
                + " | step ms |"
            )
            print("|---" * (len(names) + 2) + "|")
            for m in table:
                cells = [f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" for v in (gbs[m][n] for n in names)]
                s = gbs[m]["step"]
                cells.append(f"{statistics.median(s):.2f} ({min(s):.2f}-{max(s):.2f})")
                print(f"| {m} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nend; load average {load_average()}")


if __name__ == "__main__":
    main()
