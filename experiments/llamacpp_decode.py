"""Decode speed of llama_zh vs llama.cpp (llama-cpp-python) on the same weights, batch 1, CPU; and one
table of weight memory and tokens/s for quant=none/int8/nf4 (llama_zh) and the GGUF types (llama.cpp).

For each shape (bench_checkpoints.py: tiny, and 130m = hidden 768, 12 layers, 12 heads, ffn 2048,
vocab 32000) a random-initialised native checkpoint is exported with the stage CLI
(`python -m llama_zh stage=convert stage.dst_format=gguf stage.gguf_type=...`) to each GGUF type.
Then, for each thread count (torch.set_num_threads for llama_zh, n_threads / n_threads_batch for
llama.cpp) and each repeat, every implementation decodes greedily from the same 32-token prompt, in
turn (alternating, so that the load of other processes hits all alike):

- llama_zh quant=none (fp32), int8, nf4 (bitsandbytes): `llama_zh.generate.generate`, temperature 0;
  `--backends torch`: fp32 through stage.backend=torch as well (what auto chose for one row before
  the GEMV kernel), to compare both in one sitting;
- llama.cpp on each GGUF file: `Llama.eval` one token at a time, the argmax of its logits fed back.

decode ms/step = (time for N new tokens - time for 1 new token) / (N - 1): the cached steps alone,
prefill excluded, on both sides (the 1-token time is the best of two). For llama.cpp its own timer
(llama_perf_context: t_eval_ms / n_eval over the N-token run) is printed as a cross-check.
Ratios are medians of the per-repeat ratios. "same tokens": the N greedy ids equal llama_zh fp32's.

    python experiments/llamacpp_decode.py                     # tiny and 130m, 1 and 2 threads, 3 repeats
    python experiments/llamacpp_decode.py --quick             # tiny only, 1 thread, 16 tokens, 1 repeat
    python experiments/llamacpp_decode.py --shapes 130m --threads 1 --repeats 5 --no-quant
    python experiments/llamacpp_decode.py --shapes 130m --threads 1 --types f32 --no-quant --backends torch

Needs llama-cpp-python (see experiments/gguf.md for the build); its build's CPU features are printed,
since they decide llama.cpp's speed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_checkpoints  # noqa: E402

from llama_zh.generate import SamplingConfig, generate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 32


def load_llama_zh(path: Path, method: str, backend: str = "auto"):
    """(model, weight bytes) as the inference stages load it (llama_zh.infer.load, `backend` for one
    row), quantized as `quant=<method>` does."""
    from llama_zh.config import from_mapping, group_defaults
    from llama_zh.infer import load
    from llama_zh.quant import QuantConfig

    quant = from_mapping(QuantConfig, group_defaults("quant", method), "quant")
    model, _, report = load(path, "cpu", torch.float32, quant, backend=backend)
    return model, report.quant.bytes_after


def export_gguf(ckpt: Path, gguf_type: str, workdir: Path) -> Path:
    """`stage=convert` to GGUF in a subprocess (cached: the file is kept and reused)."""
    dst = workdir / f"{ckpt.name}-{gguf_type}.gguf"
    if dst.is_file() and dst.stat().st_mtime > (ckpt / "model_config.yaml").stat().st_mtime:
        return dst
    env = dict(
        os.environ,
        WANDB_MODE="offline",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    args = [
        sys.executable,
        "-m",
        "llama_zh",
        "stage=convert",
        f"stage.src={ckpt}",
        "stage.src_format=native",
        f"stage.dst={dst}",
        "stage.dst_format=gguf",
        f"stage.gguf_type={gguf_type}",
        "stage.overwrite=true",
        f"hydra.run.dir={workdir / 'convert-run'}",
    ]
    result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return dst


class LlamaZh:
    def __init__(self, ckpt: Path, method: str, backend: str = "auto"):
        self.name = "llama_zh fp32" if method == "none" else f"llama_zh {method}"
        if backend != "auto":
            self.name += f" backend={backend}"
        self.model, self.weight_bytes = load_llama_zh(ckpt, method, backend)
        self.threads = None

    def set_threads(self, threads: int) -> None:
        self.threads = threads

    def run(self, prompt: list[int], n: int) -> tuple[list[int], float, float | None]:
        torch.set_num_threads(self.threads)
        start = time.perf_counter()
        ids = generate(self.model, prompt, SamplingConfig(temperature=0.0, max_new_tokens=n))
        return ids, time.perf_counter() - start, None


class LlamaCpp:
    def __init__(self, path: Path, gguf_type: str, n_ctx: int):
        self.name, self.path, self.n_ctx = f"llama.cpp {gguf_type}", path, n_ctx
        self.weight_bytes = path.stat().st_size
        self.llm = None

    def set_threads(self, threads: int) -> None:
        import llama_cpp

        if self.llm is not None:
            self.llm.close()
        self.llm = llama_cpp.Llama(
            str(self.path),
            n_ctx=self.n_ctx,
            n_batch=self.n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=True,
            n_gpu_layers=0,
            verbose=False,
        )

    def run(self, prompt: list[int], n: int) -> tuple[list[int], float, float | None]:
        import llama_cpp

        llm = self.llm
        llm.reset()
        llama_cpp.llama_perf_context_reset(llm.ctx)
        start = time.perf_counter()
        llm.eval(prompt)
        ids: list[int] = []
        for i in range(n):
            ids.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            if i < n - 1:
                llm.eval([ids[-1]])
        seconds = time.perf_counter() - start
        perf = llama_cpp.llama_perf_context(llm.ctx)
        own = perf.t_eval_ms / perf.n_eval if perf.n_eval else None
        return ids, seconds, own

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def bench_shape(shape: str, args) -> list[str]:
    ckpt = bench_checkpoints.checkpoint(args.workdir, shape)
    from llama_zh.tokenizer import Tokenizer

    tokenizer = Tokenizer(ckpt / "tokenizer.model")
    text = "".join(bench_checkpoints.documents("reviews", True)[:20])
    prompt = tokenizer.encode(text, bos=True)[:PROMPT_TOKENS]
    t0 = time.time()
    impls: list = [LlamaZh(ckpt, "none")] + [LlamaZh(ckpt, "none", b) for b in args.backends]
    impls += [LlamaZh(ckpt, m) for m in args.quant]
    files = {t: export_gguf(ckpt, t, args.workdir) for t in args.types}
    impls += [LlamaCpp(path, t, n_ctx=PROMPT_TOKENS + args.new_tokens + 8) for t, path in files.items()]
    n_params = sum(p.numel() for p in impls[0].model.parameters())
    print(
        f"\n### {shape}: {n_params / 1e6:.1f}M parameters ({bench_checkpoints.SHAPES[shape]}); loaded and exported "
        f"in {time.time() - t0:.0f} s; load average {load_average()}",
        flush=True,
    )
    lines = []
    table: dict[int, dict[str, dict]] = {}
    for threads in args.threads:
        for impl in impls:
            impl.set_threads(threads)
            impl.run(prompt, 4)  # warm-up, and the layout for this thread count
        steps = {impl.name: [] for impl in impls}
        own = {impl.name: [] for impl in impls}
        same = {impl.name: True for impl in impls}
        loads = []
        for r in range(args.repeats):
            loads.append(os.getloadavg()[0])
            reference = None
            for impl in impls:
                one = min(impl.run(prompt, 1)[1] for _ in range(2))
                ids, full, own_ms = impl.run(prompt, args.new_tokens)
                reference = ids if reference is None else reference
                same[impl.name] &= ids == reference
                steps[impl.name].append((full - one) / (args.new_tokens - 1))
                if own_ms is not None:
                    own[impl.name].append(own_ms)
            print(
                f"{shape} threads {threads} repeat {r + 1}: "
                + ", ".join(f"{name} {s[-1] * 1e3:.1f}" for name, s in steps.items())
                + f" ms/step; load average {load_average()}",
                flush=True,
            )
        table[threads] = dict(steps=steps, own=own, same=same, loads=loads)

    base, cpp = impls[0].name, "llama.cpp f32"
    lines.append(
        f"\n### {shape}: {n_params / 1e6:.1f}M parameters, batch 1, prompt {len(prompt)} tokens, "
        f"{args.new_tokens} new tokens, median (min-max) of {args.repeats} alternating repeat(s)\n"
    )
    lines.append(
        "| threads | implementation | weight MiB | decode ms/step | llama.cpp own eval ms/token | tokens/s (decode) "
        "| speed vs llama_zh fp32 | speed vs llama.cpp f32 | same tokens |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for threads, data in table.items():
        steps = data["steps"]
        for impl in impls:
            s = steps[impl.name]
            vs_zh = [b / x for b, x in zip(steps[base], s, strict=False)]
            vs_cpp = [c / x for c, x in zip(steps[cpp], s, strict=False)] if cpp in steps else []
            lines.append(
                f"| {threads} | {impl.name} | {impl.weight_bytes / 2**20:.1f} | {spread([x * 1e3 for x in s])} "
                f"| {spread(data['own'][impl.name]) if data['own'][impl.name] else '-'} "
                f"| {statistics.median(1 / x for x in s):.1f} | {spread(vs_zh)}x "
                f"| {spread(vs_cpp) + 'x' if vs_cpp else '-'} | {'yes' if data['same'][impl.name] else 'no'} |"
            )
        lines.append(
            f"| {threads} | (1-minute load average at each repeat: "
            f"{', '.join(f'{x:.2f}' for x in data['loads'])}) | | | | | | | |"
        )
    if cpp in table[args.threads[0]]["steps"]:
        for threads, data in table.items():
            r = [z / c for z, c in zip(data["steps"][base], data["steps"][cpp], strict=False)]
            lines.append(
                f"\n{shape}, {threads} thread(s): llama_zh fp32 ms/step / llama.cpp f32 ms/step = {spread(r)} "
                f"(goal <= 1)"
            )
    for impl in impls:
        if isinstance(impl, LlamaCpp):
            impl.close()
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/llama_zh-serve-bench"))
    ap.add_argument("--shapes", nargs="+", choices=sorted(bench_checkpoints.SHAPES), default=["tiny", "130m"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--types", nargs="+", default=["f32", "f16", "q8_0", "q4_0"])
    ap.add_argument("--quant", nargs="*", default=["int8", "nf4"], help="llama_zh quant= methods besides none")
    ap.add_argument("--no-quant", action="store_const", const=[], dest="quant")
    ap.add_argument(
        "--backends", nargs="*", default=[], choices=["torch", "kernel"], help="fp32 backends to add beside auto's"
    )
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny only, 1 thread, 16 new tokens, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.shapes, args.threads, args.new_tokens, args.repeats = ["tiny"], [1], 16, 1

    import llama_cpp

    args.workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; python "
        f"{platform.python_version()}; torch {torch.__version__}; llama-cpp-python {llama_cpp.__version__} "
        f"({llama_cpp.llama_print_system_info().decode().strip()}); {os.cpu_count()} CPUs; "
        f"load average {load_average()}"
    )
    print(
        f"greedy, batch 1, {args.new_tokens} new tokens after a {PROMPT_TOKENS}-token prompt; threads {args.threads}; "
        f"GGUF {args.types}; llama_zh quant none {' '.join(args.quant)}; {args.repeats} repeat(s)",
        flush=True,
    )
    lines = []
    for shape in args.shapes:
        lines += bench_shape(shape, args)
    print("\n".join(lines))
    print(
        f"\nend {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; "
        f"load average {load_average()}"
    )


if __name__ == "__main__":
    main()
