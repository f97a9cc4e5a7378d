"""Conversion between the native checkpoint and outside formats, any reader to any writer.

The formats, and every choice made by a format's name or by what is on disk, are in one table:
llama_zh.convert.registry (`FORMATS`, `read`, `write`, `read_any`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from llama_zh.checkpoint import DEFAULT_SHARD_BYTES
from llama_zh.config import ModelConfig
from llama_zh.convert.format import Format, FormatError, WriteOptions
from llama_zh.convert.registry import (
    DESTINATION_FORMATS,
    FORMATS,
    SOURCE_FORMATS,
    destination,
    detect,
    load_checkpoint,
    read,
    read_any,
    source,
    write,
)
from llama_zh.data.chat_template import export_template

__all__ = [
    "DESTINATION_FORMATS",
    "FORMATS",
    "SOURCE_FORMATS",
    "Format",
    "FormatError",
    "WriteOptions",
    "check_honoured",
    "convert",
    "destination",
    "detect",
    "load_checkpoint",
    "read",
    "read_any",
    "source",
    "write",
]


def check_honoured(src_format: str, dst_format: str, tokenizer: Path | None, dtype: torch.dtype | None) -> None:
    """Refuse an option the destination's writer would not honour, rather than write something else."""
    if dst_format == "gguf" and dtype not in (None, torch.float16):
        # The GGUF file's types are stage.gguf_type's (llama_zh.convert.gguf), whatever the source dtype.
        raise FormatError(
            f"stage.dtype={str(dtype).removeprefix('torch.')}: the GGUF export takes its tensor types "
            "from stage.gguf_type (f32, f16, bf16, q8_0, ...), not stage.dtype; use stage.gguf_type"
        )
    if dst_format == "tencentpretrain" and tokenizer is not None and src_format != "tencentpretrain":
        raise FormatError(
            f"stage.tokenizer={tokenizer}: a TencentPretrain .bin holds no tokenizer, so it would be "
            "dropped; leave stage.tokenizer unset (keep the tokenizer.model beside the .bin yourself)"
        )


def convert(
    src: Path,
    src_format: str,
    dst: Path,
    dst_format: str,
    model: ModelConfig | None = None,
    tokenizer: Path | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    template: str | None = None,
    gguf_type: str | None = None,
) -> Path:
    """`template`: the chat template to export, by name or .jinja path; None: the source checkpoint's, if any.
    `gguf_type`: the GGUF file's tensor type (llama_zh.convert.gguf.GGUF_TYPES); None: f16."""
    fmt = destination(dst_format)
    check_honoured(src_format, dst_format, tokenizer, dtype)
    stream = read(src, src_format, model, tokenizer).cast(dtype)
    chat_template = export_template(src, template) if fmt.carries_template else None
    return write(
        stream,
        dst,
        dst_format,
        overwrite=overwrite,
        max_shard_bytes=max_shard_bytes,
        chat_template=chat_template,
        gguf_type=gguf_type,
    )
