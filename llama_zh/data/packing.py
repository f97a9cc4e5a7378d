"""Tokenizing corpus files in worker processes and packing them end to end into token shards.

Each document becomes `<s> ids </s>` and follows the previous one directly: no padded tails, so
every token trained on is real text. A shard holds whole documents and is closed at the first
document end at or past `shard_tokens`; its tokens are raw uint16 (uint32 past 65,536 pieces), read
back memory-mapped. Beside each shard a JSON index records its documents, tokens, source, the byte
range of the corpus file it covers and the tokenizer's sha256, so shards built with another tokenizer
are refused rather than silently mis-read.

Files of one corpus file (`<prefix>` = `<source>.<split>`):
    <prefix>.00000.bin, <prefix>.00000.bin.json, ...   shards and their indexes
    <prefix>.json                                      the manifest, written once every shard is complete
A shard is written under a temporary name and renamed, then its index is written the same way
(llama_zh.atomic): a shard counts as finished only once its index exists, and a temporary is never
read. A rerun with a manifest does nothing; without one it keeps the finished shards and resumes at
the corpus byte where the last one ended. One process packs a corpus file at a time (`.<prefix>.lock`).

The corpus file is cut into blocks at line ends by byte count alone, blocks are encoded in any order
by `num_proc` workers and written strictly in file order, so the shard bytes do not depend on `num_proc`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import multiprocessing
import re
import signal
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llama_zh.atomic import AtomicOutput, human_bytes, output_lock, process_alive, write_text
from llama_zh.data.corpus import DataError
from llama_zh.tokenizer import DocumentsEncoder, Tokenizer

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
BLOCK_BYTES = 1 << 20  # the unit of work sent to a worker: ~30 ms of encoding
PENDING_PER_WORKER = 2  # blocks in flight per worker: enough to keep it busy, bounded memory


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# ---- encoding a block of lines (in a worker, or in this process when num_proc is 1)


@dataclass
class EncodedBlock:
    tokens: np.ndarray  # `<s> ids </s>` of every document of the block, back to back
    doc_tokens: np.ndarray  # (documents,) tokens per document
    doc_ends: np.ndarray  # (documents,) corpus byte offset just past each document's line
    end: int  # corpus byte offset where the block ends


def split_blocks(path: Path, start: int, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, int]]:
    """(start, end) byte ranges of `path` from `start`, each about `block_bytes` long and ending at a line end."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        while start < size:
            if start + block_bytes >= size:
                yield start, size
                return
            f.seek(start + block_bytes - 1)
            f.readline()
            end = f.tell()
            yield start, end
            start = end


def encode_block(encoder: DocumentsEncoder, path: str, start: int, end: int, dtype: np.dtype) -> EncodedBlock:
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    # One decode and one split per block, and the line ends from the newline bytes: no per-line Python work.
    docs = data.decode("utf-8").split("\n")
    line_ends = start + 1 + np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n"))
    if docs[-1]:  # the file's last line, without a newline
        line_ends = np.append(line_ends, end)
    else:
        docs.pop()
    if not all(docs):
        line_ends = line_ends[[i for i, doc in enumerate(docs) if doc]]
        docs = [doc for doc in docs if doc]
    tokens, doc_tokens = encoder.encode(docs, dtype)
    return EncodedBlock(tokens, doc_tokens, line_ends, end)


_worker: tuple[DocumentsEncoder, np.dtype] | None = None


@contextlib.contextmanager
def _no_cyclic_gc():
    """Encoding makes no reference cycles, only strings, lists and arrays freed by reference counting,
    but the many objects it allocates set off the cyclic collector, which then walks every object of
    the process: in a forked worker that is the parent's whole heap (torch's modules included), each
    walk touching copy-on-write pages. Measured on 100 MB (2 workers, 2 cores): 3.2 s with it, 2.5-2.8 s
    without (experiments/packing.md)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _init_worker(encoder: DocumentsEncoder, dtype_name: str) -> None:
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it terminates the pool
    gc.disable()  # see _no_cyclic_gc; a worker runs nothing else
    _worker = (encoder, np.dtype(dtype_name))


def _encode_block_in_worker(path: str, start: int, end: int) -> EncodedBlock:
    encoder, dtype = _worker
    return encode_block(encoder, path, start, end, dtype)


class BlockEncoder:
    """Encodes blocks of a corpus file in `num_proc` processes (1: in this one), yielding them in order."""

    def __init__(self, tokenizer: Tokenizer, num_proc: int):
        self.tokenizer, self.num_proc = tokenizer, num_proc
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.encoder = tokenizer.documents_encoder()
        self.pool = None

    def encode(self, path: Path, blocks: Iterable[tuple[int, int]]) -> Iterator[EncodedBlock]:
        if self.num_proc == 1:
            for start, end in blocks:
                with _no_cyclic_gc():
                    block = encode_block(self.encoder, str(path), start, end, self.dtype)
                yield block
            return
        pool = self._pool()
        pending: deque = deque()
        for start, end in blocks:
            pending.append(pool.apply_async(_encode_block_in_worker, (str(path), start, end)))
            if len(pending) >= PENDING_PER_WORKER * self.num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def _pool(self):
        if self.pool is None:
            # fork: a spawned worker would re-import llama_zh (and torch with it), seconds per start.
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            self.pool = context.Pool(self.num_proc, _init_worker, (self.encoder, self.dtype.name))
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def __enter__(self) -> BlockEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- writing shards


def index_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".json")


def shard_path(out_dir: Path, prefix: str, number: int) -> Path:
    return out_dir / f"{prefix}.{number:05d}.bin"


def _write_json(path: Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2))


class ShardWriter:
    """Appends encoded blocks to numbered shards, closing each at the first document end past `shard_tokens`."""

    def __init__(
        self,
        out_dir: Path,
        prefix: str,
        common: dict,
        shard_tokens: int,
        dtype: np.dtype,
        first_shard: int,
        corpus_start: int,
        first_document: int,
    ):
        self.out_dir, self.prefix, self.common = out_dir, prefix, common
        self.shard_tokens, self.dtype = shard_tokens, dtype
        self.number, self.corpus_start, self.first_document = first_shard, corpus_start, first_document
        self.written: list[Path] = []
        self._open()

    def _open(self) -> None:
        self.path = shard_path(self.out_dir, self.prefix, self.number)
        self.out = AtomicOutput(self.path, mode="wb", lock=False).begin()  # pack_corpus_file holds the lock
        self.file = self.out.file
        self.documents = self.tokens = 0

    def add(self, block: EncodedBlock) -> None:
        ends = np.cumsum(block.doc_tokens)  # token offset in block.tokens just past each document
        doc, offset = 0, 0
        while doc < len(ends):
            # The first document at whose end this shard holds at least shard_tokens.
            last = int(np.searchsorted(ends, offset + self.shard_tokens - self.tokens, side="left"))
            if last >= len(ends):
                self._append(block.tokens[offset:], len(ends) - doc)
                return
            self._append(block.tokens[offset : ends[last]], last + 1 - doc)
            self._close(int(block.doc_ends[last]))
            doc, offset = last + 1, int(ends[last])
            self._open()

    def _append(self, tokens: np.ndarray, documents: int) -> None:
        self.file.write(tokens.tobytes())
        self.tokens += len(tokens)
        self.documents += documents

    def _close(self, corpus_end: int) -> None:
        self.out.commit()
        index = {
            **self.common,
            "shard": self.number,
            "documents": self.documents,
            "tokens": self.tokens,
            "dtype": self.dtype.name,
            "first_document": self.first_document,
            "corpus_start": self.corpus_start,
            "corpus_end": corpus_end,
        }
        _write_json(index_path(self.path), index)  # last: the shard is finished once this exists
        self.written.append(self.path)
        self.number += 1
        self.corpus_start, self.first_document = corpus_end, self.first_document + self.documents

    def finish(self, corpus_end: int) -> list[Path]:
        """Close the last shard (if it holds any document) and return the shards written."""
        if self.documents:
            self._close(corpus_end)
        else:
            self.out.abort()
        return self.written

    def abort(self, exc: BaseException | None = None) -> None:
        """Remove the shard being written (finished ones stay: a rerun resumes after them); a full disk
        behind `exc` is raised as one line naming the shard."""
        self.out.abort(exc)


# ---- packing one corpus file, resuming where a previous run stopped


@dataclass
class PackResult:
    shards: list[Path]
    documents: int
    tokens: int
    reused_shards: int  # finished shards found from an earlier run
    bytes_packed: int = 0  # corpus bytes tokenized by this run
    tokens_packed: int = 0
    seconds: float = 0.0
    indexes: list[dict] = field(default_factory=list, repr=False)


def _finished_index(shard: Path, expected: dict) -> dict | None:
    """The index of `shard` if it is complete and was built from the same corpus, tokenizer and shard size."""
    try:
        index = json.loads(index_path(shard).read_text())
    except (OSError, ValueError):
        return None
    if any(index.get(k) != v for k, v in expected.items()) or not shard.is_file():
        return None
    if shard.stat().st_size != index["tokens"] * np.dtype(index["dtype"]).itemsize:
        return None
    return index


def _remove_from(out_dir: Path, prefix: str, first: int) -> None:
    """Delete shards numbered `first` and up, their indexes and any temporary file of this prefix whose
    writer is gone (the caller holds the prefix's lock)."""
    pattern = re.compile(rf"(\.)?{re.escape(prefix)}\.(\d{{5}})\.bin(\.json)?(\.tmp(?:-(\d+)-[0-9a-f]+)?)?")
    for path in out_dir.iterdir():
        m = pattern.fullmatch(path.name)
        if not m or bool(m.group(1)) != bool(m.group(5)):
            continue
        if m.group(4):
            if m.group(5) and process_alive(int(m.group(5))):
                continue
            log.info("removed stale temporary %s (%s)", path, human_bytes(path.stat().st_size))
            path.unlink()
        elif int(m.group(2)) >= first:
            path.unlink()


def pack_corpus_file(
    corpus: Path,
    corpus_sha1: str,
    tokenizer: Tokenizer,
    encoder: BlockEncoder,
    out_dir: Path,
    source: str,
    split: str,
    shard_tokens: int,
    block_bytes: int = BLOCK_BYTES,
    progress: bool | None = None,
) -> PackResult:
    """Pack `corpus` (one document a line) into shards `<source>.<split>.NNNNN.bin` under `out_dir`.

    `corpus_sha1` identifies the corpus content: shards of another content are rebuilt, not resumed.
    """
    prefix = f"{source}.{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    # A second process packing the same file (another prepare, or a training run's data setup) waits,
    # then finds the shards complete.
    with output_lock(out_dir / prefix, wait=True):
        return _pack_locked(
            corpus, corpus_sha1, tokenizer, encoder, out_dir, source, split, shard_tokens, block_bytes, progress
        )


def _pack_locked(
    corpus: Path,
    corpus_sha1: str,
    tokenizer: Tokenizer,
    encoder: BlockEncoder,
    out_dir: Path,
    source: str,
    split: str,
    shard_tokens: int,
    block_bytes: int,
    progress: bool | None,
) -> PackResult:
    prefix = f"{source}.{split}"
    expected = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "split": split,
        "corpus_sha1": corpus_sha1,
        "tokenizer_sha256": tokenizer.sha256(),
        "shard_tokens": shard_tokens,
    }
    manifest_file = out_dir / f"{prefix}.json"
    indexes = _manifest_indexes(manifest_file, out_dir, expected)
    if indexes is not None:
        return _result(out_dir, prefix, indexes, reused=len(indexes))
    manifest_file.unlink(missing_ok=True)

    indexes = []
    while (index := _finished_index(shard_path(out_dir, prefix, len(indexes)), expected)) is not None:
        indexes.append(index)
    _remove_from(out_dir, prefix, len(indexes))
    reused = len(indexes)
    start = indexes[-1]["corpus_end"] if indexes else 0
    first_document = indexes[-1]["first_document"] + indexes[-1]["documents"] if indexes else 0
    if reused:
        log.info("%s: resuming after %d finished shards, at corpus byte %d", prefix, reused, start)

    common = {
        **expected,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_kind": tokenizer.kind,
        "corpus_file": corpus.name,
    }
    size = corpus.stat().st_size
    began = time.perf_counter()
    writer = ShardWriter(out_dir, prefix, common, shard_tokens, encoder.dtype, reused, start, first_document)
    bar = _progress_bar(prefix, size, start, progress)
    tokens_packed, position = 0, start
    try:
        for block in encoder.encode(corpus, split_blocks(corpus, start, block_bytes)):
            writer.add(block)
            tokens_packed += len(block.tokens)
            bar.update(block.end - position)
            position = block.end
            bar.set_postfix_str(
                f"{tokens_packed / max(time.perf_counter() - began, 1e-9) / 1e6:.2f}M tokens/s", refresh=False
            )
        writer.finish(size)
    except BaseException as e:
        writer.abort(e)
        raise
    finally:
        bar.close()
    indexes += [json.loads(index_path(p).read_text()) for p in writer.written]
    manifest = {
        **expected,
        "shards": [shard_path(out_dir, prefix, i["shard"]).name for i in indexes],
        "documents": sum(i["documents"] for i in indexes),
        "tokens": sum(i["tokens"] for i in indexes),
    }
    _write_json(manifest_file, manifest)
    result = _result(out_dir, prefix, indexes, reused)
    result.bytes_packed, result.tokens_packed = size - start, tokens_packed
    result.seconds = time.perf_counter() - began
    return result


def _manifest_indexes(manifest_file: Path, out_dir: Path, expected: dict) -> list[dict] | None:
    """The shard indexes of a complete earlier run with the same inputs, or None."""
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, ValueError):
        return None
    if any(manifest.get(k) != v for k, v in expected.items()):
        return None
    indexes = [_finished_index(out_dir / name, expected) for name in manifest["shards"]]
    return None if any(i is None for i in indexes) else indexes


def _result(out_dir: Path, prefix: str, indexes: list[dict], reused: int) -> PackResult:
    shards = [shard_path(out_dir, prefix, i["shard"]) for i in indexes]
    return PackResult(
        shards, sum(i["documents"] for i in indexes), sum(i["tokens"] for i in indexes), reused, indexes=indexes
    )


def _progress_bar(name: str, total: int, initial: int, enabled: bool | None):
    from tqdm import tqdm

    # disable=None: shown on a terminal, silent in logs and tests.
    return tqdm(
        total=total,
        initial=initial,
        desc=name,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        disable=None if enabled is None else not enabled,
        leave=False,
    )


# ---- reading shards


def read_index(token_file: Path, tokenizer: Tokenizer) -> dict:
    """The index of a finished shard, checked against `tokenizer`."""
    if token_file.name.endswith(".tmp"):
        raise DataError(f"{token_file}: an unfinished shard (a .tmp file is never read)")
    index_file = index_path(token_file)
    if not token_file.is_file() or not index_file.is_file():
        raise DataError(f"{token_file}: packed tokens or their index are missing")
    index = json.loads(index_file.read_text())
    if index["tokenizer_sha256"] != tokenizer.sha256():
        raise DataError(
            f"{token_file}: built with tokenizer sha256 {index['tokenizer_sha256'][:12]}"
            f"{' (' + index['tokenizer_kind'] + ')' if index.get('tokenizer_kind') else ''}, "
            f"but the model's tokenizer {tokenizer.path} ({tokenizer.kind}) is {tokenizer.sha256()[:12]}; "
            "repack with it"
        )
    expected = index["tokens"] * np.dtype(index["dtype"]).itemsize
    if token_file.stat().st_size != expected:
        raise DataError(f"{token_file}: {token_file.stat().st_size} bytes, the index says {expected}")
    return index


def load_tokens(token_file: Path, tokenizer: Tokenizer) -> np.ndarray:
    """The tokens of a finished shard, memory-mapped (read-only)."""
    index = read_index(token_file, tokenizer)
    if index["tokens"] == 0:
        return np.empty(0, np.dtype(index["dtype"]))
    return np.memmap(token_file, dtype=np.dtype(index["dtype"]), mode="r")
