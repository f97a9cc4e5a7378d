"""GGUF export (llama.cpp's file format), f16, with the sentencepiece tokenizer, via the `gguf` package.

- Tensor names are the gguf package's own for the llama architecture (`gguf.TENSOR_NAMES`): token_embd,
  blk.N.attn_q ..., output_norm, output. Matrices are written in f16; 1-D tensors (the norms) in f32,
  as llama.cpp's converter does for an f16 file (`general.file_type` MOSTLY_F16).
- llama.cpp's llama rotates interleaved pairs (the Meta layout), so the q and k rows are permuted
  from the native halves layout (ANCHORS §1), as llama.cpp's own Hugging Face converter does.
- The tokenizer goes in as llama.cpp reads a sentencepiece model ("llama"): every piece with its score
  and type (normal, unknown, control, user-defined, byte), bos/eos/unk ids, add_bos true. A model
  vocabulary larger than the tokenizer's (e.g. 49954 vs 49953) is padded with unused `[PADn]` pieces.
- Streaming: tensor infos are written from the specs, then each tensor as it is read, so one tensor
  is in memory at a time. The file is written under a temporary name and renamed when complete,
  after reading it back with gguf's reader (names, shapes, tokenizer pieces).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import torch

from llama_zh.atomic import AtomicOutput, close_quietly
from llama_zh.checkpoint import WeightStream, check_specs
from llama_zh.convert.keys import KeyMap, halves_to_interleaved, rope_permuter
from llama_zh.errors import LlamaZhError
from llama_zh.tensor_io import CheckpointError


class GGUFError(LlamaZhError, ValueError):
    pass


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise GGUFError(f"stage.dst_format=gguf needs the gguf package (pip install gguf): {e}") from None
    return gguf


def key_map() -> KeyMap:
    gguf = _gguf()
    T, names = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES

    def name(tensor) -> str:
        return names[tensor].replace("{bid}", "{i}") + ".weight"

    return KeyMap({
        "embed.weight": name(T.TOKEN_EMBD),
        "layers.{i}.attn_norm.weight": name(T.ATTN_NORM),
        "layers.{i}.attn.wq.weight": name(T.ATTN_Q),
        "layers.{i}.attn.wk.weight": name(T.ATTN_K),
        "layers.{i}.attn.wv.weight": name(T.ATTN_V),
        "layers.{i}.attn.wo.weight": name(T.ATTN_OUT),
        "layers.{i}.ffn_norm.weight": name(T.FFN_NORM),
        "layers.{i}.ffn.w_gate.weight": name(T.FFN_GATE),
        "layers.{i}.ffn.w_up.weight": name(T.FFN_UP),
        "layers.{i}.ffn.w_down.weight": name(T.FFN_DOWN),
        "norm.weight": name(T.OUTPUT_NORM),
        "head.weight": name(T.OUTPUT),
    })


def file_dtype(shape: tuple[int, ...]) -> np.dtype:
    return np.dtype(np.float16) if len(shape) >= 2 else np.dtype(np.float32)


def tokenizer_vocab(tokenizer: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int], dict[str, int]]:
    """(pieces, scores, token types, special ids) of a sentencepiece model, padded to `vocab_size`."""
    from sentencepiece import sentencepiece_model_pb2

    gguf = _gguf()
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(tokenizer).read_bytes())
    except Exception as e:  # protobuf's DecodeError and friends
        raise GGUFError(f"{tokenizer}: not a sentencepiece model ({e})") from None
    if len(proto.pieces) > vocab_size:
        raise CheckpointError(f"{tokenizer}: {len(proto.pieces)} pieces, more than the model's vocab_size {vocab_size}")
    # sentencepiece's piece types have the values of gguf's TokenType (NORMAL 1 ... BYTE 6).
    pieces = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    for i in range(len(pieces), vocab_size):
        pieces.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    spec = proto.trainer_spec
    special = {"bos": spec.bos_id, "eos": spec.eos_id, "unk": spec.unk_id, "pad": spec.pad_id}
    return pieces, scores, types, special


def gguf_path(dst: Path) -> Path:
    dst = Path(dst)
    return dst if dst.suffix == ".gguf" else dst.with_name(dst.name + ".gguf")


def write(stream: WeightStream, dst: Path, overwrite: bool = False, chat_template: str | None = None) -> Path:
    """Write `stream` as an f16 GGUF file (dst, `.gguf` appended if missing); returns its path."""
    gguf = _gguf()
    if stream.tokenizer is None:
        raise GGUFError(f"{stream.source}: no tokenizer.model to embed in the GGUF file (pass stage.tokenizer)")
    check_specs(stream)
    path = gguf_path(dst)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists (set overwrite to replace it)")
    config, keys = stream.config, key_map()
    pieces, scores, types, special = tokenizer_vocab(stream.tokenizer, config.vocab_size)

    need = sum(int(np.prod(shape)) * file_dtype(shape).itemsize for _, shape in stream.specs.values())
    with AtomicOutput(path, overwrite=overwrite, need_bytes=need, exists_error=CheckpointError) as out:
        writer = gguf.GGUFWriter(out.tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        try:
            _write_gguf(writer, stream, keys, pieces, scores, types, special, chat_template)
        finally:
            for f in writer.fout or []:
                close_quietly(f)  # its buffer may not fit on a full disk: the write's own error says so
            writer.fout = None
        check_file(out.tmp, {keys.to_outside(n): tuple(s) for n, (_, s) in stream.specs.items()}, pieces)
    return path


def _write_gguf(writer, stream: WeightStream, keys: KeyMap, pieces: list[bytes], scores: list[float],
                types: list[int], special: dict[str, int], chat_template: str | None = None) -> None:
    gguf, config = _gguf(), stream.config
    writer.add_name(config.name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for kind, token_id in special.items():
        if token_id >= 0:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)

    for name, (_, shape) in stream.specs.items():
        dtype = file_dtype(shape)
        writer.add_tensor_info(keys.to_outside(name), shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    permute = rope_permuter(config.n_heads, config.n_kv_heads, halves_to_interleaved)
    for name, t in stream.tensors():
        t = permute(name, t)
        dtype = torch.float16 if t.ndim >= 2 else torch.float32
        _write_tensor(writer, t.to(dtype).contiguous().numpy())
        del t
    writer.close()  # flushes: a full disk shows here, not in the cleanup


def _write_tensor(writer, array: np.ndarray) -> None:
    try:
        writer.write_tensor_data(array)
    except OSError as e:
        # numpy's tofile reports a short write as "N requested and M written", without an errno; on a
        # regular file that is a full disk (or quota), which must read as one.
        if e.errno is None and "requested and" in str(e):
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({e})") from e
        raise


def check_file(path: Path, shapes: dict[str, tuple[int, ...]], pieces: list[bytes]) -> None:
    """Read `path` back with gguf's reader: the expected tensors (names, shapes, dtypes) and tokenizer pieces."""
    gguf = _gguf()
    reader = gguf.GGUFReader(path)
    got = {t.name: t for t in reader.tensors}
    if set(got) != set(shapes):
        raise GGUFError(f"{path}: read back {len(got)} tensors, wrote {len(shapes)}: "
                        f"{sorted(set(got) ^ set(shapes))[:4]} differ")
    for name, shape in shapes.items():
        t = got[name]
        expected_type = gguf.GGMLQuantizationType.F16 if len(shape) >= 2 else gguf.GGMLQuantizationType.F32
        if tuple(t.data.shape) != shape or t.tensor_type != expected_type:
            raise GGUFError(f"{path}: {name} reads back as {tuple(t.data.shape)} {t.tensor_type.name}, "
                            f"wrote {shape} {expected_type.name}")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or [tokens.parts[i].tobytes() for i in tokens.data] != pieces:
        raise GGUFError(f"{path}: the tokenizer pieces do not read back as written")
