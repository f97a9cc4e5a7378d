"""The one table of checkpoint formats, and every dispatch on a format name or on what is on disk.

stage=convert picks a reader and a writer by name (`read`, `write`); everything that loads a checkpoint
without being told its format (`read_any`: llama_zh.load_checkpoint, the inference loader, the
training stages) recognises it here, by the first format in `FORMATS` whose `detect` accepts it.
The order matters only where two layouts can meet: a native checkpoint before the adapter files a
finetune=lora run writes beside it, Hugging Face's config.json before a stray params.json.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llama_zh.checkpoint import DEFAULT_SHARD_BYTES, WeightStream, load_model, stream_tokenizer
from llama_zh.config import ModelConfig
from llama_zh.convert import gguf, hf, meta, native, peft, tencentpretrain
from llama_zh.convert.format import Format, FormatError, WriteOptions
from llama_zh.tensor_io import CheckpointError

FORMATS: tuple[Format, ...] = (
    native.FORMAT,
    hf.FORMAT,
    meta.FORMAT,
    tencentpretrain.FORMAT,
    gguf.FORMAT,
    peft.FORMAT,
)
BY_NAME = {f.name: f for f in FORMATS}
SOURCE_FORMATS = tuple(f.name for f in FORMATS if f.read is not None)
DESTINATION_FORMATS = tuple(f.name for f in FORMATS if f.write is not None)
ONE_FILE_FORMATS = tuple(f.name for f in FORMATS if f.write is not None and not f.sharded)


def source(name: str) -> Format:
    """The format stage.src_format names, refused unless it can be read."""
    if name not in SOURCE_FORMATS:
        raise FormatError(f"stage.src_format: unknown format {name!r}; expected one of {', '.join(SOURCE_FORMATS)}")
    return BY_NAME[name]


def destination(name: str) -> Format:
    """The format stage.dst_format names, refused unless it can be written."""
    if name not in DESTINATION_FORMATS:
        raise FormatError(
            f"stage.dst_format: unknown format {name!r}; expected one of {', '.join(DESTINATION_FORMATS)}"
        )
    return BY_NAME[name]


def detect(path: Path) -> Format | None:
    """The format of what is at `path`, None when no format recognises it."""
    return next((f for f in FORMATS if f.detect(Path(path))), None)


def known_layouts() -> str:
    return "; ".join(f"{f.name}: {f.layout}" for f in FORMATS)


def read_any(path: Path) -> WeightStream:
    """The checkpoint at `path`, whichever readable format its layout shows (a TencentPretrain file,
    which holds no shape, is refused: stage=convert reads it with model=)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory or file")
    fmt = detect(path)
    if fmt is None:
        raise CheckpointError(f"{path}: neither a native checkpoint nor any other known format ({known_layouts()})")
    if fmt.read is None:
        raise CheckpointError(f"{path}: {fmt.unreadable}")
    return fmt.read(path, None, None)


def read(src: Path, src_format: str, model: ModelConfig | None = None, tokenizer: Path | None = None) -> WeightStream:
    """`src` read as `src_format`; `model` gives the shape of a format that records none (tencentpretrain)."""
    src = Path(src)
    fmt = source(src_format)
    if not src.exists():
        raise FormatError(f"stage.src: {src} does not exist")
    return fmt.read(src, model, tokenizer)


def write(
    stream: WeightStream,
    dst: Path,
    dst_format: str,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    chat_template: str | None = None,
    gguf_type: str | None = None,
) -> Path:
    if gguf_type is not None and dst_format != gguf.FORMAT.name:
        raise FormatError(f"stage.gguf_type={gguf_type} applies to stage.dst_format=gguf, not {dst_format}")
    fmt = destination(dst_format)
    options = WriteOptions(overwrite, max_shard_bytes, chat_template, gguf_type)
    return fmt.write(stream, Path(dst), options)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) from a checkpoint of any readable format (`read_any`: native, Hugging Face,
    Meta); tokenizer is None if the checkpoint has none.

    The plain training architecture as stored (what merges, conversions and parity checks compare);
    for inference (quantization, the fused modules, the CPU kernel) use llama_zh.infer.load."""
    stream = read_any(Path(path))
    tokenizer = stream_tokenizer(stream)
    return load_model(stream, device, dtype).eval(), tokenizer
