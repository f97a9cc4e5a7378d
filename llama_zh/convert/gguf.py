"""GGUF export (llama.cpp's file format) with its tokenizer (sentencepiece or byte-level BPE), via the `gguf` package.

- Tensor names are the gguf package's own for the llama architecture (`gguf.TENSOR_NAMES`): token_embd,
  blk.N.attn_q ..., output_norm, output.
- Tensor types (`stage.gguf_type`, `tensor_type`): the matrices in the chosen type (f32, f16 by default,
  bf16, q8_0, q5_1, q5_0, q4_1, q4_0: those gguf's numpy quantizer writes); 1-D tensors (the norms) in
  f32 whatever the type, as llama.cpp's converter does. For the 4- and 5-bit types output.weight is
  q8_0: llama.cpp's llama-quantize raises it to q6_k (q8_0 when its rows do not fit q6_k's blocks of
  256), a type gguf cannot write, and the logits are the most sensitive product; token_embd keeps the
  file's type, as llama-quantize does for an untied embedding. A matrix whose rows are not a multiple of
  the type's block (32) is written f16, as both llama.cpp converters fall back, with a warning each and
  a count in the summary line. `general.file_type` names the file's type (ALL_F32, MOSTLY_F16, ...).
- llama.cpp's llama rotates interleaved pairs (the Meta layout), so the q and k rows are permuted
  from the native halves layout, as llama.cpp's own Hugging Face converter does.
- The tokenizer goes in as llama.cpp reads a sentencepiece model ("llama"): every piece with its score
  and type (normal, unknown, control, user-defined, byte), bos/eos/unk ids, add_bos true. A model
  vocabulary larger than the tokenizer's (e.g. 49954 vs 49953) is padded with unused `[PADn]` pieces.
  A tokenizer.json goes in as llama.cpp's "gpt2": tokens in the byte alphabet, merges in rank order,
  special tokens as control, pre-tokenizer "llama-bpe" (Llama-3's regex, the only split named), eot too.
- Streaming: tensor infos are written from the specs, then each tensor as it is read, so one tensor
  is in memory at a time (quantized a slab of rows at a time, so no f32 copy of a whole matrix). The
  file is written under a temporary name and renamed when complete, after reading it back with gguf's
  reader (names, shapes, types, tokenizer pieces).
"""

from __future__ import annotations

import errno
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llama_zh.atomic import AtomicOutput, close_quietly
from llama_zh.checkpoint import WeightStream, check_specs
from llama_zh.config import ModelConfig
from llama_zh.convert.format import Format, WriteOptions, starts_with
from llama_zh.convert.keys import KeyMap, halves_to_interleaved, rope_permuter
from llama_zh.errors import LlamaZhError
from llama_zh.model import rope_frequencies
from llama_zh.tensor_io import CheckpointError

log = logging.getLogger(__name__)

# stage.gguf_type -> (the matrices' GGMLQuantizationType, the file's LlamaFileType), by enum name.
GGUF_TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
DEFAULT_GGUF_TYPE = "f16"
# Types below 8 bits, whose output.weight is raised to q8_0 (see the module docstring).
LOW_BIT_TYPES = ("q5_1", "q5_0", "q4_1", "q4_0")
QUANTIZE_SLAB = 1 << 22  # elements converted to f32 at once while quantizing (16 MiB)


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

    return KeyMap(
        {
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
        }
    )


def file_types(gguf_type: str | None):
    """(matrix GGMLQuantizationType, LlamaFileType) of `stage.gguf_type`, refused with one line if unknown or
    beyond the installed gguf's quantizer."""
    gguf = _gguf()
    gguf_type = DEFAULT_GGUF_TYPE if gguf_type is None else gguf_type
    if gguf_type not in GGUF_TYPES:
        raise GGUFError(f"stage.gguf_type: {gguf_type!r}; expected one of {', '.join(GGUF_TYPES)}")
    qtype_name, ftype_name = GGUF_TYPES[gguf_type]
    qtype = gguf.GGMLQuantizationType[qtype_name]
    try:  # one block: older gguf releases lack some numpy quantizers
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        gguf.quants.quantize(np.zeros((1, block), np.float32), qtype)
    except (AttributeError, NotImplementedError) as e:
        raise GGUFError(
            f"stage.gguf_type={gguf_type}: the installed gguf package cannot write {qtype_name} ({e}); "
            f"upgrade it (pip install -U gguf)"
        ) from None
    return qtype, gguf.LlamaFileType[ftype_name]


def tensor_type(name: str, shape: tuple[int, ...], gguf_type: str | None):
    """(GGMLQuantizationType, why it differs from the file's type or None) of tensor `name` (llama.cpp's name)."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    qtype, _ = file_types(gguf_type)
    if len(shape) < 2:
        return Q.F32, None
    why = None
    if name == "output.weight" and gguf_type in LOW_BIT_TYPES:
        qtype, why = Q.Q8_0, "output"
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return Q.F16, f"row length {shape[-1]} is not a multiple of {qtype.name}'s block of {block}"
    return qtype, why


def plan_types(stream: WeightStream, keys: KeyMap, gguf_type: str | None) -> dict[str, object]:
    """Native name -> GGMLQuantizationType for every tensor of `stream`; logs each fallback and a summary."""
    types, counts = {}, Counter()
    for name, (_, shape) in stream.specs.items():
        outside = keys.to_outside(name)
        qtype, why = tensor_type(outside, tuple(shape), gguf_type)
        if why is not None and why != "output":
            log.warning("gguf: %s %s: %s; written as %s", outside, tuple(shape), why, qtype.name)
            why = "fallback"
        types[name] = qtype
        counts[qtype.name if why is None else f"{qtype.name} ({why})"] += 1
    log.info(
        "gguf %s: %s", gguf_type or DEFAULT_GGUF_TYPE, ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    )
    return types


def byte_shape(shape: tuple[int, ...], qtype) -> tuple[int, ...]:
    gguf = _gguf()
    return tuple(gguf.quants.quant_shape_to_byte_shape(shape, qtype))


def encode(t: torch.Tensor, qtype) -> np.ndarray:
    """`t` as the bytes of `qtype` (float arrays for F32/F16, uint8 for the others)."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return t.to(torch.float32).contiguous().numpy()
    if qtype == Q.F16:
        return t.to(torch.float16).contiguous().numpy()
    if qtype == Q.BF16:  # torch rounds to nearest even, as ggml does
        return t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
    rows = t.reshape(-1, t.shape[-1])
    out = np.empty(byte_shape(tuple(rows.shape), qtype), dtype=np.uint8)
    step = max(1, QUANTIZE_SLAB // rows.shape[1])
    for i in range(0, rows.shape[0], step):
        out[i : i + step] = gguf.quants.quantize(rows[i : i + step].to(torch.float32).numpy(), qtype)
    return out.reshape(byte_shape(tuple(t.shape), qtype))


def tensor_info(shape: tuple[int, ...], qtype) -> tuple[tuple[int, ...], np.dtype, int, object]:
    """add_tensor_info's (shape, dtype, nbytes, raw_dtype) for a tensor of `shape` written as `qtype`."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    if qtype in (Q.F32, Q.F16):
        dtype = np.dtype(np.float32 if qtype == Q.F32 else np.float16)
        return tuple(shape), dtype, int(np.prod(shape)) * dtype.itemsize, None
    raw = byte_shape(tuple(shape), qtype)
    return raw, np.dtype(np.uint8), int(np.prod(raw)), qtype


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


@dataclass
class GGUFVocab:
    """The tokenizer part of a GGUF file: llama.cpp's "llama" (sentencepiece: pieces with scores) or
    "gpt2" (byte-level BPE: tokens in the byte alphabet, merges, and the name of the pre-tokenizer regex)."""

    model: str
    pieces: list[bytes]
    types: list[int]
    special: dict[str, int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None

    def write(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.pieces)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        if self.merges is not None:
            writer.add_token_merges(self.merges)
        for kind, token_id in self.special.items():
            if token_id >= 0:
                getattr(writer, f"add_{kind}_token_id")(token_id)


def gguf_vocab(tokenizer: Path, vocab_size: int) -> GGUFVocab:
    from llama_zh.tokenizer import tokenizer_kind

    if tokenizer_kind(Path(tokenizer)) == "bpe":
        return bpe_vocab(Path(tokenizer), vocab_size)
    pieces, scores, types, special = tokenizer_vocab(tokenizer, vocab_size)
    return GGUFVocab("llama", pieces, types, special, scores=scores)


def bpe_vocab(path: Path, vocab_size: int) -> GGUFVocab:
    """A byte-level BPE tokenizer.json as llama.cpp's "gpt2" vocabulary, padded to `vocab_size`.

    Tokens are written as tokenizer.json spells them (the byte alphabet), merges as "a b" in rank order,
    special added tokens as CONTROL and other added tokens as USER_DEFINED. llama.cpp splits text with a
    regex it knows by name: "llama-bpe" is Llama-3's, the only split this export names."""
    from llama_zh.bpe import LLAMA3_SPLIT
    from llama_zh.tokenizer import BPETokenizer

    gguf = _gguf()
    tok = BPETokenizer(path)
    if tok.vocab_size > vocab_size:
        raise CheckpointError(f"{path}: {tok.vocab_size} tokens, more than the model's vocab_size {vocab_size}")
    split = _split_regex(tok.spec.get("pre_tokenizer"))
    if split != LLAMA3_SPLIT:
        raise GGUFError(
            f"{path}: pre_tokenizer splits with {split!r}; the GGUF export names Llama-3's split only "
            f'(llama.cpp\'s "llama-bpe"), another would tokenize differently in llama.cpp'
        )
    if not tok.spec["model"].get("ignore_merges"):
        raise GGUFError(
            f'{path}: model.ignore_merges is false; llama.cpp\'s "llama-bpe" takes a word that is a token '
            f"whole (Llama-3's tokenizer.json sets it true), so the two would tokenize differently"
        )
    added = {t["id"]: t for t in tok.spec.get("added_tokens", [])}
    by_id = {i: t for t, i in tok.spec["model"]["vocab"].items()}
    pieces, types = [], []
    for i in range(vocab_size):
        if i in added:
            pieces.append(added[i]["content"].encode("utf-8"))
            types.append(int(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED))
        elif i in by_id:
            pieces.append(by_id[i].encode("utf-8"))
            types.append(int(gguf.TokenType.NORMAL))
        else:
            pieces.append(f"[PAD{i}]".encode())
            types.append(int(gguf.TokenType.UNUSED))
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok.spec["model"]["merges"]]
    special = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}
    if tok.eot_id != tok.eos_id:
        special["eot"] = tok.eot_id
    return GGUFVocab("gpt2", pieces, types, special, merges=merges, pre="llama-bpe")


def _split_regex(pre_tokenizer: dict | None) -> str | None:
    """The regex of the Split step of a tokenizer.json pre_tokenizer (a Sequence or a lone Split)."""
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer or {}])
    for step in steps:
        if step.get("type") == "Split":
            return step.get("pattern", {}).get("Regex")
    return None


def gguf_path(dst: Path) -> Path:
    dst = Path(dst)
    return dst if dst.suffix == ".gguf" else dst.with_name(dst.name + ".gguf")


def write(
    stream: WeightStream,
    dst: Path,
    overwrite: bool = False,
    chat_template: str | None = None,
    gguf_type: str | None = None,
) -> Path:
    """Write `stream` as a GGUF file of `gguf_type` (None: f16) at dst (`.gguf` appended if missing).

    Returns its path."""
    gguf = _gguf()
    _, file_type = file_types(gguf_type)
    if stream.tokenizer is None:
        raise GGUFError(
            f"{stream.source}: no tokenizer.model or tokenizer.json to embed in the GGUF file (pass stage.tokenizer)"
        )
    check_specs(stream)
    path = gguf_path(dst)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists (set overwrite to replace it)")
    config, keys = stream.config, key_map()
    rope_extra = rope_tensors(config)  # before anything is written: a scaling llama.cpp cannot run is refused
    vocab = gguf_vocab(stream.tokenizer, config.vocab_size)
    qtypes = plan_types(stream, keys, gguf_type)

    need = sum(tensor_info(tuple(shape), qtypes[name])[2] for name, (_, shape) in stream.specs.items())
    with AtomicOutput(path, overwrite=overwrite, need_bytes=need, exists_error=CheckpointError) as out:
        writer = gguf.GGUFWriter(out.tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        try:
            _write_gguf(writer, stream, keys, vocab, qtypes, file_type, chat_template, rope_extra)
        finally:
            for f in writer.fout or []:
                close_quietly(f)  # its buffer may not fit on a full disk: the write's own error says so
            writer.fout = None
        expected = {keys.to_outside(n): (tuple(s), qtypes[n]) for n, (_, s) in stream.specs.items()}
        expected |= {n: (a.shape, gguf.GGMLQuantizationType.F32) for n, a in rope_extra.items()}
        check_file(out.tmp, expected, vocab.pieces)
    return path


def _write_gguf(
    writer,
    stream: WeightStream,
    keys: KeyMap,
    vocab: GGUFVocab,
    qtypes: dict,
    file_type,
    chat_template: str | None = None,
    rope_extra: dict[str, np.ndarray] | None = None,
) -> None:
    gguf, config = _gguf(), stream.config
    rope_extra = rope_extra or {}
    writer.add_name(config.name)
    writer.add_file_type(file_type)
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
    add_rope_scaling(writer, config)
    vocab.write(writer)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)

    for name, (_, shape) in stream.specs.items():
        writer.add_tensor_info(keys.to_outside(name), *tensor_info(tuple(shape), qtypes[name]))
    for name, array in rope_extra.items():
        writer.add_tensor_info(name, *tensor_info(array.shape, gguf.GGMLQuantizationType.F32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    permute = rope_permuter(config.n_heads, config.n_kv_heads, halves_to_interleaved)
    for name, t in stream.tensors():
        _write_tensor(writer, encode(permute(name, t), qtypes[name]))
        del t
    for array in rope_extra.values():
        _write_tensor(writer, array)
    writer.close()  # flushes: a full disk shows here, not in the cleanup


def add_rope_scaling(writer, config: ModelConfig) -> None:
    """The rope scaling keys llama.cpp reads: `{arch}.rope.scaling.type`, `.factor` and, for YaRN,
    `.original_context_length` and its two betas. Llama-3's scaling is a tensor instead (rope_tensors)."""
    gguf, scaling = _gguf(), config.rope_scaling
    if config.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif config.rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_beta_fast(scaling["beta_fast"])
        writer.add_rope_scaling_yarn_beta_slow(scaling["beta_slow"])


def rope_tensors(config: ModelConfig) -> dict[str, np.ndarray]:
    """Extra tensors of the RoPE, by llama.cpp name: for `llama3` scaling, rope_freqs.weight, the
    per-dimension divisor of the frequencies (1 for the high ones, factor for the low ones), as
    llama.cpp's own converter writes Llama-3.1. Refuses the scalings llama.cpp has no equivalent of:
    dynamic NTK, and YaRN with its own attention factor (llama.cpp derives it from the factor)."""
    kind, scaling = config.rope_type, config.rope_scaling
    if kind == "dynamic":
        raise GGUFError(
            "model.rope_scaling.type=dynamic: llama.cpp has no dynamic NTK scaling, so a GGUF file "
            "cannot run this model as llama_zh does; export to HF instead"
        )
    if kind == "yarn" and any(scaling[k] is not None for k in ("attention_factor", "mscale", "mscale_all_dim")):
        raise GGUFError(
            "model.rope_scaling: YaRN with attention_factor/mscale set is not written to GGUF "
            "(llama.cpp derives the attention factor from the factor alone)"
        )
    if kind != "llama3":
        return {}
    gguf = _gguf()
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    plain, _ = rope_frequencies(config.head_dim, config.rope_theta)
    divisors = []
    for wavelength in (2 * math.pi / plain).tolist():
        if wavelength < original / high:
            divisors.append(1.0)
        elif wavelength > original / low:
            divisors.append(factor)
        else:  # the blend of rope_frequencies' llama3 middle band, as one divisor
            smooth = (original / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    return {name: np.array(divisors, dtype=np.float32)}


def _write_tensor(writer, array: np.ndarray) -> None:
    try:
        writer.write_tensor_data(array)
    except OSError as e:
        # numpy's tofile reports a short write as "N requested and M written", without an errno; on a
        # regular file that is a full disk (or quota), which must read as one.
        if e.errno is None and "requested and" in str(e):
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({e})") from e
        raise


def check_file(path: Path, expected: dict[str, tuple[tuple[int, ...], object]], pieces: list[bytes]) -> None:
    """Read `path` back with gguf's reader: the expected tensors (names, shapes, types) and tokenizer pieces."""
    gguf = _gguf()
    reader = gguf.GGUFReader(path)
    got = {t.name: t for t in reader.tensors}
    if set(got) != set(expected):
        raise GGUFError(
            f"{path}: read back {len(got)} tensors, wrote {len(expected)}: "
            f"{sorted(set(got) ^ set(expected))[:4]} differ"
        )
    for name, (shape, qtype) in expected.items():
        t = got[name]
        shape_read = tuple(t.data.shape)
        if t.data.dtype == np.uint8:  # quantized: the reader gives the bytes of each row
            shape_read = tuple(gguf.quants.quant_shape_from_byte_shape(shape_read, t.tensor_type))
        if shape_read != shape or t.tensor_type != qtype:
            raise GGUFError(
                f"{path}: {name} reads back as {shape_read} {t.tensor_type.name}, wrote {shape} {qtype.name}"
            )
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or [tokens.parts[i].tobytes() for i in tokens.data] != pieces:
        raise GGUFError(f"{path}: the tokenizer pieces do not read back as written")


def is_gguf(path: Path) -> bool:
    return starts_with(path, b"GGUF")


def _write(stream: WeightStream, dst: Path, options: WriteOptions) -> Path:
    return write(
        stream, dst, overwrite=options.overwrite, chat_template=options.chat_template, gguf_type=options.gguf_type
    )


FORMAT = Format(
    "gguf",
    "a .gguf file (llama.cpp)",
    is_gguf,
    write=_write,
    unreadable="a GGUF file, which llama_zh writes for llama.cpp but does not read back",
    sharded=False,
)
