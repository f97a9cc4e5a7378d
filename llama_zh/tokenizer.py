"""SentencePiece tokenizer: loading, training, and the ids LLaMA expects (unk 0, bos 1, eos 2)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm

from llama_zh.errors import LlamaZhError


class TokenizerError(LlamaZhError, ValueError):
    pass


class Tokenizer:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"{self.path}: tokenizer model not found")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{self.path}: not a sentencepiece model ({e})") from e

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.EncodeAsIds(texts)

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def sha256(self) -> str:
        return file_sha256(self.path)


def file_sha256(path: str | Path) -> str:
    """A tokenizer's identity, as token shards, training states and native checkpoints record it."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def train_sentencepiece(corpus: Path, output: Path, vocab_size: int, model_type: str = "bpe",
                        character_coverage: float = 0.9995, max_sentence_length: int = 16384,
                        input_sentence_size: int = 2_000_000, seed_sentencepiece_size: int = 1_000_000,
                        num_threads: int | None = None) -> Path:
    """Train a LLaMA-style sentencepiece model on `corpus` (one document per line) into `output`.

    byte_fallback: no character is ever unknown; identity normalization: Chinese punctuation and
    full-width characters round-trip exactly (NFKC would fold them); split_digits as LLaMA does.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        prefix = os.path.join(tmp, "spm")
        try:
            spm.SentencePieceTrainer.Train(
                input=str(corpus), model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
                character_coverage=character_coverage, byte_fallback=True, split_digits=True,
                normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=max_sentence_length,
                input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
                seed_sentencepiece_size=seed_sentencepiece_size, train_extremely_large_corpus=False,
                num_threads=num_threads or os.cpu_count() or 1, minloglevel=2,
            )
        except RuntimeError as e:
            raise TokenizerError(f"{corpus}: sentencepiece training failed: {str(e).splitlines()[0]}") from None
        shutil.move(prefix + ".model", str(output) + ".tmp")
        os.replace(str(output) + ".tmp", output)
    return output
