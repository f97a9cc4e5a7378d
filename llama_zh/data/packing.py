"""Tokenizing documents and packing them end to end into one flat token file per split.

Each document becomes `<s> ids </s>` and follows the previous one directly: no padded tails, so
every token trained on is real text. The token file is raw uint16 (uint32 past 65,536 pieces), read
back memory-mapped; beside it a JSON index records the counts and the tokenizer's sha256, so shards
built with another tokenizer are refused rather than silently mis-read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from llama_zh.data.corpus import DataError
from llama_zh.tokenizer import Tokenizer

ENCODE_BATCH = 512


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def pack_documents(documents: Iterable[str], tokenizer: Tokenizer, out: Path) -> dict:
    """Write the packed tokens of `documents` to `out` (+ `out`.json); return the index."""
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = out.with_name(out.name + ".tmp")
    n_docs = n_tokens = 0

    def flush(batch: list[str], f) -> None:
        nonlocal n_docs, n_tokens
        for ids in tokenizer.encode_batch(batch):
            arr = np.asarray([tokenizer.bos_id, *ids, tokenizer.eos_id], dtype=dtype)
            f.write(arr.tobytes())
            n_tokens += arr.size
        n_docs += len(batch)

    try:
        with open(tmp, "wb") as f:
            batch = []
            for doc in documents:
                batch.append(doc)
                if len(batch) == ENCODE_BATCH:
                    flush(batch, f)
                    batch = []
            if batch:
                flush(batch, f)
        index = {"documents": n_docs, "tokens": n_tokens, "dtype": dtype.name,
                 "tokenizer_sha256": tokenizer.sha256(), "vocab_size": tokenizer.vocab_size}
        os.replace(tmp, out)
        index_file = out.with_name(out.name + ".json")
        index_file.with_name(index_file.name + ".tmp").write_text(json.dumps(index, indent=2))
        os.replace(index_file.with_name(index_file.name + ".tmp"), index_file)
        return index
    finally:
        tmp.unlink(missing_ok=True)


def read_index(token_file: Path, tokenizer: Tokenizer) -> dict:
    """The index of a packed token file, checked against `tokenizer`."""
    index_file = token_file.with_name(token_file.name + ".json")
    if not token_file.is_file() or not index_file.is_file():
        raise DataError(f"{token_file}: packed tokens or their index are missing")
    index = json.loads(index_file.read_text())
    if index["tokenizer_sha256"] != tokenizer.sha256():
        raise DataError(
            f"{token_file}: built with tokenizer sha256 {index['tokenizer_sha256'][:12]}, "
            f"but the model's tokenizer {tokenizer.path} is {tokenizer.sha256()[:12]}"
        )
    expected = index["tokens"] * np.dtype(index["dtype"]).itemsize
    if token_file.stat().st_size != expected:
        raise DataError(f"{token_file}: {token_file.stat().st_size} bytes, the index says {expected}")
    return index


def load_tokens(token_file: Path, tokenizer: Tokenizer) -> np.ndarray:
    index = read_index(token_file, tokenizer)
    return np.memmap(token_file, dtype=np.dtype(index["dtype"]), mode="r")
