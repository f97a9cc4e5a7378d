"""What every checkpoint format offers the registry (llama_zh.convert.registry), in one shape.

A format module (native, hf, meta, tencentpretrain, gguf, peft) exposes `FORMAT`: its name (the value of
stage.src_format / stage.dst_format), how to recognise it on disk, and its reader and writer where it
has them. Readers produce a `WeightStream` and writers consume one, so any reader pairs with any writer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from llama_zh.checkpoint import DEFAULT_SHARD_BYTES, WeightStream
from llama_zh.config import ModelConfig
from llama_zh.errors import LlamaZhError


class FormatError(LlamaZhError, ValueError):
    pass


@dataclass(frozen=True)
class WriteOptions:
    """Every writer's options in one object, so the registry calls every writer alike; a writer reads the
    ones its format has (gguf_type only GGUF, max_shard_bytes the sharded formats)."""

    overwrite: bool = False
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    chat_template: str | None = None
    gguf_type: str | None = None


class Reader(Protocol):
    def __call__(self, path: Path, model: ModelConfig | None, tokenizer: Path | None) -> WeightStream: ...


class Writer(Protocol):
    def __call__(self, stream: WeightStream, dst: Path, options: WriteOptions) -> Path: ...


@dataclass(frozen=True)
class Format:
    name: str
    layout: str  # what marks it on disk, for the error that lists every known format
    detect: Callable[[Path], bool]  # cheap: looks at file names and at most a file's first bytes
    read: Reader | None = None
    write: Writer | None = None
    unreadable: str = ""  # why `read` is None, for a checkpoint detected as this format
    carries_template: bool = True  # whether a chat template can travel in it
    sharded: bool = True  # whether the writer splits by max_shard_bytes (False: always one file)


def starts_with(path: Path, magic: bytes) -> bool:
    """Whether `path` is a file whose first bytes are `magic` (False for a directory or unreadable file)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False
