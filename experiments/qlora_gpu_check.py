"""QLoRA on a CUDA device, run by hand where one is available: (1) nf4 / int8 bases quantized on the
GPU, trained with paged_adamw8bit, merged exactly into the source weights, logit gap; (2) peak
allocated CUDA memory (torch.cuda.max_memory_allocated, reset after the checkpoint is read) and
tokens/s at the 134m shape (seq 256 x batch 4) for LoRA on an fp32 base vs QLoRA, AdamW vs 8-bit AdamW.

    python -m experiments.qlora_gpu_check
"""

from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path

import torch

from llama_zh.checkpoint import load_model, read_native, save_checkpoint
from llama_zh.config import ModelConfig
from llama_zh.model import build_model
from llama_zh.train.finetune import (
    PROJECTIONS,
    FinetuneConfig,
    apply_finetune,
    load_quantized_base,
    logit_gap,
    source_merged_stream,
)
from llama_zh.train.module import CausalLM, OptimConfig


def batches(config, seq, batch, n, device):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        w = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=g)
        out.append({"input_ids": w[:, :-1].contiguous().to(device), "labels": w[:, 1:].contiguous().to(device)})
    return out


def correctness(tmp: Path) -> None:
    config = ModelConfig(
        name="s", vocab_size=1000, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=704, max_seq_len=128
    )
    save_checkpoint(build_model(config, seed=0), tmp / "small")
    for method in ("nf4", "int8"):
        ft = FinetuneConfig(
            method="lora",
            rank=8,
            alpha=16,
            dropout=0.0,  # the value this check was written with (FinetuneConfig's default is lora.yaml's 0.05)
            target_modules=list(PROJECTIONS),
            modules_to_save=["head"],
            base_quant=method,
        )
        model, report = load_quantized_base(read_native(tmp / "small"), ft, "cuda")
        apply_finetune(model, ft).to("cuda").train()
        module = CausalLM(model, OptimConfig(name="paged_adamw8bit", lr=1e-2, warmup_steps=0), total_steps=100)
        opt = module.configure_optimizers()["optimizer"]
        losses = []
        for b in batches(config, 64, 4, 1, "cuda") * 8:
            loss = module.loss(b)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        merged = dict(source_merged_stream(model, read_native(tmp / "small")).tensors())
        src = dict(read_native(tmp / "small").tensors())
        layer = model.layers[1].ffn.w_down
        exact = torch.equal(
            merged["layers.1.ffn.w_down.weight"], src["layers.1.ffn.w_down.weight"] + layer.delta().cpu()
        )
        from llama_zh.checkpoint import WeightStream

        shapes = {n: (t.dtype, tuple(t.shape)) for n, t in merged.items()}
        full = load_model(WeightStream(config, shapes, functools.partial(iter, merged.items())))
        gap = logit_gap(model, full, batches(config, 64, 2, 1, "cpu")[0]["input_ids"])
        print(
            f"{method}: {report.summary()}; {type(layer.base).__name__}; optimizer {type(opt).__name__}; loss "
            f"{losses[0]:.3f} -> {losses[-1]:.3f}; merge == source + delta: {exact}; gap {gap}",
            flush=True,
        )


def memory(tmp: Path) -> None:
    config = ModelConfig(name="134m", vocab_size=32000, dim=768, n_layers=12, n_heads=12, ffn_dim=2048, max_seq_len=512)
    save_checkpoint(build_model(config, seed=0), tmp / "134m")
    print("| base | optimizer | peak allocated MiB | vs fp32 + adamw | tokens/s |")
    print("|---|---|---|---|---|")
    reference = None
    for base in ("fp32", "nf4", "int8"):
        for optim in ("adamw", "adamw8bit", "paged_adamw8bit"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            ft = FinetuneConfig(
                method="lora",
                rank=8,
                alpha=32,
                dropout=0.05,
                modules_to_save=[],
                base_quant=None if base == "fp32" else base,
            )
            stream = read_native(tmp / "134m")
            model = load_model(stream, "cuda") if base == "fp32" else load_quantized_base(stream, ft, "cuda")[0]
            apply_finetune(model, ft).to("cuda").train()
            module = CausalLM(model, OptimConfig(name=optim, lr=1e-4, warmup_steps=0), total_steps=100)
            opt = module.configure_optimizers()["optimizer"]
            data = batches(config, 256, 4, 5, "cuda")
            times = []
            for b in data:
                torch.cuda.synchronize()
                start = time.perf_counter()
                loss = module.loss(b)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                loss.item()
                times.append(time.perf_counter() - start)
            peak = torch.cuda.max_memory_allocated() / 2**20
            reference = reference or peak
            print(
                f"| {base} | {optim} | {peak:.0f} | {peak / reference:.2f}x | {4 * 256 * 3 / sum(times[2:]):.0f} |",
                flush=True,
            )
            del model, module, opt


def main() -> None:
    import bitsandbytes

    print(f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, {torch.cuda.get_device_name()}")
    with tempfile.TemporaryDirectory() as tmp:
        correctness(Path(tmp))
        memory(Path(tmp))


if __name__ == "__main__":
    main()
