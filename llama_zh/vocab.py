"""Chinese vocabulary extension (docs/reference.md#vocabulary): grow a tokenizer, grow a checkpoint to match,
measure both.

    extend_tokenizer    base.model + extra.model -> out.model: every base id kept, extra's new pieces appended
    extend_bpe_tokenizer  base tokenizer.json + Chinese texts -> out/tokenizer.json: every base id and merge
                        rank kept, merges learned on the texts whose results hold only CJK appended
    resize_checkpoint   a checkpoint gains embedding and head rows for the appended pieces
    tokenizer_report    tokens per character / byte and how much text falls back to bytes

A tokenizer "extends" another when its first N pieces are the other's N pieces, same text and type,
in the same order. Only then do a checkpoint's rows still mean what they meant; mixing up two
vocabularies (49953 vs 49954, §6 item 11) is refused here, naming both sizes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as sp_model

from llama_zh import bpe
from llama_zh.atomic import write_bytes
from llama_zh.checkpoint import WeightStream, write_native
from llama_zh.tensor_io import CheckpointError
from llama_zh.tokenizer import BPE_CONFIG_FILE, BPETokenizer, Tokenizer, TokenizerError, read_bpe_json, tokenizer_kind

Piece = sp_model.ModelProto.SentencePiece
TEXT_TYPES = (Piece.NORMAL, Piece.USER_DEFINED)  # pieces that stand for text; the rest are control/unk/byte/unused
INITS = ("subtoken_mean", "mean", "normal")
VOCAB_TENSORS = ("embed.weight", "head.weight")  # one row per token id


def load_model_proto(path: str | Path) -> sp_model.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer model not found")
    proto = sp_model.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except DecodeError as e:
        raise TokenizerError(f"{path}: not a sentencepiece model ({e})") from None
    if not proto.pieces:
        raise TokenizerError(f"{path}: not a sentencepiece model (no pieces)")
    return proto


def check_extension(base: sp_model.ModelProto, extended: sp_model.ModelProto, base_path, extended_path) -> None:
    """Refuse unless `extended` keeps every piece of `base` at the same id with the same type."""
    n_base, n_ext = len(base.pieces), len(extended.pieces)
    mismatch = next(
        (
            i
            for i, (a, b) in enumerate(zip(base.pieces, extended.pieces, strict=False))
            if (a.piece, a.type) != (b.piece, b.type)
        ),
        None,
    )
    if mismatch is None and n_ext >= n_base:
        return
    why = (
        f"id {mismatch} is {extended.pieces[mismatch].piece!r} where the base has {base.pieces[mismatch].piece!r}"
        if mismatch is not None
        else "it has fewer pieces"
    )
    raise TokenizerError(
        f"{extended_path} ({n_ext} pieces) does not extend {base_path} ({n_base} pieces): {why}; "
        f"use the tokenizer the checkpoint was trained with, or one made from it by extend_tokenizer"
    )


# ------------------------------------------------------------------------------------- tokenizers


@dataclass
class Extension:
    base_size: int
    extra_size: int
    added: int  # extra's text pieces not in the base
    already_in_base: int
    skipped: int  # extra's control, unknown and byte pieces
    vocab_size: int
    pad_id: int  # -1: none

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def extend_tokenizer(base: Path, extra: Path, out: Path, pad_token: str | None = None) -> Extension:
    """Write `base` + the text pieces of `extra` it lacks (+ `pad_token`, last) to `out`, atomically.

    Scores: the added pieces keep `extra`'s scores shifted below the lowest base score. Sentencepiece
    BPE merges the highest-scoring pair first, so every base merge still wins over a new one (text the
    base already segments keeps its segmentation as far as base pieces reach), and the new pieces
    merge among themselves in the order `extra` learned. Chinese-LLaMA-Alpaca's score 0 puts every
    new piece above every base piece, and all of them in one tie (experiments/README.md, section
    "Vocabulary extension", compares the two).
    """
    out = Path(out)
    proto, extra_proto = load_model_proto(base), load_model_proto(extra)
    base_size = len(proto.pieces)
    have = {p.piece for p in proto.pieces}
    text_pieces = [p for p in extra_proto.pieces if p.type in TEXT_TYPES]
    new = [p for p in text_pieces if p.piece not in have]
    shift = min(p.score for p in proto.pieces) - max((p.score for p in new), default=0.0) - 1.0
    for p in new:
        proto.pieces.add(piece=p.piece, score=p.score + shift, type=p.type)

    pad_id = proto.trainer_spec.pad_id
    if pad_token is not None:
        if pad_id >= 0:
            raise TokenizerError(
                f"{base}: already has a pad piece (id {pad_id}); pad_token={pad_token!r} would add a second"
            )
        if pad_token in have or pad_token in {p.piece for p in new}:
            raise TokenizerError(f"pad_token={pad_token!r} is already a piece of {base} or {extra}; choose another")
        # CONTROL like <s> and </s>: never produced from text, decodes to nothing.
        proto.pieces.add(piece=pad_token, score=0.0, type=Piece.CONTROL)
        pad_id = len(proto.pieces) - 1
        proto.trainer_spec.pad_id, proto.trainer_spec.pad_piece = pad_id, pad_token
    proto.trainer_spec.vocab_size = len(proto.pieces)

    data = proto.SerializeToString()
    check = spm.SentencePieceProcessor()
    try:
        check.LoadFromSerializedProto(data)
    except RuntimeError as e:
        raise TokenizerError(f"{out}: the extended model does not load in sentencepiece ({e})") from None
    if (check.GetPieceSize(), check.pad_id()) != (len(proto.pieces), pad_id):
        raise TokenizerError(
            f"{out}: sentencepiece reads the extended model as {check.GetPieceSize()} pieces, pad "
            f"{check.pad_id()}; expected {len(proto.pieces)}, pad {pad_id}"
        )
    write_bytes(out, data)
    return Extension(
        base_size,
        len(extra_proto.pieces),
        len(new),
        len(text_pieces) - len(new),
        len(extra_proto.pieces) - len(text_pieces),
        len(proto.pieces),
        pad_id,
    )


def _report(docs: int, chars: int, nbytes: int, tokens: int, byte_tokens: int, byte_chars: int) -> dict:
    """The counts of either tokenizer kind as the report's fields (one place, so both kinds agree)."""
    return {
        "documents": docs,
        "characters": chars,
        "utf8_bytes": nbytes,
        "tokens": tokens,
        "tokens_per_char": tokens / max(chars, 1),
        "tokens_per_byte": tokens / max(nbytes, 1),
        "byte_token_share": byte_tokens / max(tokens, 1),
        "byte_char_share": byte_chars / max(chars, 1),
    }


def tokenizer_report(tokenizer: Tokenizer | str | Path, texts: Iterable[str], batch: int = 512) -> dict:
    """How compactly `tokenizer` encodes `texts` (one document each), and how much falls back to bytes.

    byte_token_share: byte-fallback tokens (`<0xE4>` ...) / tokens; byte_char_share: characters
    spelled in bytes / characters (a character missing from the vocabulary costs 1-4 byte tokens).
    """
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    if isinstance(tok, BPETokenizer):
        return _bpe_report(tok, texts, batch)
    sp = tok.sp
    docs = chars = nbytes = tokens = byte_tokens = byte_chars = 0
    texts = iter(texts)
    while chunk := [t for _, t in zip(range(batch), texts, strict=False)]:
        for text, encoded in zip(chunk, sp.encode(chunk, return_type="proto"), strict=False):
            docs += 1
            chars += len(text)
            nbytes += len(text.encode("utf-8"))
            tokens += len(encoded.pieces)
            for p in encoded.pieces:
                if sp.IsByte(p.id):
                    byte_tokens += 1
                    byte_chars += len(p.surface)  # the character sits on the last of its byte pieces
    return _report(docs, chars, nbytes, tokens, byte_tokens, byte_chars)


def _bpe_report(tok: BPETokenizer, texts: Iterable[str], batch: int) -> dict:
    """tokenizer_report for a byte-level BPE: a "byte token" is one holding part of a character only."""
    alphabet = bpe._alphabet_bytes()
    partial: dict[int, bool] = {}

    def is_partial(token_id: int) -> bool:
        if token_id not in partial:
            data = bpe.token_bytes(tok.token(token_id) or "", alphabet)
            partial[token_id] = data is not None and not _is_utf8(data)
        return partial[token_id]

    docs = chars = nbytes = tokens = byte_tokens = byte_chars = 0
    texts = iter(texts)
    while chunk := [t for _, t in zip(range(batch), texts, strict=False)]:
        for text, encoded in zip(chunk, tok.hf.encode_batch(chunk, add_special_tokens=False), strict=False):
            docs += 1
            chars += len(text)
            nbytes += len(text.encode("utf-8"))
            tokens += len(encoded.ids)
            spelled = set()
            for token_id, (begin, end) in zip(encoded.ids, encoded.offsets, strict=False):
                if is_partial(token_id):
                    byte_tokens += 1
                    spelled.update(range(begin, end))
            byte_chars += len(spelled)
    return _report(docs, chars, nbytes, tokens, byte_tokens, byte_chars)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def extend_bpe_tokenizer(
    base: Path, texts: Iterable[str], vocab_size: int, out_dir: Path, max_new: int | None = None
) -> Extension:
    """Write `base` (a tokenizer.json) extended with Chinese merges to `out_dir`/tokenizer.json, atomically,
    with the base's tokenizer_config.json beside it (same special tokens and chat template).

    A byte-level BPE of `vocab_size` tokens is trained on `texts` with the base's pipeline; its merges
    whose results hold only CJK characters (llama_zh.bpe, "extension") and are not base tokens are
    appended in the order it learned them, up to `max_new`, each result a new id after every base id.
    """
    base, out_dir = Path(base), Path(out_dir)
    spec = read_bpe_json(base)
    learned = json.loads(bpe.train_byte_level_bpe(texts, vocab_size, specials=[]).to_str())
    merges = bpe.cjk_merges(spec, learned, max_new)
    extended = bpe.extend_bpe(spec, merges)
    bpe.check_bpe_extension(spec, extended, base, out_dir / "tokenizer.json")
    config_file = base.with_name(BPE_CONFIG_FILE)
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else bpe.tokenizer_config()
    path = bpe.write_bpe(json.dumps(extended, ensure_ascii=False, indent=2), out_dir, config)
    tok = Tokenizer(path)  # loads, with the base's special ids
    n_learned = len(bpe.base_parts(learned)[1])
    in_base = sum(1 for m in bpe.base_parts(learned)[1] if "".join(m) in spec["model"]["vocab"])
    return Extension(
        bpe.next_id(spec),
        n_learned,
        len(merges),
        in_base,
        n_learned - len(merges) - in_base,
        tok.vocab_size,
        tok.pad_id,
    )


def check_any_extension(base: Path, extended: Path) -> None:
    """check_extension for either kind; tokenizers of two kinds never extend one another."""
    kinds = tokenizer_kind(Path(base)), tokenizer_kind(Path(extended))
    if kinds[0] != kinds[1]:
        raise TokenizerError(
            f"{extended} ({kinds[1]}) does not extend {base} ({kinds[0]}): not the same kind of tokenizer"
        )
    if kinds[0] == "bpe":
        bpe.check_bpe_extension(read_bpe_json(base), read_bpe_json(extended), base, extended)
    else:
        check_extension(load_model_proto(base), load_model_proto(extended), base, extended)


def bpe_subtoken_ids(base: Path, extended: Path, old_size: int) -> list[list[int]]:
    """For each id from `old_size` on, the base model's ids for that token's bytes ([] for an added token)."""
    base_tok, ext = BPETokenizer(base), BPETokenizer(extended)
    out = []
    for token_id in range(old_size, ext.vocab_size):
        token = ext.token(token_id)
        added = token is None or token in ext.special_tokens
        out.append([] if added else [t.id for t in base_tok.hf.model.tokenize(token)])
    return out


# ------------------------------------------------------------------------------------- checkpoints


def _subtoken_encoder(proto: sp_model.ModelProto) -> spm.SentencePieceProcessor:
    """The base tokenizer, encoding a piece's text as it stands: no dummy prefix, spaces kept."""
    proto = sp_model.ModelProto.FromString(proto.SerializeToString())
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto.SerializeToString())
    return sp


def subtoken_ids(base: sp_model.ModelProto, pieces: list[Piece]) -> list[list[int]]:
    """For each piece, the base tokenizer's ids for its text ([] for control pieces such as a pad)."""
    sp = _subtoken_encoder(base)
    return [sp.EncodeAsIds(p.piece.replace("\u2581", " ")) if p.type in TEXT_TYPES else [] for p in pieces]


def new_rows(weight: torch.Tensor, subtokens: list[list[int]], init: str, generator: torch.Generator) -> torch.Tensor:
    """Rows for the new ids of `weight` (V_old, C): computed in fp32, returned in weight's dtype."""
    old = weight.float()
    mean = old.mean(0)
    if init == "normal":
        rows = torch.randn((len(subtokens), old.shape[1]), generator=generator) * old.std() + mean
    elif init == "mean":
        rows = mean.expand(len(subtokens), -1)
    else:  # subtoken_mean; a piece with no base encoding (control) takes the mean
        rows = torch.stack([old[ids].mean(0) if ids else mean for ids in subtokens]) if subtokens else old[:0]
    return rows.to(weight.dtype)


def resize_checkpoint(
    src: Path, tokenizer: Path, dst: Path, init: str = "subtoken_mean", seed: int = 0, overwrite: bool = False
) -> Path:
    """Write `src` with `tokenizer` (an extension of src's) as a native checkpoint at `dst`.

    embed.weight and head.weight gain one row per new id; the old rows are copied bit for bit, so on
    old-vocabulary text the resized model gives the original's logits over the old vocabulary.
    init: "subtoken_mean" (row = mean of the rows of the base tokenizer's encoding of the piece's text,
    for the embedding and the head alike), "mean" (mean of all old rows) or "normal" (the old rows'
    mean and std, seeded).
    """
    if init not in INITS:
        raise CheckpointError(f"init={init!r}: expected one of {', '.join(INITS)}")
    from llama_zh.convert import read_any  # the converters read tokenizers with this module: no import at load

    stream = read_any(Path(src))
    if stream.tokenizer is None:
        raise CheckpointError(f"{src}: has no tokenizer.model, so the new pieces cannot be told from the old")
    check_any_extension(stream.tokenizer, Path(tokenizer))
    old_tok, new_size = Tokenizer(stream.tokenizer), Tokenizer(tokenizer).vocab_size
    old_size = stream.config.vocab_size
    if old_size != old_tok.vocab_size:
        raise CheckpointError(
            f"{src}: model vocab_size {old_size} differs from its tokenizer's {old_tok.vocab_size} "
            f"pieces, so the id of the first new piece is ambiguous"
        )
    if old_tok.kind == "bpe":
        subtokens = bpe_subtoken_ids(stream.tokenizer, Path(tokenizer), old_size)
    else:
        new = load_model_proto(tokenizer)
        subtokens = subtoken_ids(load_model_proto(stream.tokenizer), list(new.pieces[old_size:]))
    generator = torch.Generator().manual_seed(seed)

    def tensors():
        for name, t in stream.tensors():
            if name in VOCAB_TENSORS:
                t = torch.cat([t, new_rows(t, subtokens, init, generator)])
            yield name, t
            del t

    specs = {n: (d, (new_size, *s[1:]) if n in VOCAB_TENSORS else s) for n, (d, s) in stream.specs.items()}
    resized = WeightStream(stream.config.with_vocab(new_size), specs, tensors, Path(tokenizer), source=str(src))
    return write_native(
        resized,
        Path(dst),
        overwrite=overwrite,
        extra={"resized_from": str(src), "resize_init": init, "old_vocab_size": old_size},
    )
