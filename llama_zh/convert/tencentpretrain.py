"""TencentPretrain LLaMA checkpoints: one torch-pickled state dict (`.bin`), docs/reference.md#formats.

The file carries no configuration: the shape comes from `model=` (heads, eps, theta) and the tokenizer
(vocab), and every tensor is checked against it. RoPE is interleaved as in Meta's weights, so q/k rows
are permuted on the way in and out.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llama_zh.atomic import AtomicOutput
from llama_zh.checkpoint import WeightStream, check_specs
from llama_zh.config import ModelConfig
from llama_zh.convert.format import Format, FormatError, WriteOptions, starts_with
from llama_zh.convert.keys import KeyMap, halves_to_interleaved, interleaved_to_halves, rope_permuter
from llama_zh.tensor_io import CheckpointError, stream_bytes, torch_load_weights
from llama_zh.tokenizer import Tokenizer

KEYS = KeyMap(
    {
        "embed.weight": "embedding.word.embedding.weight",
        "layers.{i}.attn_norm.weight": "encoder.transformer.{i}.layer_norm_1.weight",
        "layers.{i}.attn.wq.weight": "encoder.transformer.{i}.self_attn.linear_layers.0.weight",
        "layers.{i}.attn.wk.weight": "encoder.transformer.{i}.self_attn.linear_layers.1.weight",
        "layers.{i}.attn.wv.weight": "encoder.transformer.{i}.self_attn.linear_layers.2.weight",
        "layers.{i}.attn.wo.weight": "encoder.transformer.{i}.self_attn.final_linear.weight",
        "layers.{i}.ffn_norm.weight": "encoder.transformer.{i}.layer_norm_2.weight",
        "layers.{i}.ffn.w_gate.weight": "encoder.transformer.{i}.feed_forward.linear_gate.weight",
        "layers.{i}.ffn.w_up.weight": "encoder.transformer.{i}.feed_forward.linear_1.weight",
        "layers.{i}.ffn.w_down.weight": "encoder.transformer.{i}.feed_forward.linear_2.weight",
        "norm.weight": "encoder.layer_norm.weight",
        "head.weight": "target.lm.output_layer.weight",
    }
)


def read(path: Path, config: ModelConfig, tokenizer: Path | None = None) -> WeightStream:
    path = Path(path)
    state = torch_load_weights(path)  # memory-mapped
    rename = KEYS.renamer(str(path))
    names = {key: rename(key) for key in state}
    specs = {names[k]: (t.dtype, tuple(t.shape)) for k, t in state.items() if names[k] is not None}
    if config.vocab_size is None and "embed.weight" in specs:
        raise CheckpointError(
            f"{path}: the vocab size is unknown: pass the tokenizer (stage.tokenizer) or set model.vocab_size"
        )
    del state
    permute = rope_permuter(config.n_heads, config.n_kv_heads, interleaved_to_halves)

    def tensors():
        state = torch_load_weights(path)
        for key, name in names.items():
            if name is not None:
                yield name, permute(name, state[key]).clone()
        del state

    stream = WeightStream(config, specs, tensors, Path(tokenizer) if tokenizer else None, source=str(path))
    check_specs(stream)
    return stream


def write(stream: WeightStream, path: Path, overwrite: bool = False, **_) -> Path:
    """A single pickle of tensors, as TencentPretrain saves it (this format cannot be streamed)."""
    check_specs(stream)
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists (set overwrite to replace it)")
    permute = rope_permuter(stream.config.n_heads, stream.config.n_kv_heads, halves_to_interleaved)
    with AtomicOutput(
        path, mode="wb", overwrite=overwrite, need_bytes=stream_bytes(stream.specs), exists_error=CheckpointError
    ) as out:
        state = {KEYS.to_outside(name): permute(name, t).contiguous() for name, t in stream.tensors()}
        # A file object, not a path: torch's own file writer reports a full disk as "unexpected pos".
        torch.save(state, out.file)
    return path


# torch.save writes a zip archive, torch before 1.6 a bare pickle (docs/reference.md#formats).
TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def is_tencentpretrain(path: Path) -> bool:
    """A single torch file: the only one-file format read here that torch saves (a Hugging Face
    pytorch_model.bin sits in a directory with its config.json)."""
    return Path(path).is_file() and any(starts_with(path, magic) for magic in TORCH_MAGIC)


def _read(path: Path, model: ModelConfig | None, tokenizer: Path | None) -> WeightStream:
    """The shape from `model` (the file has none), its vocabulary from `tokenizer` when model.vocab_size is null."""
    if model is None:
        raise FormatError(
            f"{path}: a TencentPretrain file carries no configuration: choose its shape with model=<name>"
        )
    if model.vocab_size is None:
        if tokenizer is None:
            raise FormatError(
                "model.vocab_size is null: pass stage.tokenizer so the vocabulary size can be read from it"
            )
        model = model.with_vocab(Tokenizer(tokenizer).vocab_size)
    return read(path, model, tokenizer)


def _write(stream: WeightStream, dst: Path, options: WriteOptions) -> Path:
    return write(stream, dst, overwrite=options.overwrite)


FORMAT = Format(
    "tencentpretrain",
    "a torch .bin file (TencentPretrain)",
    is_tencentpretrain,
    _read,
    _write,
    carries_template=False,
    sharded=False,
)
