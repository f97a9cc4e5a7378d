"""Serving under load: 16 concurrent streaming clients vs the same 16 requests one at a time, CPU.

The real server (`python -m llama_zh stage=serve`, a subprocess on a free port of 127.0.0.1) serves a
random-initialised checkpoint of the shape (bench_checkpoints.py: 130m = hidden 768, 12 layers,
12 heads, ffn 2048, vocab 32000, with a 32000-piece tokenizer). The clients are the real `openai`
package (AsyncOpenAI, one asyncio loop in this process), each request a streamed `/v1/completions`
with a distinct held-out review as the prompt, temperature 0 and a fixed max_tokens (eos cannot win
the argmax, so every answer has exactly max_tokens tokens; the usage counts are checked).

Each repeat runs both passes on the same server, in alternating order (solo first in even repeats):

- solo: the requests one after another, each alone on the server;
- concurrent: all requests at once (released together), `stage.max_concurrent` = the number of clients.

Printed per pass: aggregate tokens/s = completion tokens / wall time of the pass; time to first token
(TTFT: request sent -> first chunk with text) p50/p95 over the requests; the concurrent/solo ratio of
tokens/s per repeat and the concurrent TTFT p95 / the lone (solo) TTFT p50. Medians and min-max over
repeats. Every concurrent answer is compared with the same prompt's solo answer (greedy: they must be
identical); mismatches are printed.

    python experiments/serve_bench.py                       # 130m, 16 clients, 64 tokens, 3 repeats
    python experiments/serve_bench.py --quick               # tiny, 16 clients, 16 tokens, 1 repeat
    python experiments/serve_bench.py --max-tokens 32 --threads 1
    python experiments/serve_bench.py --prefill-layout padded   # the server's stage.prefill_layout

After the server has stopped, `--floor` (on by default) times the prefill alone, in this process on
the same checkpoint and prompts: each prompt read alone into its slot, and all of them read in one
forward, right-padded and packed. No first token of a burst of simultaneous requests can leave before
its prompt is read, so the batched forward's time over the lone request's TTFT is the least TTFT
p95 ratio any scheduling could reach on this machine.

The server is stopped (SIGTERM, then kill) whatever happens; --deadline bounds the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import queue
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_checkpoints  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Answer:
    prompt: str
    text: str = ""
    ttft: float = float("nan")
    seconds: float = 0.0
    tokens: int = 0
    finish_reason: str | None = None
    chunks: list[str] = field(default_factory=list)


class Server:
    """`python -m llama_zh stage=serve` on 127.0.0.1 and a free port; the address is read from its log."""

    def __init__(
        self,
        checkpoint: Path,
        run_dir: Path,
        clients: int,
        context: int,
        threads: int | None,
        start_timeout: float,
        prefill_layout: str = "auto",
    ):
        env = dict(
            os.environ,
            WANDB_MODE="offline",
            HF_HUB_OFFLINE="1",
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        )
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.args = [
            sys.executable,
            "-m",
            "llama_zh",
            "stage=serve",
            f"stage.checkpoint={checkpoint}",
            "stage.port=0",
            f"stage.max_concurrent={clients}",
            f"stage.context_length={context}",
            f"stage.prefill_layout={prefill_layout}",
            "stage.access_log=false",
            "stage.model_name=bench",
            "trainer=cpu",
            f"hydra.run.dir={run_dir}",
        ]
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
        )
        self.lines: queue.Queue = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + start_timeout
        while not (m := re.search(r"at (http://127\.0\.0\.1:\d+/v1)", "".join(self.log))):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start:\n" + "".join(self.log)[-3000:])
            try:
                self.log.append(self.lines.get(timeout=0.5))
            except queue.Empty:
                pass
        self.url = m.group(1)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        while not self.lines.empty():
            self.log.append(self.lines.get())
        return self.proc.returncode


async def one(client, prompt: str, max_tokens: int) -> Answer:
    answer = Answer(prompt)
    start = time.perf_counter()
    stream = await client.completions.create(
        model="bench",
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.choices:
            text = chunk.choices[0].text or ""
            if text and not answer.chunks:
                answer.ttft = time.perf_counter() - start
            if text:
                answer.chunks.append(text)
            answer.finish_reason = chunk.choices[0].finish_reason or answer.finish_reason
        if chunk.usage is not None:
            answer.tokens = chunk.usage.completion_tokens
    answer.seconds = time.perf_counter() - start
    answer.text = "".join(answer.chunks)
    return answer


async def solo_pass(client, prompts: list[str], max_tokens: int) -> tuple[list[Answer], float]:
    start = time.perf_counter()
    answers = [await one(client, p, max_tokens) for p in prompts]
    return answers, time.perf_counter() - start


async def concurrent_pass(client, prompts: list[str], max_tokens: int) -> tuple[list[Answer], float]:
    start = time.perf_counter()
    answers = await asyncio.gather(*(one(client, p, max_tokens) for p in prompts))
    return list(answers), time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


async def bench(url: str, prompts: list[str], args) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=args.request_timeout)
    await one(client, prompts[0], 4)  # warm-up: first forward, kernel compilation, connection
    rows = []
    for r in range(args.repeats):
        order = ("solo", "concurrent") if r % 2 == 0 else ("concurrent", "solo")
        result = {}
        for kind in order:
            la = load_average()
            fn = solo_pass if kind == "solo" else concurrent_pass
            answers, wall = await fn(client, prompts, args.max_tokens)
            result[kind] = (answers, wall, la)
            tokens = sum(a.tokens for a in answers)
            ttfts = [a.ttft for a in answers]
            print(
                f"repeat {r + 1} {kind:>10}: {tokens} tokens in {wall:.2f} s = {tokens / wall:.1f} tokens/s; "
                f"TTFT p50 {percentile(ttfts, 0.5) * 1e3:.0f} ms, p95 {percentile(ttfts, 0.95) * 1e3:.0f} ms; "
                f"load average {la}",
                flush=True,
            )
        rows.append(result)
    await client.close()
    return rows


def report(rows: list[dict], prompts: list[str], args) -> bool:
    tps = {k: [sum(a.tokens for a in row[k][0]) / row[k][1] for row in rows] for k in ("solo", "concurrent")}
    ratio = [c / s for c, s in zip(tps["concurrent"], tps["solo"], strict=False)]
    p50 = {k: [percentile([a.ttft for a in row[k][0]], 0.5) * 1e3 for row in rows] for k in ("solo", "concurrent")}
    p95 = {k: [percentile([a.ttft for a in row[k][0]], 0.95) * 1e3 for row in rows] for k in ("solo", "concurrent")}
    ttft_ratio = [c / s for c, s in zip(p95["concurrent"], p50["solo"], strict=False)]
    per_req = {k: [statistics.median(a.seconds for a in row[k][0]) for row in rows] for k in ("solo", "concurrent")}

    mismatches, wrong_counts = [], []
    reference = {a.prompt: a.text for a in rows[0]["solo"][0]}
    for r, row in enumerate(rows):
        for kind in ("solo", "concurrent"):
            for a in row[kind][0]:
                if a.tokens != args.max_tokens or a.finish_reason != "length":
                    wrong_counts.append(f"repeat {r + 1} {kind} {a.prompt!r}: {a.tokens} tokens, {a.finish_reason}")
                if a.text != reference[a.prompt]:
                    mismatches.append(
                        f"repeat {r + 1} {kind} {a.prompt!r}:\n  solo:  {reference[a.prompt]!r}\n  {kind}: {a.text!r}"
                    )
    n = len(prompts)
    print("\n| pass | aggregate tokens/s | TTFT p50 ms | TTFT p95 ms | per-request wall s |")
    print("|---|---|---|---|---|")
    for kind, label in (("solo", "one at a time"), ("concurrent", f"{n} concurrent")):
        print(
            f"| {label} | {spread(tps[kind])} | {spread(p50[kind], '{:.0f}')} | {spread(p95[kind], '{:.0f}')} "
            f"| {spread(per_req[kind], '{:.2f}')} |"
        )
    print(f"\nmedian (min-max) over {len(rows)} repeat(s):")
    print(f"aggregate tokens/s, {n} concurrent / one at a time: {spread(ratio, '{:.2f}')}x (goal >= 4x)")
    print(
        f"TTFT p95 under {n} clients / a lone request's TTFT (p50 of the solo pass): {spread(ttft_ratio, '{:.2f}')}x "
        f"(goal <= 2x)"
    )
    print(
        f"answers with exactly {args.max_tokens} tokens (finish_reason length): "
        f"{2 * n * len(rows) - len(wrong_counts)}/{2 * n * len(rows)}"
    )
    for line in wrong_counts:
        print("  " + line)
    print(
        f"answers identical to the prompt's solo greedy answer (repeat 1): "
        f"{2 * n * len(rows) - len(mismatches)}/{2 * n * len(rows)}"
    )
    for line in mismatches:
        print("  MISMATCH " + line)
    return not mismatches and not wrong_counts


def prefill_floor(checkpoint: Path, prompts: list[str], context: int, repeats: int) -> dict[str, list[float]]:
    """Milliseconds of the prefill alone: the median prompt read alone ("lone"), and all prompts read
    in one forward, right-padded ("padded") and packed ("packed"); `repeats` rounds, alternating."""
    import torch

    from llama_zh.infer import load
    from llama_zh.infer.engine import SlotCache, prefill_step

    model, tokenizer, _ = load(checkpoint, rows=len(prompts))
    ids = [tokenizer.encode(p, bos=True) for p in prompts]  # as the server's /v1/completions does
    slots = list(range(len(ids)))
    times: dict[str, list[float]] = {"lone": [], "padded": [], "packed": []}
    with torch.inference_mode():
        cache = SlotCache.allocate(model.config, len(ids), context)
        prefill_step(model, cache, slots, ids, "packed")  # warm-up
        for _ in range(repeats):
            lone = []
            for slot, p in enumerate(ids):
                t = time.perf_counter()
                model(torch.tensor([p]), cache.slot(slot), last_only=True)
                lone.append(time.perf_counter() - t)
            times["lone"].append(statistics.median(lone) * 1e3)
            for layout in ("padded", "packed"):
                t = time.perf_counter()
                prefill_step(model, cache, slots, ids, layout)
                times[layout].append((time.perf_counter() - t) * 1e3)
    print(
        f"\nprefill alone (in process, {torch.get_num_threads()} threads; prompts of {min(map(len, ids))}-"
        f"{max(map(len, ids))} tokens, {sum(map(len, ids))} in all; {repeats} rounds; load average {load_average()}):"
    )
    for kind, label in (
        ("lone", "one prompt alone (median prompt)"),
        ("padded", f"{len(ids)} right-padded"),
        ("packed", f"{len(ids)} packed in one row"),
    ):
        print(f"  {label}: {spread(times[kind], '{:.1f}')} ms")
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/llama_zh-serve-bench"))
    ap.add_argument("--shape", choices=sorted(bench_checkpoints.SHAPES), default="130m")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server; default: unset")
    ap.add_argument("--request-timeout", type=float, default=600.0)
    ap.add_argument("--deadline", type=float, default=3600.0, help="seconds for the whole run")
    ap.add_argument("--quick", action="store_true", help="tiny shape, 16 new tokens, one repeat")
    ap.add_argument("--prefill-layout", choices=["auto", "packed", "padded"], default="auto")
    ap.add_argument("--no-floor", dest="floor", action="store_false", help="skip the in-process prefill timing")
    args = ap.parse_args()
    if args.quick:
        args.shape, args.max_tokens, args.repeats = "tiny", 16, 1

    import openai
    import torch

    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ckpt = bench_checkpoints.checkpoint(args.workdir, args.shape)
    prompts = bench_checkpoints.prompts(args.clients)
    print(
        f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; python "
        f"{platform.python_version()}; torch {torch.__version__}; openai {openai.__version__}; {os.cpu_count()} CPUs; "
        f"server OMP_NUM_THREADS {args.threads or 'unset'}; load average {load_average()}"
    )
    print(
        f"shape {args.shape} ({bench_checkpoints.SHAPES[args.shape]}), checkpoint {ckpt} (built in "
        f"{time.time() - t0:.0f} s); {args.clients} clients, prompts of {min(map(len, prompts))}-"
        f"{max(map(len, prompts))} characters, greedy, max_tokens {args.max_tokens}, {args.repeats} repeat(s), "
        f"streamed /v1/completions",
        flush=True,
    )
    context = 256
    server = Server(ckpt, args.workdir / "serve-run", args.clients, context, args.threads, 300, args.prefill_layout)
    ok, rows = False, []
    try:
        print(
            f"server {server.url} (stage.max_concurrent={args.clients}, stage.context_length={context}, "
            f"stage.prefill_layout={args.prefill_layout})",
            flush=True,
        )
        rows = asyncio.run(asyncio.wait_for(bench(server.url, prompts, args), args.deadline))
        ok = report(rows, prompts, args)
    finally:
        rc = server.stop()
        print(f"server stopped (exit {rc}); load average {load_average()}")
        if rc != 0 or any("Traceback" in line for line in server.log):
            print("server log tail:\n" + "".join(server.log)[-3000:])
    if args.floor and rows:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        times = prefill_floor(ckpt, prompts, context, max(3, args.repeats))
        lone_ttft = statistics.median(percentile([a.ttft for a in row["solo"][0]], 0.5) * 1e3 for row in rows)
        best = min(statistics.median(times["padded"]), statistics.median(times["packed"]))
        print(
            f"least TTFT p95 ratio this machine allows: the faster one-forward prefill {best:.0f} ms / the lone "
            f"request's TTFT {lone_ttft:.0f} ms = {best / lone_ttft:.2f}x (goal <= 2x); packed / padded "
            f"{statistics.median(times['packed']) / statistics.median(times['padded']):.2f}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
