"""Byte-level BPE tokenizer.json files in Llama-3's layout: training one, and writing one with its config.

    train_byte_level_bpe   texts -> a `tokenizers.Tokenizer`: Llama-3's regex split, byte-level BPE,
                           the 256 special tokens after the regular ones
    write_bpe              tokenizer.json + tokenizer_config.json (bos/eos/pad, chat template), atomically

The BPE itself is the `tokenizers` library's; this module only assembles the pipeline Llama-3's
tokenizer.json describes (docs/reference.md, section "Tokenizers").
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from llama_zh.atomic import write_text
from llama_zh.tokenizer import BPE_CONFIG_FILE, BPE_FILE

# Llama-3's pre-tokenizer split: contractions, letters (with one leading non-letter), digits in runs of
# at most three, punctuation runs, newlines, spaces.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
N_SPECIAL = 256
BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"


def llama3_special_tokens(n: int = N_SPECIAL) -> list[str]:
    """Llama-3's special tokens in id order (they follow the regular vocabulary)."""
    named = [
        BOS,
        EOS,
        *(f"<|reserved_special_token_{i}|>" for i in range(4)),
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|reserved_special_token_4|>",
        EOT,
    ]
    return named + [f"<|reserved_special_token_{i}|>" for i in range(5, n - 5)]


def byte_level_pipeline(tokenizer) -> None:
    """Set Llama-3's normalizer-free pipeline on a `tokenizers.Tokenizer` holding a BPE model."""
    from tokenizers import Regex, decoders, pre_tokenizers

    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()


def bos_post_processor(bos: str, bos_id: int):
    """Llama-3's post-processor: bos in front when special tokens are requested (transformers' default)."""
    from tokenizers import processors

    return processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, specials: list[str] | None = None):
    """A byte-level BPE of `vocab_size` regular tokens (the 256 bytes included) trained on `texts`, then
    `specials` (Llama-3's by default) as special added tokens with the ids after them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    specials = llama3_special_tokens() if specials is None else specials
    tokenizer = Tokenizer(models.BPE())
    byte_level_pipeline(tokenizer)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(texts, trainer)
    # Llama-3's model takes a pre-tokenized word that is a token whole (ignore_merges), and llama.cpp's
    # "llama-bpe" always does: set here so that both tokenize alike.
    spec = json.loads(tokenizer.to_str())
    spec["model"]["ignore_merges"] = True
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.add_special_tokens(specials)
    if specials:
        tokenizer.post_processor = bos_post_processor(specials[0], tokenizer.token_to_id(specials[0]))
    return tokenizer


def tokenizer_config(
    bos: str | None = BOS,
    eos: str | None = EOS,
    pad: str | None = None,
    chat_template: str | None = None,
    max_length: int | None = None,
) -> dict:
    """A tokenizer_config.json transformers' AutoTokenizer reads as the fast tokenizer of tokenizer.json."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "clean_up_tokenization_spaces": False,
    }
    if pad is not None:
        config["pad_token"] = pad
    if max_length is not None:
        config["model_max_length"] = max_length
    if chat_template:
        config["chat_template"] = chat_template
    return config


def write_bpe(tokenizer, directory: Path, config: dict) -> Path:
    """tokenizer.json (from a `tokenizers.Tokenizer` or its JSON text) and tokenizer_config.json in
    `directory`, each written atomically; returns the tokenizer.json path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = tokenizer if isinstance(tokenizer, str) else tokenizer.to_str(pretty=True)
    write_text(directory / BPE_CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False))
    write_text(directory / BPE_FILE, text)
    return directory / BPE_FILE


# ------------------------------------------------------------------------------------- extension
#
# New merges rank after every base merge and each one's result holds only CJK characters (and at most a
# trailing part of one whose every completion is CJK). A merge fires only where its result's bytes stand
# in the text, and UTF-8 resynchronizes at a lead byte, so in text without CJK characters no new merge
# ever fires: such text takes the base's merges, in the base's order, to the base's ids.

# Ideographs (with extensions and compatibility forms), CJK symbols and punctuation, full-width forms.
CJK_RANGES = (
    (0x3000, 0x303F),
    (0x3400, 0x4DBF),
    (0x4E00, 0x9FFF),
    (0xF900, 0xFAFF),
    (0xFF00, 0xFFEF),
    (0x20000, 0x3134F),
)


def is_cjk(ch: str) -> bool:
    return _in_cjk(ord(ch), ord(ch))


def _in_cjk(lo: int, hi: int) -> bool:
    return any(a <= lo and hi <= b for a, b in CJK_RANGES)


def _alphabet_bytes() -> dict[str, int]:
    # The byte-level alphabet: printable Latin-1 bytes stand for themselves, the rest are shifted past 0xFF
    # in byte order (the GPT-2 scheme the tokenizers library's ByteLevel uses).
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def token_bytes(token: str, alphabet: dict[str, int]) -> bytes | None:
    """The bytes a byte-level token stands for; None for a token outside the alphabet (a special token)."""
    try:
        return bytes(alphabet[ch] for ch in token)
    except KeyError:
        return None


def holds_only_cjk(data: bytes) -> bool:
    """`data` is whole CJK characters, then at most the first bytes of one whose every completion is CJK."""
    if not data or data[0] & 0xC0 == 0x80:  # empty, or starts inside a character
        return False
    i = 0
    while i < len(data):
        lead = data[i]
        size = (
            1
            if lead < 0x80
            else 2
            if lead >> 5 == 0b110
            else 3
            if lead >> 4 == 0b1110
            else 4
            if lead >> 3 == 0b11110
            else 0
        )
        if size == 0:
            return False
        part = data[i : i + size]
        if any(b & 0xC0 != 0x80 for b in part[1:]):
            return False
        if len(part) == size:
            try:
                ch = part.decode("utf-8")
            except UnicodeDecodeError:
                return False
            if not is_cjk(ch):
                return False
        else:  # the trailing part of a character: every code point it may start must be CJK
            if len(part) < 2:
                return False
            lo = part + bytes([0x80] * (size - len(part)))
            hi = part + bytes([0xBF] * (size - len(part)))
            try:
                if not _in_cjk(ord(lo.decode("utf-8")), ord(hi.decode("utf-8"))):
                    return False
            except UnicodeDecodeError:
                return False
        i += size
    return True


def _merge_pair(merge) -> tuple[str, str]:
    return tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ", 1))


def base_parts(spec: dict) -> tuple[dict[str, int], list[tuple[str, str]], list[dict]]:
    model = spec["model"]
    return model["vocab"], [_merge_pair(m) for m in model["merges"]], spec.get("added_tokens", [])


def next_id(spec: dict) -> int:
    vocab, _, added = base_parts(spec)
    return 1 + max([*vocab.values(), *(t["id"] for t in added)], default=-1)


def cjk_merges(base: dict, learned: dict, limit: int | None = None) -> list[tuple[str, str]]:
    """The merges of `learned` (a tokenizer.json spec trained on Chinese) to append to `base`: in learned's
    order, those whose result holds only CJK, is not a base token, and whose parts exist by then."""
    vocab, merges, _ = base_parts(base)
    have, seen = set(vocab), set(merges)
    alphabet = _alphabet_bytes()
    out = []
    for a, b in base_parts(learned)[1]:
        if limit is not None and len(out) >= limit:
            break
        result = a + b
        if (a, b) in seen or result in have or a not in have or b not in have:
            continue
        data = token_bytes(result, alphabet)
        if data is None or not holds_only_cjk(data):
            continue
        out.append((a, b))
        have.add(result)
    return out


def extend_bpe(base: dict, merges: list[tuple[str, str]]) -> dict:
    """`base` (a tokenizer.json spec) with `merges` appended and their results as new ids after every base id."""
    import copy

    spec = copy.deepcopy(base)
    vocab, model_merges = spec["model"]["vocab"], spec["model"]["merges"]
    # The tokenizers library gives an added token the id its model's vocabulary has for it, else the next
    # id after the model's vocabulary: with new tokens after the special ones, the special ones must be in
    # the model's vocabulary to keep their ids. No merge makes them, and text reaches them only as
    # added tokens, split off before the model runs.
    for token in spec.get("added_tokens", []):
        vocab.setdefault(token["content"], token["id"])
    as_lists = not model_merges or isinstance(model_merges[0], list)
    token_id = next_id(base)
    for a, b in merges:
        vocab[a + b] = token_id
        token_id += 1
        model_merges.append([a, b] if as_lists else f"{a} {b}")
    return spec


def check_bpe_extension(base: dict, extended: dict, base_path, extended_path) -> None:
    """Refuse unless `extended` keeps every base token at its id, every base merge at its rank, the same
    added tokens, and adds only tokens with larger ids."""
    from llama_zh.tokenizer import TokenizerError

    (bv, bm, ba), (ev, em, ea) = base_parts(base), base_parts(extended)
    why = None
    moved = next((t for t, i in bv.items() if ev.get(t) != i), None)
    if moved is not None:
        why = f"token {moved!r} is id {ev.get(moved)} where the base has {bv[moved]}"
    elif em[: len(bm)] != bm:
        rank = next(i for i, (x, y) in enumerate(zip(bm, em + [None] * len(bm), strict=False)) if x != y)
        why = f"merge rank {rank} is {em[rank] if rank < len(em) else None} where the base has {bm[rank]}"
    elif [(t["id"], t["content"]) for t in ba] != [(t["id"], t["content"]) for t in ea]:
        why = "its added (special) tokens differ"
    elif any(i < next_id(base) for t, i in ev.items() if t not in bv and t not in {a["content"] for a in ea}):
        why = "a new token takes an id inside the base's range"
    if why:
        raise TokenizerError(
            f"{extended_path} does not extend {base_path}: {why}; use the tokenizer the checkpoint "
            f"was trained with, or one made from it by the tokenizer stage"
        )
