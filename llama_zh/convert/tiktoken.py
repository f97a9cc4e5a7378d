"""Meta's Llama-3 tokenizer (tiktoken's rank file) as a tokenizer.json, so that it loads like any BPE here.

A rank file holds one `base64(token bytes) rank` per line; the rank is the token's id and its merge
priority (tiktoken merges the adjacent pair whose concatenation has the lowest rank). A tokenizer.json
needs the merges themselves: the merge that makes a token is the last step of running those rules on
the token's own bytes with the ranks below its own, which leaves two parts. Merges are listed by the
rank of their result, so the tokenizers library applies them in tiktoken's order. `ignore_merges`: a
pre-tokenized word that is a token is taken whole, as tiktoken looks a word up before merging.

    python -m llama_zh.convert.tiktoken tokenizer.model OUT_DIR [--chat-template FILE]
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
from pathlib import Path

from llama_zh import bpe
from llama_zh.tokenizer import TokenizerError


def read_ranks(path: Path) -> dict[bytes, int]:
    """token bytes -> rank; one line naming the first malformed or repeated entry otherwise."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError("expected `base64-token rank`")
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, binascii.Error) as e:
                raise TokenizerError(f"{path}: line {lineno}: not a tiktoken rank entry ({e})") from None
            if token in ranks:
                raise TokenizerError(f"{path}: line {lineno}: token {token!r} repeated")
            ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks are not 0..{len(ranks) - 1} each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(
            f"{path}: byte 0x{missing[0]:02X} has no token ({len(missing)} bytes missing): not a byte-level BPE"
        )
    return ranks


def last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts tiktoken's merge rules leave of `token` when only ranks below its own may merge."""
    limit = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = limit, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], limit)
            if rank < best:
                best, at = rank, i
        if at < 0:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2:
        raise TokenizerError(f"token {token!r} (rank {limit}) cannot be made from two lower-ranked tokens")
    return parts[0], parts[1]


def tokenizer_json(ranks: dict[bytes, int], specials: list[str] | None = None):
    """A `tokenizers.Tokenizer` equal to the rank file's BPE, with Llama-3's pipeline and special tokens."""
    from tokenizers import Tokenizer, models

    alphabet = {b: ch for ch, b in bpe._alphabet_bytes().items()}

    def spell(data: bytes) -> str:
        return "".join(alphabet[b] for b in data)

    vocab = {spell(t): r for t, r in ranks.items()}
    merges = sorted((r, last_merge(t, ranks)) for t, r in ranks.items() if len(t) > 1)
    model = models.BPE(vocab=vocab, merges=[(spell(a), spell(b)) for _, (a, b) in merges], ignore_merges=True)
    tokenizer = Tokenizer(model)
    bpe.byte_level_pipeline(tokenizer)
    specials = bpe.llama3_special_tokens() if specials is None else specials
    tokenizer.add_special_tokens(specials)
    if specials:
        tokenizer.post_processor = bpe.bos_post_processor(specials[0], tokenizer.token_to_id(specials[0]))
    return tokenizer


def convert_rank_file(path: Path, out_dir: Path, chat_template: str | None = None) -> Path:
    """tokenizer.json + tokenizer_config.json (Llama-3's bos/eos, `chat_template`) from a rank file."""
    tokenizer = tokenizer_json(read_ranks(Path(path)))
    return bpe.write_bpe(tokenizer, out_dir, bpe.tokenizer_config(chat_template=chat_template))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rank_file", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--chat-template", type=Path, help="a .jinja file for tokenizer_config.json")
    args = parser.parse_args(argv)
    template = args.chat_template.read_text(encoding="utf-8") if args.chat_template else None
    path = convert_rank_file(args.rank_file, args.out_dir, template)
    print(json.dumps({"tokenizer": str(path)}))


if __name__ == "__main__":
    main()
