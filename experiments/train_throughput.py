"""Training throughput on CPU: llama_zh's pretrain step vs a plain PyTorch loop over transformers'
LlamaForCausalLM, same shape, same batches, same precision, same process; plus the matmul ceiling.

llama_zh side: the production path, a Lightning Trainer over `CausalLM(build_model(...))`, AdamW,
gradient clipping 1.0, loss logging every step. transformers side: `LlamaForCausalLM` (SDPA
attention, untied head), the same AdamW and clipping, loss = cross-entropy of its logits in fp32,
exactly the loss llama_zh computes. Both see the same fixed batches of random tokens.

The two sides alternate in rounds (A B A B ...) so that load from other processes on a shared
machine hits both alike; each figure is the median over rounds of tokens/s over the timed steps.

From the repository root (so that this checkout's llama_zh is the one imported):

    python -m experiments.train_throughput                      # tiny and 134M, fp32 and bf16-mixed
    python -m experiments.train_throughput --shapes tiny --rounds 5
    python -m experiments.train_throughput --device cuda --shapes 134m,1b --precisions bf16-mixed
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from llama_zh.config import ModelConfig
from llama_zh.model import build_model
from llama_zh.train.module import CausalLM, OptimConfig

SHAPES = {
    # llama_zh/conf/model/tiny.yaml with the sample tokenizer's vocabulary; the data config's seq 256, batch 8.
    "tiny": (
        ModelConfig(
            name="tiny", vocab_size=8000, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=352, max_seq_len=512
        ),
        256,
        8,
    ),
    # GPT-2-small-like LLaMA: hidden 768, 12 layers, 12 heads, ffn 2048, vocab 32000 -> 134.1M parameters.
    "134m": (
        ModelConfig(name="134m", vocab_size=32000, dim=768, n_layers=12, n_heads=12, ffn_dim=2048, max_seq_len=512),
        256,
        4,
    ),
    # Llama-3.2-1B's body (hidden 2048, 16 layers, 32 heads, 8 kv heads, ffn 8192) with a 32000 vocabulary:
    # for a GPU (`--device cuda`); far too slow for the CPU.
    "1b": (
        ModelConfig(
            name="1b", vocab_size=32000, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, max_seq_len=2048
        ),
        2048,
        4,
    ),
}
DEVICE = "cpu"  # set from --device
OPTIM = OptimConfig(lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, warmup_steps=0)


def batches(config: ModelConfig, seq: int, batch: int, n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        window = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=g)
        out.append({"input_ids": window[:, :-1].contiguous(), "labels": window[:, 1:].contiguous()})
    return out


def run_llama_zh(config, data, precision: str, warmup: int) -> float:
    import pytorch_lightning as pl

    class StepTimer(pl.Callback):
        def __init__(self):
            self.times, self._t = [], 0.0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            synchronize()
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            synchronize()
            self.times.append(time.perf_counter() - self._t)

    model = build_model(config, seed=0)
    module = CausalLM(model, OPTIM, total_steps=len(data))
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="gpu" if DEVICE == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_steps=len(data),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        callbacks=[timer],
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return tokens_per_s(data, timer.times, warmup)


def hf_model(config: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        max_position_embeddings=config.max_seq_len,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(hf_config).to(DEVICE).train()


def run_transformers(config, data, precision: str, warmup: int) -> float:
    model = hf_model(config)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": OPTIM.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=OPTIM.lr,
        betas=OPTIM.betas,
        eps=OPTIM.eps,
    )
    times = []
    for batch in data:
        batch = {k: v.to(DEVICE) for k, v in batch.items()}
        synchronize()
        start = time.perf_counter()
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            logits = model(input_ids=batch["input_ids"]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss)  # as the Lightning side, which logs the loss every step
        synchronize()
        times.append(time.perf_counter() - start)
    return tokens_per_s(data, times, warmup)


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def tokens_per_s(data, times: list[float], warmup: int) -> float:
    timed = times[warmup:]
    tokens = sum(b["input_ids"].numel() for b in data[warmup:])
    return tokens / sum(timed)


def matmul_ceiling(dtype: torch.dtype, n: int = 1024, k: int = 768, m: int = 3072, repeats: int = 20) -> float:
    """FLOP/s of one large matmul (the best a training step could do on this machine)."""
    if DEVICE == "cuda":
        n = k = m = 8192
    a, b = torch.randn(n, k, dtype=dtype, device=DEVICE), torch.randn(k, m, dtype=dtype, device=DEVICE)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        a @ b
        synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n * k * m / best


def flops_per_token(config: ModelConfig, seq: int) -> float:
    return 6 * config.n_params + 12 * config.n_layers * config.dim * seq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="tiny,134m")
    parser.add_argument("--precisions", default="32-true,bf16-mixed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=0, help="timed steps per run (0: 20 tiny, 4 for 134m)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: one GPU")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")

    import pytorch_lightning
    import transformers

    print(
        f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; python "
        f"{platform.python_version()}; torch {torch.__version__}; pytorch-lightning {pytorch_lightning.__version__}; "
        f"transformers {transformers.__version__}; {torch.get_num_threads()} threads; load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    ceilings = {
        p: matmul_ceiling(torch.float32 if p == "32-true" else torch.bfloat16) for p in args.precisions.split(",")
    }
    for p, c in ceilings.items():
        print(f"matmul ceiling {p} on {DEVICE}: {c / 1e9:.1f} GFLOP/s")
    if DEVICE == "cuda":
        print(f"device: {torch.cuda.get_device_name()}")
    print()
    print(
        "| shape | params | seq x batch | precision | llama_zh tok/s | transformers tok/s | ratio | "
        "llama_zh MFU vs ceiling | rounds (llama_zh / transformers) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        config, seq, batch = SHAPES[shape]
        steps = args.steps or (20 if shape == "tiny" else 4)
        data = batches(config, seq, batch, args.warmup + steps)
        for precision in args.precisions.split(","):
            ours, theirs = [], []
            for _ in range(args.rounds):
                ours.append(run_llama_zh(config, data, precision, args.warmup))
                theirs.append(run_transformers(config, data, precision, args.warmup))
            a, b = statistics.median(ours), statistics.median(theirs)
            mfu = a * flops_per_token(config, seq) / ceilings[precision]
            rounds = " ".join(f"{x:.0f}/{y:.0f}" for x, y in zip(ours, theirs, strict=False))
            print(
                f"| {shape} | {config.n_params / 1e6:.1f}M | {seq} x {batch} | {precision} | {a:.0f} | {b:.0f} | "
                f"{a / b:.2f} | {mfu:.0%} | {rounds} |",
                flush=True,
            )
    if "32-true" in args.precisions and "bf16-mixed" in args.precisions:
        print(
            "\n(bf16-mixed vs transformers fp32: divide the bf16-mixed llama_zh figure by the 32-true transformers one)"
        )


if __name__ == "__main__":
    main()
