"""The native checkpoint (llama_zh.checkpoint) as one format of the registry."""

from __future__ import annotations

from pathlib import Path

from llama_zh.checkpoint import CONFIG_FILE, WeightStream, check_tokenizer, is_native, read_native, write_native
from llama_zh.config import ModelConfig
from llama_zh.convert.format import Format, WriteOptions
from llama_zh.data.chat_template import CHECKPOINT_KEY


def read(path: Path, model: ModelConfig | None = None, tokenizer: Path | None = None) -> WeightStream:
    """The checkpoint's own shape (`model` is not read); `tokenizer` replaces its tokenizer only if it is
    the same file the weights were written with."""
    stream = read_native(path)
    if tokenizer is not None:
        # Another tokenizer in place of the recorded one is the swap read_native refuses.
        check_tokenizer(path, Path(tokenizer), stream.tokenizer_sha256, what=f"stage.tokenizer {tokenizer}")
        stream.tokenizer = Path(tokenizer)
    return stream


def write(stream: WeightStream, dst: Path, options: WriteOptions) -> Path:
    extra = {CHECKPOINT_KEY: options.chat_template} if options.chat_template else None
    return write_native(stream, dst, max_shard_bytes=options.max_shard_bytes, overwrite=options.overwrite, extra=extra)


FORMAT = Format("native", f"a directory with {CONFIG_FILE}", is_native, read, write)
