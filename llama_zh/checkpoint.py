"""The native checkpoint: a directory every stage reads and writes.

    model.safetensors                      or  model-00001-of-00003.safetensors ... + model.safetensors.index.json
    model_config.yaml                      format_version, the ModelConfig, dtype
    tokenizer.model | tokenizer.json       the tokenizer the weights were trained with (sentencepiece, or a
      (+ tokenizer_config.json)            byte-level BPE with its special tokens and chat template)

Weights move as a `WeightStream`: the native names, dtypes and shapes known up front, the tensors
produced one at a time. Every converter reads into one and writes from one, so no format is ever
held whole in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from llama_zh.config import ModelConfig, from_mapping
from llama_zh.dtypes import dtype_name
from llama_zh.model import Transformer, build_model
from llama_zh.tensor_io import (
    CheckpointDir,
    CheckpointError,
    Spec,
    safetensors_files,
    safetensors_stream,
    stream_bytes,
    write_safetensors_shards,
)
from llama_zh.tokenizer import Tokenizer, copy_tokenizer, file_sha256, find_tokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "model_config.yaml"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3


@dataclass
class WeightStream:
    config: ModelConfig
    specs: dict[str, Spec]  # native name -> (dtype, shape), in the order `tensors()` yields them
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    tokenizer: Path | None = None
    source: str = ""  # where the weights come from, for error messages
    notes: list[str] = field(default_factory=list)
    tokenizer_sha256: str | None = None  # the hash a native checkpoint recorded for its tokenizer.model
    keep: object = (
        None  # what `tokenizer` lives in when a reader made it (a TemporaryDirectory): kept while the stream is
    )

    def cast(self, dtype: torch.dtype | None) -> WeightStream:
        if dtype is None:
            return self

        def tensors():
            for name, t in self.tensors():
                t = t.to(dtype) if t.is_floating_point() else t
                yield name, t
                del t  # before the next read: one tensor alive at a time

        specs = {n: (dtype if d.is_floating_point else d, s) for n, (d, s) in self.specs.items()}
        return WeightStream(
            self.config, specs, tensors, self.tokenizer, self.source, self.notes, self.tokenizer_sha256, self.keep
        )


def expected_specs(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Native parameter names and shapes for `config` (from a meta-device model: no memory)."""
    model = build_model(config, device="meta")
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def check_specs(stream: WeightStream) -> None:
    """Every parameter present once, with the shape the config implies, and nothing else."""
    expected = expected_specs(stream.config)
    missing = [n for n in expected if n not in stream.specs]
    extra = [n for n in stream.specs if n not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}")
        raise CheckpointError(f"{stream.source}: tensors do not match the model config: {'; '.join(parts)}")
    for name, shape in expected.items():
        got = stream.specs[name][1]
        if tuple(got) != shape:
            raise CheckpointError(
                f"{stream.source}: tensor {name} has shape {tuple(got)}, the model config "
                f"(dim={stream.config.dim}, vocab_size={stream.config.vocab_size}, ffn_dim={stream.config.ffn_dim}, "
                f"n_heads={stream.config.n_heads}, n_kv_heads={stream.config.n_kv_heads}) implies {shape}"
            )


# ---------------------------------------------------------------------------------------------- writing


def write_native(
    stream: WeightStream,
    path: Path,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    extra: dict | None = None,
) -> Path:
    """Write `stream` as a native checkpoint directory at `path`, atomically."""
    check_specs(stream)
    dtypes = {d for d, _ in stream.specs.values()}
    target = CheckpointDir(path, overwrite, stream_bytes(stream.specs))
    with target:
        write_safetensors_shards(target.tmp, stream.specs, stream.tensors(), max_shard_bytes)
        meta = {
            "format_version": FORMAT_VERSION,
            "model": stream.config.to_dict(),
            "dtype": dtype_name(next(iter(dtypes))) if len(dtypes) == 1 else "mixed",
            # Checked on load: a same-size tokenizer swapped in would otherwise go unnoticed.
            "tokenizer_sha256": file_sha256(stream.tokenizer) if stream.tokenizer is not None else None,
        }
        if extra:
            meta.update(extra)
        (target.tmp / CONFIG_FILE).write_text(yaml.safe_dump(meta, sort_keys=False, allow_unicode=True))
        if stream.tokenizer is not None:
            copy_tokenizer(stream.tokenizer, target.tmp)
        return target.commit()


def model_stream(model: Transformer, tokenizer: Path | None = None) -> WeightStream:
    state = {n: p for n, p in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("head.weight", None)  # the embedding's own tensor: written once, as embed.weight
    specs = {n: (t.dtype, tuple(t.shape)) for n, t in state.items()}
    return WeightStream(model.config, specs, lambda: iter(state.items()), tokenizer, source="in-memory model")


def save_checkpoint(
    model: Transformer, path: Path, tokenizer: Path | None = None, overwrite: bool = True, extra: dict | None = None
) -> Path:
    return write_native(model_stream(model, tokenizer), path, overwrite=overwrite, extra=extra)


# ---------------------------------------------------------------------------------------------- reading


def is_native(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_native(path: Path) -> WeightStream:
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{path}: not a native checkpoint (no {CONFIG_FILE})")
    try:
        meta = yaml.safe_load(config_file.read_text())
    except yaml.YAMLError as e:
        raise CheckpointError(f"{config_file}: not valid YAML ({e})") from e
    if not isinstance(meta, dict) or "model" not in meta:
        raise CheckpointError(f"{config_file}: expected keys format_version and model")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{config_file}: format_version {meta.get('format_version')!r}, this llama_zh reads {FORMAT_VERSION}"
        )
    config = from_mapping(ModelConfig, meta["model"], f"{config_file}: model", what="field")
    files = safetensors_files(path, "model")
    if not files:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    specs, tensors = safetensors_stream(files, lambda k: k)
    tok = find_tokenizer(path) or path / "tokenizer.model"
    recorded = meta.get("tokenizer_sha256")
    if tok.is_file():
        check_tokenizer(path, tok, recorded)
    return WeightStream(
        config, specs, tensors, tok if tok.is_file() else None, source=str(path), tokenizer_sha256=recorded
    )


def check_tokenizer(checkpoint: Path, tokenizer: Path, recorded: str | None, what: str | None = None) -> None:
    """The tokenizer must be the one the weights were written with: ids mean nothing under another."""
    if recorded is None:
        # Written before checkpoints recorded the hash: nothing to compare with.
        log.debug("%s: no tokenizer_sha256 in %s, tokenizer not checked", checkpoint, CONFIG_FILE)
        return
    actual = file_sha256(tokenizer)
    if actual != recorded:
        raise CheckpointError(
            f"{checkpoint}: {what or tokenizer.name} has sha256 {actual}, but the weights were written with "
            f"a tokenizer of sha256 {recorded} ({CONFIG_FILE} tokenizer_sha256); use the tokenizer "
            "they were trained with"
        )


def load_model(
    stream: WeightStream, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Transformer:
    check_specs(stream)
    model = build_model(stream.config, device="meta")
    state = {}
    for name, t in stream.tensors():
        state[name] = t.to(device=device, dtype=dtype or t.dtype)
    if stream.config.tie_word_embeddings:
        state["head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign gave the head a Parameter of its own
    return model


def stream_tokenizer(stream: WeightStream) -> Tokenizer | None:
    """The tokenizer a checkpoint carries (None if none), refused if it has more pieces than the model
    has embedding rows: both loaders (this module's and llama_zh.infer's) check it here."""
    if stream.tokenizer is None:
        return None
    tokenizer = Tokenizer(stream.tokenizer)
    if tokenizer.vocab_size > stream.config.vocab_size:
        raise CheckpointError(
            f"{stream.tokenizer}: tokenizer has {tokenizer.vocab_size} pieces, "
            f"the model's vocab_size is {stream.config.vocab_size}"
        )
    return tokenizer
