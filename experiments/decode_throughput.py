"""Greedy decode throughput of llama_zh.generate vs transformers' generate, on the same weights, CPU.

For each shape: a random-initialised transformers.LlamaForCausalLM is saved, loaded into llama_zh with
the inference loader (llama_zh.infer.load_stream, same fp32 weights; `--backend`, default auto, which
picks the layout for the batch at load: the model is loaded once per batch size, and the table names
the backend in use), and both decode 128 new tokens greedily from the same prompts (batch 1 and 8,
prompts of 32 tokens; eos never stops either). Reported per run:

- tokens/s: batch x new tokens / wall time of the whole generate call (prefill included);
- decode ms/step: (time for N new tokens - time for 1 new token) / (N - 1), i.e. the cached steps only;
- the weight-read floor: the time to read every weight a decode step reads once (every matrix of the
  blocks and the head; of the embedding one row), measured two ways: `sum` (torch.sum over each
  matrix: pure memory reads) and `gemv` (a batch-1 x @ W.T with each matrix: the arithmetic a
  decode step cannot avoid). A decode step at batch 1 can be no faster than either. The floors are
  measured again right before every decode run and "vs floor" is the median of the per-run ratios,
  so that the load of other processes (memory bandwidth included) cancels out.
- quant: weight memory and batch-1 tokens/s of quant=int8 and quant=nf4 (bitsandbytes) as ratios to none.

Runs alternate implementations and repeat (`--repeats`); the table gives the median (and best) of
the repeats, because the machine is shared. Same tokens: whether both produced identical ids.

    python experiments/decode_throughput.py                     # tiny and ~130M, batch 1 and 8, quant ratios
    python experiments/decode_throughput.py --shapes tiny --repeats 5 --no-quant
    python experiments/decode_throughput.py --device cuda --dtype float16   # one GPU: ~2 minutes on an H200

On a GPU every timed call ends with a synchronisation (the generated ids are copied to the host;
the floors synchronise explicitly); "same tokens" in half precision may differ where two logits tie
within rounding.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_zh.convert import read_any  # noqa: E402
from llama_zh.dtypes import FLOAT_DTYPES  # noqa: E402
from llama_zh.generate import SamplingConfig, generate_batch  # noqa: E402
from llama_zh.infer import load_stream  # noqa: E402
from llama_zh.quant import QuantConfig  # noqa: E402

SHAPES = {
    # llama_zh/conf/model/tiny.yaml with the sample tokenizer's 8000 pieces
    "tiny": dict(
        vocab_size=8000,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=352,
    ),
    # GPT-2-small-like width and depth, LLaMA's 32000 vocabulary: 134M parameters
    "130m": dict(
        vocab_size=32000,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        intermediate_size=2048,
    ),
}


def timed(fn, repeats: int = 1) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def hf_model(shape: dict, directory: Path, device: torch.device, dtype: torch.dtype):
    import transformers

    cfg = transformers.LlamaConfig(
        **shape,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(directory)  # fp32: both sides are cast from the same weights
    return model.to(device=device, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def floors(model, repeats: int) -> dict:
    """Seconds to read every weight of a decode step once (median of `repeats`): by torch.sum, and by a
    batch-1 GEMV (x @ W.T, what nn.Linear does)."""
    mats = [p for n, p in model.named_parameters() if p.ndim == 2 and not n.startswith("embed")]
    device = mats[0].device
    xs = {(p.shape[1], p.dtype): torch.randn(1, p.shape[1], device=device, dtype=p.dtype) for p in mats}
    with torch.inference_mode():
        for p in mats:  # warm-up
            p.sum(), xs[p.shape[1], p.dtype] @ p.T
        total_sum = statistics.median(timed(lambda: ([p.sum() for p in mats], synchronize(device)), repeats))
        total_gemv = statistics.median(
            timed(lambda: ([xs[p.shape[1], p.dtype] @ p.T for p in mats], synchronize(device)), repeats)
        )
    return {"sum": total_sum, "gemv": total_gemv, "bytes": sum(p.numel() * p.element_size() for p in mats)}


def hf_greedy(hf, prompts: torch.Tensor, mask: torch.Tensor, n: int) -> list[list[int]]:
    """transformers' greedy decode of exactly `n` new tokens per row (eos never stops it)."""
    with torch.inference_mode():
        return hf.generate(
            prompts,
            attention_mask=mask,
            do_sample=False,
            num_beams=1,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=0,
        )[:, prompts.shape[1] :].tolist()


def ours_greedy(model, prompt_lists: list[list[int]], n: int) -> list[list[int]]:
    return generate_batch(model, prompt_lists, SamplingConfig(temperature=0.0, max_new_tokens=n))


def bench_shape(
    name: str,
    batches: list[int],
    new_tokens: int,
    repeats: int,
    quant: bool,
    quant_tokens: int,
    device: torch.device,
    dtype: torch.dtype,
    backend: str,
) -> list[str]:
    shape = SHAPES[name]
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_model(shape, Path(tmp), device, dtype)
        stream = read_any(Path(tmp))
        ours, first = load_stream(stream, device, dtype, QuantConfig(), backend, rows=1)
        n_params = sum(p.numel() for p in ours.parameters())
        floor = floors(ours, max(repeats, 5))
        lines.append(
            f"\n### {name}: {n_params / 1e6:.1f}M parameters, {str(dtype).removeprefix('torch.')}; "
            f"weights read per decode step {floor['bytes'] / 2**20:.0f} MiB; floor: sum {floor['sum'] * 1e3:.1f} ms, "
            f"gemv {floor['gemv'] * 1e3:.1f} ms per step\n"
        )
        lines.append(
            "| batch | impl | tokens/s (median) | tokens/s (best) | decode ms/step (median) | vs floor (gemv / sum) "
            "| speed-up vs transformers | same tokens |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        g = torch.Generator().manual_seed(1)
        for batch in batches:
            model, report = (
                (ours, None) if batch == 1 else load_stream(stream, device, dtype, QuantConfig(), backend, rows=batch)
            )
            label = f"llama_zh ({(report or first).backend})"
            prompts = torch.randint(3, shape["vocab_size"], (batch, 32), generator=g)
            prompt_lists = prompts.tolist()
            prompts = prompts.to(device)
            mask = torch.ones_like(prompts)

            run_hf = functools.partial(hf_greedy, hf, prompts, mask)
            run_ours = functools.partial(ours_greedy, model, prompt_lists)
            same = run_hf(new_tokens) == run_ours(new_tokens)  # also warms both up
            times = {"transformers": [], "llama_zh": []}
            step = {"transformers": [], "llama_zh": []}
            ratio = {"transformers": [], "llama_zh": []}  # decode step / floors measured just before it
            for _ in range(repeats):  # alternate, so that load from other processes hits both alike
                for impl, fn in (("transformers", run_hf), ("llama_zh", run_ours)):
                    here = floors(ours, 5) if batch == 1 else None
                    one = min(timed(functools.partial(fn, 1), 2))
                    full = timed(functools.partial(fn, new_tokens))[0]
                    times[impl].append(full)
                    step[impl].append((full - one) / (new_tokens - 1))
                    if here:
                        ratio[impl].append((step[impl][-1] / here["gemv"], step[impl][-1] / here["sum"]))
            med = {k: statistics.median(v) for k, v in times.items()}
            for impl in ("transformers", "llama_zh"):
                tps = batch * new_tokens / med[impl]
                best = batch * new_tokens / min(times[impl])
                ms = statistics.median(step[impl]) * 1e3
                vs_floor = "-"
                if ratio[impl]:
                    vs_floor = (
                        f"{statistics.median(r[0] for r in ratio[impl]):.2f} / "
                        f"{statistics.median(r[1] for r in ratio[impl]):.2f}"
                    )
                speedup = f"{med['transformers'] / med['llama_zh']:.2f}x" if impl == "llama_zh" else "-"
                name = label if impl == "llama_zh" else impl
                lines.append(
                    f"| {batch} | {name} | {tps:.1f} | {best:.1f} | {ms:.2f} | {vs_floor} | {speedup} | "
                    f"{'yes' if same else 'NO'} |"
                )
        if quant:
            lines += bench_quant(stream, ours, quant_tokens, repeats, shape["vocab_size"], device, dtype, backend)
        del hf
    return lines


def bench_quant(
    stream, ours, new_tokens: int, repeats: int, vocab: int, device: torch.device, dtype: torch.dtype, backend: str
) -> list[str]:
    prompt = [torch.randint(3, vocab, (32,), generator=torch.Generator().manual_seed(2)).tolist()]
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=new_tokens)
    rows, base = [], None
    for method in ("none", "int8", "nf4"):
        model, report = ours, None
        if method != "none":
            model, report = load_stream(stream, device, dtype, QuantConfig(name=method), backend)
        if report is None:
            from llama_zh.quant import weight_bytes

            mib = weight_bytes(model) / 2**20
            skipped = 0
        else:
            mib, skipped = report.quant.bytes_after / 2**20, len(report.quant.skipped)
        generate_batch(model, prompt, SamplingConfig(temperature=0.0, max_new_tokens=2))  # warm-up
        tps = new_tokens / statistics.median(timed(functools.partial(generate_batch, model, prompt, cfg), repeats))
        if base is None:
            base = (mib, tps)
        rows.append(f"| {method} | {mib:.1f} | {mib / base[0]:.2f} | {tps:.1f} | {tps / base[1]:.3f} | {skipped} |")
    return [
        f"\nquant (batch 1, {new_tokens} new tokens, median of {repeats}):\n",
        "| quant | weight MiB | weight / none | tokens/s | tokens/s / none | layers left unquantized |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,130m")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-quant", action="store_true")
    parser.add_argument("--quant-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one GPU)")
    parser.add_argument("--dtype", default="float32", choices=list(FLOAT_DTYPES))
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "kernel"],
        help="the inference loader's backend (llama_zh.infer.load)",
    )
    args = parser.parse_args()
    device, dtype = torch.device(args.device), FLOAT_DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    print(
        f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; python "
        f"{platform.python_version()}; torch {torch.__version__}; transformers {transformers.__version__}; "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; load average {os.getloadavg()[0]:.1f}"
    )
    if device.type == "cuda":
        print(f"device {torch.cuda.get_device_name(device)}")
    print(
        f"greedy, {args.new_tokens} new tokens from 32-token prompts, {args.dtype}, median of {args.repeats} "
        "alternating runs"
    )
    for name in args.shapes.split(","):
        for line in bench_shape(
            name,
            [int(b) for b in args.batches.split(",")],
            args.new_tokens,
            args.repeats,
            not args.no_quant,
            args.quant_tokens,
            device,
            dtype,
            args.backend,
        ):
            print(line, flush=True)


if __name__ == "__main__":
    main()
