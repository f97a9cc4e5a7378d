"""On-demand preparation of a `data=` choice: split corpus, tokenizer, packed tokens.

Layout under the data directory (`data.dir`):
    corpus/<source>.{train,val}.txt      cleaned documents, held-out split by content hash
    corpus/done.json                     document counts; present only once every file is complete
    tok-<sha12>/<source>.{train,val}.bin packed tokens for the tokenizer with that sha256 prefix
Each step is skipped when its output is complete, so a second run starts at once.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from llama_zh.data.corpus import DataError, Source, read_documents, write_split_corpus
from llama_zh.data.packing import pack_documents
from llama_zh.tokenizer import Tokenizer, TokenizerError, train_sentencepiece

log = logging.getLogger(__name__)
SPLITS = ("train", "val")


def sources_of(data_cfg: DictConfig) -> list[Source]:
    if not data_cfg.get("sources"):
        raise DataError(f"data.sources: the data config {data_cfg.get('name')!r} lists no sources")
    return [Source(name, list(s.files), s.get("format", "text")) for name, s in data_cfg.sources.items()]


def prepare_corpus(data_cfg: DictConfig) -> Path:
    corpus = Path(data_cfg.dir) / "corpus"
    done = corpus / "done.json"
    if done.is_file():
        return corpus
    log.info("building corpus %s in %s", data_cfg.name, corpus)
    counts = write_split_corpus(sources_of(data_cfg), corpus, data_cfg.get("holdout_modulus", 10))
    done.with_name("done.json.tmp").write_text(json.dumps(counts, indent=2))
    os.replace(done.with_name("done.json.tmp"), done)
    log.info("corpus documents per source: %s", counts)
    return corpus


def ensure_tokenizer(tok_cfg: DictConfig, data_cfg: DictConfig) -> Tokenizer:
    """The configured tokenizer; trained on the data's training split the first time if `tokenizer.train` is set."""
    path = Path(tok_cfg.path)
    if path.is_file():
        return Tokenizer(path)
    if not tok_cfg.get("train"):
        raise TokenizerError(f"tokenizer.path: {path} does not exist")
    corpus = prepare_corpus(data_cfg)
    train_files = [corpus / f"{s.name}.train.txt" for s in sources_of(data_cfg)]
    # sentencepiece reads comma-separated input files itself.
    log.info("training tokenizer %s (%d pieces) on %s", tok_cfg.name, tok_cfg.train.vocab_size, data_cfg.name)
    train_sentencepiece(",".join(map(str, train_files)), path, **tok_cfg.train)
    return Tokenizer(path)


def packed_dir(data_cfg: DictConfig, tokenizer: Tokenizer) -> Path:
    return Path(data_cfg.dir) / f"tok-{tokenizer.sha256()[:12]}"


def prepare_tokens(data_cfg: DictConfig, tokenizer: Tokenizer) -> dict[str, dict[str, Path]]:
    """Packed token files per split and source, built if missing: {split: {source: path}}."""
    corpus = prepare_corpus(data_cfg)
    out_dir = packed_dir(data_cfg, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, Path]] = {split: {} for split in SPLITS}
    for source in sources_of(data_cfg):
        for split in SPLITS:
            out = out_dir / f"{source.name}.{split}.bin"
            if not (out.is_file() and out.with_name(out.name + ".json").is_file()):
                index = pack_documents(read_documents(corpus / f"{source.name}.{split}.txt"), tokenizer, out)
                log.info("packed %s %s: %d documents, %d tokens", source.name, split, index["documents"], index["tokens"])
            files[split][source.name] = out
    return files
