"""Per-source document cleaning: Unicode normalization, full-width folding, length bounds, exact dedup.

Every option is off or permissive by default, so a source without cleaning options is written as read.
Full-width folding is narrower than NFKC: it maps U+FF01..U+FF5E (full-width ASCII: ，！？：；（）Ａ１
...) to U+0021..U+007E and nothing else, so 。、“”《》【】 and the ideographic space survive.
"""

from __future__ import annotations

import hashlib
import unicodedata
from array import array
from dataclasses import dataclass, field

NORMALIZATIONS = ("none", "NFC", "NFKC")
FULLWIDTH_TO_ASCII = {code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F)}
BAD_UTF8_EXAMPLES = 20  # locations kept in the report; the count covers all


@dataclass
class CleaningCounts:
    """What happened to each line of a source; `read` = kept + every reason for dropping."""

    read: int = 0
    kept: int = 0
    train: int = 0
    val: int = 0
    empty: int = 0
    too_short: int = 0
    too_long: int = 0
    duplicates: int = 0
    bad_utf8: int = 0
    bad_utf8_lines: list[str] = field(default_factory=list)  # "file:line", the first BAD_UTF8_EXAMPLES

    def note_bad_utf8(self, where: str) -> None:
        self.bad_utf8 += 1
        if len(self.bad_utf8_lines) < BAD_UTF8_EXAMPLES:
            self.bad_utf8_lines.append(where)


class HashSet64:
    """A set of 64-bit hashes in one open-addressing array: 8 bytes a slot, kept 1/3 to 2/3 full.

    So 12 to 24 bytes per distinct document (a Python set of ints costs about 70), plus the old
    table for the moment it is copied into one twice its size.
    """

    def __init__(self, capacity: int = 1 << 16):
        self.slots = array("Q", bytes(8 * capacity))
        self.mask = capacity - 1
        self.size = 0

    def add(self, h: int) -> bool:
        """Insert `h`; False if it was already present."""
        h = h or 1  # 0 marks an empty slot
        slots, mask = self.slots, self.mask
        i = h & mask  # the hash is uniform, so its low bits are a fine slot index
        while True:
            current = slots[i]
            if current == 0:
                slots[i] = h
                self.size += 1
                if 3 * self.size > 2 * len(slots):
                    self._grow()
                return True
            if current == h:
                return False
            i = (i + 1) & mask

    def _grow(self) -> None:
        old = self.slots
        self.slots = array("Q", bytes(16 * len(old)))
        self.mask = len(self.slots) - 1
        self.size = 0
        for h in old:
            if h:
                self.add(h)

    @property
    def nbytes(self) -> int:
        return len(self.slots) * 8


def doc_hash64(doc: str) -> int:
    # 64 bits: a false duplicate among 100M documents has odds of about 1 in 3,700.
    return int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest(), "little")


class Cleaner:
    """One source's cleaning: `clean(doc, counts)` returns the document to keep, or None (counted)."""

    def __init__(
        self,
        normalize: str = "none",
        fold_fullwidth: bool = False,
        min_chars: int = 1,
        max_chars: int | None = None,
        dedup: bool = False,
    ):
        self.normalize = None if normalize == "none" else normalize
        self.fold_fullwidth = fold_fullwidth
        self.min_chars, self.max_chars = min_chars, max_chars
        self.seen = HashSet64() if dedup else None

    def clean(self, doc: str, counts: CleaningCounts) -> str | None:
        if self.normalize:
            doc = unicodedata.normalize(self.normalize, doc)
        if self.fold_fullwidth:
            doc = doc.translate(FULLWIDTH_TO_ASCII)
        # One document a line in the corpus files: line breaks inside a document become spaces.
        doc = " ".join(doc.splitlines()).strip()
        if not doc:
            counts.empty += 1
            return None
        if len(doc) < self.min_chars:
            counts.too_short += 1
            return None
        if self.max_chars is not None and len(doc) > self.max_chars:
            counts.too_long += 1
            return None
        if self.seen is not None and not self.seen.add(doc_hash64(doc)):
            counts.duplicates += 1
            return None
        counts.kept += 1
        return doc
