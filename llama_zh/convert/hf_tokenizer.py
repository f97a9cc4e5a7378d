"""tokenizer.json for the HF export: a `tokenizers` BPE that segments text as the sentencepiece model does.

transformers >= 5 never runs sentencepiece: without a tokenizer.json it rebuilds a fast tokenizer
from tokenizer.model with a Metaspace pre-tokenizer, which adds the dummy `▁` only when the text does
not already start with one (a leading space then costs one `▁` fewer than in sentencepiece and
llama.cpp). The file written here follows the model's own normalizer_spec instead:

    normalizer      [strip/collapse runs of " "]  " " -> "▁"  [prepend "▁" to non-empty text]
    pre-tokenizer   none: sentencepiece's BPE merges over the whole normalized text too
    model           BPE over every piece at its id, byte_fallback; a merge (a, b) for every split of
                    a normal piece into two normal pieces, ranked by the piece's score (sentencepiece
                    merges the adjacent pair whose concatenation scores highest)
    decoder         "▁" -> " ", <0xNN> bytes -> UTF-8, one leading space dropped (the dummy prefix)
    post-processor  <s> in front (sentencepiece's ids carry no bos; LLaMA adds it)

Models this cannot reproduce (unigram, a character map such as nmt_nfkc, user-defined pieces, ...)
are refused with one line rather than exported with a tokenizer that silently differs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as sp_model
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

from llama_zh.config import ModelConfig
from llama_zh.tokenizer import TokenizerError
from llama_zh.vocab import load_model_proto

log = logging.getLogger(__name__)

Piece = sp_model.ModelProto.SentencePiece
SPACE = "\u2581"
SPECIAL_KINDS = ("bos", "eos", "unk", "pad")


@dataclass(frozen=True)
class SpecialPieces:
    """The special pieces a sentencepiece model defines: trainer_spec's ids, None where an id is -1."""

    pieces: dict[str, str | None]
    ids: dict[str, int | None]

    @classmethod
    def from_proto(cls, proto: sp_model.ModelProto, source: Path | str) -> SpecialPieces:
        spec = proto.trainer_spec
        pieces, ids = {}, {}
        for kind in SPECIAL_KINDS:
            i = getattr(spec, f"{kind}_id")
            if i >= len(proto.pieces):
                raise TokenizerError(
                    f"{source}: trainer_spec.{kind}_id {i} is past the last piece ({len(proto.pieces) - 1})"
                )
            # The piece at the id, not trainer_spec.<kind>_piece: the id is what sentencepiece uses.
            ids[kind] = i if i >= 0 else None
            pieces[kind] = proto.pieces[i].piece if i >= 0 else None
        return cls(pieces, ids)

    @classmethod
    def from_file(cls, model: Path | str) -> SpecialPieces:
        return cls.from_proto(load_model_proto(model), model)


def _refuse_unsupported(proto: sp_model.ModelProto, source: Path | str) -> None:
    """One line naming the first setting of the model that the tokenizer.json below would not reproduce."""
    trainer, norm, denorm = proto.trainer_spec, proto.normalizer_spec, proto.denormalizer_spec
    why = None
    if trainer.model_type != sp_model.TrainerSpec.BPE:
        model_type = sp_model.TrainerSpec.ModelType.Name(trainer.model_type)
        why = f"trainer_spec.model_type is {model_type}, only BPE is converted"
    elif norm.precompiled_charsmap:
        why = (
            f"normalizer_spec.name {norm.name!r} maps characters (precompiled_charsmap); "
            f"only an identity normalization is converted exactly"
        )
    elif denorm.precompiled_charsmap:
        why = f"denormalizer_spec.name {denorm.name!r} maps characters on decoding"
    elif not norm.escape_whitespaces:
        why = "normalizer_spec.escape_whitespaces=false (spaces kept as spaces)"
    elif trainer.treat_whitespace_as_suffix:
        why = "trainer_spec.treat_whitespace_as_suffix=true"
    elif not trainer.byte_fallback:
        why = "trainer_spec.byte_fallback=false (unknown characters become <unk>, not bytes)"
    else:
        odd = next((p for p in proto.pieces if p.type in (Piece.USER_DEFINED, Piece.UNUSED)), None)
        if odd is not None:
            why = f"piece {odd.piece!r} is {Piece.Type.Name(odd.type)} (sentencepiece matches it outside BPE)"
    if why:
        raise TokenizerError(
            f"{source}: cannot write a tokenizer.json that tokenizes as this sentencepiece model: {why}"
        )


def _normalizer(norm: sp_model.NormalizerSpec) -> normalizers.Normalizer:
    steps = []
    if norm.remove_extra_whitespaces:
        # sentencepiece drops leading and trailing U+0020 and keeps one of each inner run; tabs and
        # newlines are text to it.
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    steps.append(normalizers.Replace(" ", SPACE))
    if norm.add_dummy_prefix:
        # Unconditional, unlike Metaspace's prepend: "  a" is "▁▁▁a" as in sentencepiece. Prepend
        # leaves "" empty, as sentencepiece encodes "" to no pieces.
        steps.append(normalizers.Prepend(SPACE))
    return normalizers.Sequence(steps)


def _merges(proto: sp_model.ModelProto) -> list[tuple[str, str]]:
    """Every (a, b) with a, b and a+b normal pieces; the best-scoring a+b first, ties by lower id."""
    text = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == Piece.NORMAL}
    ranked = []
    for piece, (score, i) in text.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in text and right in text:
                ranked.append((-score, i, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _warn_inexact(proto: sp_model.ModelProto, source: Path | str) -> None:
    """Name the two vocabulary properties under which a BPE rank order can part from sentencepiece.

    Neither occurs in a model sentencepiece trained (scores are distinct, every character of a piece is
    a piece), but a merged vocabulary may have them, e.g. one that gives all its new pieces score 0.
    """
    text = [p for p in proto.pieces if p.type == Piece.NORMAL]
    chars = {p.piece for p in text if len(p.piece) == 1}
    scores = [p.score for p in text if len(p.piece) > 1]
    tied = len(scores) - len(set(scores))
    if tied:
        log.warning(
            "%s: %d multi-character pieces share their score with another; where two such merges overlap, "
            "sentencepiece takes the leftmost and tokenizer.json the lower id",
            source,
            tied,
        )
    orphans = [p.piece for p in text if any(c not in chars for c in p.piece)]
    if orphans:
        log.warning(
            "%s: %d pieces (e.g. %r) hold a character that is not a piece itself; tokenizer.json spells that "
            "character in bytes where sentencepiece may still merge it",
            source,
            len(orphans),
            orphans[0],
        )


def build_hf_tokenizer(model: Path | str, add_bos: bool = True) -> Tokenizer:
    """A `tokenizers.Tokenizer` giving the sentencepiece model's ids (bos first when `add_bos`)."""
    proto = load_model_proto(model)
    _refuse_unsupported(proto, model)
    _warn_inexact(proto, model)
    special = SpecialPieces.from_proto(proto, model)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab, merges=_merges(proto), unk_token=special.pieces["unk"], fuse_unk=True, byte_fallback=True
        )
    )
    tokenizer.normalizer = _normalizer(proto.normalizer_spec)
    # Control and unknown pieces never come out of sentencepiece's encoding of text; as special added
    # tokens transformers can skip them when decoding.
    tokenizer.add_special_tokens(
        [
            AddedToken(p.piece, special=True, normalized=False)
            for p in proto.pieces
            if p.type in (Piece.CONTROL, Piece.UNKNOWN)
        ]
    )
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix or proto.normalizer_spec.remove_extra_whitespaces:
        # sentencepiece drops the first piece's leading space in either case; after Fuse the text is
        # one token, so this strips exactly one space at its start.
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    bos = special.pieces["bos"]
    if add_bos and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, special.ids["bos"])]
        )
    return tokenizer


def bpe_tokenizer_files(
    path: Path, config: ModelConfig, chat_template: str | None = None
) -> tuple[dict[str, bytes], SpecialPieces, list[int]]:
    """A byte-level BPE tokenizer's export: tokenizer.json as it is, and a tokenizer_config.json (the
    source's fields kept) naming bos/eos/pad and the chat template, under which transformers'
    AutoTokenizer loads tokenizer.json as a fast tokenizer and gives llama_zh's ids (bos from the file's
    own post-processor). Also its special pieces and the ids that end a generation (eos, eot)."""
    from llama_zh.tokenizer import BPETokenizer

    tok = BPETokenizer(path)
    if tok.vocab_size > config.vocab_size:
        raise TokenizerError(
            f"{path}: {tok.vocab_size} tokens, more than the model's vocab_size {config.vocab_size} "
            f"(ids past it have no embedding row)"
        )
    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "unk": -1, "pad": tok.pad_id}
    ids = {k: (i if i >= 0 else None) for k, i in ids.items()}
    special = SpecialPieces({k: tok.token(i) if i is not None else None for k, i in ids.items()}, ids)
    tokenizer_config = {
        **tok.config,
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{f"{k}_token": special.pieces[k] for k in ("bos", "eos", "pad") if special.pieces[k]},
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.max_seq_len,
    }
    template = chat_template or tok.chat_template
    if template:
        tokenizer_config["chat_template"] = template
    named = {f"{k}_token": v for k, v in special.pieces.items() if v is not None}
    files = {
        "tokenizer.json": Path(path).read_bytes(),
        "tokenizer_config.json": _json_bytes(tokenizer_config),
        "special_tokens_map.json": _json_bytes(named),
    }
    return files, special, tok.stop_ids


def _json_bytes(value: dict) -> bytes:
    import json

    return json.dumps(value, indent=2, ensure_ascii=False).encode("utf-8")
