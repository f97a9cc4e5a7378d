"""Peak memory of the checkpoint converters, against the naive load-everything approaches.

Run by hand (several minutes, ~10 GB of disk under --workdir):

    python experiments/convert_memory.py [--workdir DIR] [--keep] [--max-shard-size 50GB] [--trace]

1. A subprocess creates a random-initialised `transformers.LlamaForCausalLM` (~505M parameters, fp32,
   ~2 GB) and saves it with `save_pretrained` (safetensors, transformers' default sharding).
2. Each measured operation then runs in a fresh subprocess of its own, so its RSS holds nothing of the
   process that created the model:
     a. llama_zh: hf -> native (`llama_zh.convert.convert`)
     b. llama_zh: native -> hf
     c. transformers: `AutoModelForCausalLM.from_pretrained` + `save_pretrained`
     d. safetensors: `load_file` of every shard + `save_file`
   plus, per group, a subprocess that only imports the same modules (the import overhead).
   Each reports VmHWM (from /proc/self/status, read at its end), ru_maxrss and its wall time.
3. Another subprocess checks that the converted native checkpoint gives transformers' logits.

This parent process imports nothing heavy: at exec, Linux folds the high-water mark of the address
space being replaced (the parent's) into the child's ru_maxrss, so a parent holding the model would
pollute it (VmHWM is per address space and immune to that).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1024**2

# ~505M parameters: 14 * (6.29M attention + 18.87M FFN) + 2 * 49953 * 1536 (embedding, head).
SHAPE = dict(
    vocab_size=49953,
    hidden_size=1536,
    num_hidden_layers=14,
    num_attention_heads=12,
    num_key_value_heads=4,
    intermediate_size=4096,
)
if os.environ.get("CONVERT_MEMORY_TINY"):  # --tiny: a smoke test of this script, figures meaningless
    SHAPE = dict(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
    )


# ------------------------------------------------------------------------------------------ workers


def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _import(group: str) -> None:
    if group == "llama_zh":
        import llama_zh.checkpoint  # noqa: F401
        import llama_zh.convert  # noqa: F401
    elif group == "transformers":
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import transformers.models.llama.modeling_llama  # noqa: F401  (from_pretrained imports it lazily)
    elif group == "safetensors":
        import safetensors.torch  # noqa: F401
        import torch  # noqa: F401
    else:
        raise ValueError(group)


def _trace_writes() -> list[tuple[str, int, int]]:
    """Record (name, VmRSS before, VmHWM after) for every tensor the streaming writer receives."""
    from llama_zh import tensor_io

    trace: list[tuple[str, int, int]] = []
    original = tensor_io.SafetensorsWriter.write

    def write(self, name, tensor):
        before = _status()["VmRSS"]
        original(self, name, tensor)
        trace.append((name, before, _status()["VmHWM"]))

    tensor_io.SafetensorsWriter.write = write
    return trace


def worker(op: str, src: str, dst: str, extra: str) -> dict:
    groups = {
        "create": "transformers",
        "import:llama_zh": "llama_zh",
        "import:transformers": "transformers",
        "import:safetensors": "safetensors",
        "hf->native": "llama_zh",
        "native->hf": "llama_zh",
        "transformers": "transformers",
        "safetensors": "safetensors",
        "verify": "transformers",
    }
    t0 = time.perf_counter()
    _import(groups[op])
    if op == "verify":
        import llama_zh.checkpoint  # noqa: F401
    after_import = _status()
    import_s = time.perf_counter() - t0
    result: dict = {}
    t1 = time.perf_counter()
    if op == "create":
        import torch
        import transformers

        cfg = transformers.LlamaConfig(
            **SHAPE, rms_norm_eps=1e-6, max_position_embeddings=2048, tie_word_embeddings=False
        )
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).eval()
        with torch.no_grad():  # random norm weights, so a norm mapped to the wrong tensor would show
            for p in model.parameters():
                if p.ndim == 1:
                    p.uniform_(0.5, 1.5)
        kwargs = {"max_shard_size": extra} if extra else {}
        model.save_pretrained(dst, **kwargs)
        result["n_params"] = sum(p.numel() for p in model.parameters())
    elif op in ("hf->native", "native->hf"):
        from llama_zh.convert import convert

        trace = _trace_writes() if extra == "trace" else None
        if op == "hf->native":
            convert(Path(src), "hf", Path(dst), "native")
        else:
            convert(Path(src), "native", Path(dst), "hf")
        if trace:
            result["trace"] = trace
    elif op == "transformers":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(src)
        model.save_pretrained(dst)
        result["dtype"] = str(next(model.parameters()).dtype)
    elif op == "safetensors":
        from safetensors.torch import load_file, save_file

        os.makedirs(dst, exist_ok=True)
        for f in sorted(Path(src).glob("*.safetensors")):
            save_file(load_file(f), os.path.join(dst, f.name), metadata={"format": "pt"})
    elif op == "verify":
        import torch
        import transformers

        from llama_zh.convert import load_checkpoint

        ref_model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        model, _ = load_checkpoint(dst)
        torch.manual_seed(1)
        ids = torch.randint(0, SHAPE["vocab_size"], (2, 16))
        with torch.no_grad():
            ref = ref_model(ids).logits
            got = model(ids)
        result["shape"] = list(got.shape)
        result["max_abs_diff"] = float((got - ref).abs().max())
        result["close"] = bool(torch.allclose(got, ref, atol=1e-4, rtol=0))
    op_s = time.perf_counter() - t1
    end = _status()
    result.update(
        op=op,
        rss_after_import=after_import["VmRSS"],
        hwm_after_import=after_import["VmHWM"],
        vm_hwm=end["VmHWM"],
        rss_end=end["VmRSS"],
        rss_file_end=end.get("RssFile", 0),
        ru_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        import_s=import_s,
        op_s=op_s,
    )
    return result


# ------------------------------------------------------------------------------------------ driver


def run_worker(op: str, src: Path | str = "", dst: Path | str = "", extra: str = "") -> dict:
    cmd = [sys.executable, __file__, "--worker", op, "--src", str(src), "--dst", str(dst), "--extra", extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"worker {op} failed with exit code {proc.returncode}")
    line = [out for out in proc.stdout.splitlines() if out.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT ") :])
    result["wall_s"] = wall
    return result


def weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary directory under /tmp")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints written under --workdir")
    parser.add_argument(
        "--max-shard-size", default="", help="save_pretrained max_shard_size (default: transformers' own)"
    )
    parser.add_argument("--trace", action="store_true", help="also print VmRSS after each tensor llama_zh writes")
    parser.add_argument("--tiny", action="store_true", help="a tiny model: checks this script runs, nothing more")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--src", default="", help=argparse.SUPPRESS)
    parser.add_argument("--dst", default="", help=argparse.SUPPRESS)
    parser.add_argument("--extra", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.src, args.dst, args.extra)), flush=True)
        return

    if args.tiny:
        os.environ["CONVERT_MEMORY_TINY"] = "1"
    created_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="convert_memory-", dir="/tmp")) if created_workdir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    paths = {k: workdir / k for k in ("hf_src", "native", "hf_export", "transformers_out", "safetensors_out")}
    for p in paths.values():
        if p.exists():
            shutil.rmtree(p)
    print(f"workdir {workdir}", flush=True)
    try:
        created = run_worker("create", dst=paths["hf_src"], extra=args.max_shard_size)
        src_bytes = weight_bytes(paths["hf_src"])
        shards = sorted(p.name for p in paths["hf_src"].glob("*.safetensors"))
        print(
            f"created {created['n_params'] / 1e6:.1f}M parameters, {src_bytes / MiB:.0f} MiB in {len(shards)} "
            f"file(s) {shards} ({created['op_s']:.0f} s)",
            flush=True,
        )

        rows = []

        def measure(label: str, op: str, src: Path | str, dst: Path | str, size: int, extra: str = "") -> dict:
            r = run_worker(op, src, dst, extra)
            r["label"], r["size"] = label, size
            rows.append(r)
            print(f"  done: {label} ({r['wall_s']:.1f} s)", flush=True)
            return r

        measure("import llama_zh.convert only", "import:llama_zh", "", "", src_bytes)
        a = measure(
            "(a) llama_zh hf -> native",
            "hf->native",
            paths["hf_src"],
            paths["native"],
            src_bytes,
            "trace" if args.trace else "",
        )
        native_bytes = weight_bytes(paths["native"])
        b = measure(
            "(b) llama_zh native -> hf",
            "native->hf",
            paths["native"],
            paths["hf_export"],
            native_bytes,
            "trace" if args.trace else "",
        )
        measure("import transformers only", "import:transformers", "", "", src_bytes)
        measure(
            "(c) transformers from_pretrained+save_pretrained",
            "transformers",
            paths["hf_src"],
            paths["transformers_out"],
            src_bytes,
        )
        measure("import safetensors.torch only", "import:safetensors", "", "", src_bytes)
        measure(
            "(d) safetensors load_file+save_file", "safetensors", paths["hf_src"], paths["safetensors_out"], src_bytes
        )

        verify = run_worker("verify", paths["hf_src"], paths["native"])

        print()
        print(
            f"date {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; "
            f"python {platform.python_version()}; {os.cpu_count()} CPUs; "
            f"model {created['n_params'] / 1e6:.1f}M params fp32; "
            f"checkpoint {src_bytes / MiB:.0f} MiB ({len(shards)} file(s)); native written {native_bytes / MiB:.0f} MiB"
        )
        print("MiB = 2^20 bytes. ratio = VmHWM / checkpoint size; net = (VmHWM - RSS after imports) / checkpoint size.")
        header = (
            f"| {'operation':<50} | {'imports RSS':>11} | {'VmHWM':>7} | {'ru_maxrss':>9} | {'ckpt':>6} "
            f"| {'ratio':>5} | {'net':>5} | {'op s':>6} | {'wall s':>6} |"
        )
        print(header)
        print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
        for r in rows:
            net = (r["vm_hwm"] - r["rss_after_import"]) / r["size"]
            print(
                f"| {r['label']:<50} | {r['rss_after_import'] / MiB:>11.0f} | {r['vm_hwm'] / MiB:>7.0f} "
                f"| {r['ru_maxrss'] / MiB:>9.0f} | {r['size'] / MiB:>6.0f} | {r['vm_hwm'] / r['size']:>5.2f} "
                f"| {net:>5.2f} | {r['op_s']:>6.1f} | {r['wall_s']:>6.1f} |"
            )
        print()
        print(
            f"logit parity, native (llama_zh.load_checkpoint) vs transformers, input {verify['shape'][:2]}: "
            f"max |diff| {verify['max_abs_diff']:.3g} -> {'OK' if verify['close'] else 'MISMATCH'}"
        )
        for r in (a, b):
            if "trace" in r:
                trace = r["trace"]
                top = sorted(trace, key=lambda t: -t[2])[:5]
                print(
                    f"{r['label']}: {len(trace)} tensors; highest VmHWM after a tensor: "
                    + ", ".join(f"{n} {h / MiB:.0f} MiB (RSS before {b_ / MiB:.0f})" for n, b_, h in top)
                )
        if not verify["close"]:
            raise SystemExit(1)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        elif created_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            for p in paths.values():
                shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    main()
