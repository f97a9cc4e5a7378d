"""Conversion between the native checkpoint and outside formats, any reader to any writer."""

from __future__ import annotations

from pathlib import Path

import torch

from llama_zh.checkpoint import DEFAULT_SHARD_BYTES, WeightStream, check_tokenizer, read_native, write_native
from llama_zh.config import ModelConfig
from llama_zh.convert import hf, meta, tencentpretrain
from llama_zh.data.chat_template import CHECKPOINT_KEY, export_template
from llama_zh.errors import LlamaZhError
from llama_zh.tokenizer import Tokenizer

SOURCE_FORMATS = ("hf", "tencentpretrain", "meta", "native")
DESTINATION_FORMATS = ("native", "hf", "tencentpretrain", "gguf")


class FormatError(LlamaZhError, ValueError):
    pass


def read(src: Path, src_format: str, model: ModelConfig | None = None, tokenizer: Path | None = None) -> WeightStream:
    src = Path(src)
    if src_format not in SOURCE_FORMATS:
        raise FormatError(
            f"stage.src_format: unknown format {src_format!r}; expected one of {', '.join(SOURCE_FORMATS)}"
        )
    if not src.exists():
        raise FormatError(f"stage.src: {src} does not exist")
    if src_format == "hf":
        return hf.read(src, tokenizer)
    if src_format == "meta":
        return meta.read(src, tokenizer)
    if src_format == "native":
        stream = read_native(src)
        if tokenizer is not None:
            # Another tokenizer in place of the recorded one is the swap read_native refuses.
            check_tokenizer(src, Path(tokenizer), stream.tokenizer_sha256, what=f"stage.tokenizer {tokenizer}")
            stream.tokenizer = Path(tokenizer)
        return stream
    if model is None:
        raise FormatError("a TencentPretrain file carries no configuration: choose its shape with model=<name>")
    if model.vocab_size is None:
        if tokenizer is None:
            raise FormatError(
                "model.vocab_size is null: pass stage.tokenizer so the vocabulary size can be read from it"
            )
        model = model.with_vocab(Tokenizer(tokenizer).vocab_size)
    return tencentpretrain.read(src, model, tokenizer)


def write(
    stream: WeightStream,
    dst: Path,
    dst_format: str,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    chat_template: str | None = None,
    gguf_type: str | None = None,
) -> Path:
    if gguf_type is not None and dst_format != "gguf":
        raise FormatError(f"stage.gguf_type={gguf_type} applies to stage.dst_format=gguf, not {dst_format}")
    if dst_format == "native":
        extra = {CHECKPOINT_KEY: chat_template} if chat_template else None
        return write_native(stream, dst, max_shard_bytes=max_shard_bytes, overwrite=overwrite, extra=extra)
    if dst_format == "hf":
        return hf.write(stream, dst, max_shard_bytes=max_shard_bytes, overwrite=overwrite, chat_template=chat_template)
    if dst_format == "tencentpretrain":
        return tencentpretrain.write(stream, dst, overwrite=overwrite)
    if dst_format == "gguf":
        from llama_zh.convert import gguf  # needs the gguf package only when asked for

        return gguf.write(stream, dst, overwrite=overwrite, chat_template=chat_template, gguf_type=gguf_type)
    raise FormatError(
        f"stage.dst_format: unknown format {dst_format!r}; expected one of {', '.join(DESTINATION_FORMATS)}"
    )


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
    if dst_format not in DESTINATION_FORMATS:
        raise FormatError(
            f"stage.dst_format: unknown format {dst_format!r}; expected one of {', '.join(DESTINATION_FORMATS)}"
        )
    check_honoured(src_format, dst_format, tokenizer, dtype)
    stream = read(src, src_format, model, tokenizer).cast(dtype)
    chat_template = export_template(src, template) if dst_format != "tencentpretrain" else None
    return write(
        stream,
        dst,
        dst_format,
        overwrite=overwrite,
        max_shard_bytes=max_shard_bytes,
        chat_template=chat_template,
        gguf_type=gguf_type,
    )
