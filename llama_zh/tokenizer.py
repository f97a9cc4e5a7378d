"""Tokenizers behind one interface: sentencepiece (tokenizer.model) and Hugging Face byte-level BPE (tokenizer.json).

    Tokenizer(path)         picks the kind from the file: a sentencepiece model, or a tokenizer.json
                            whose model is BPE (with a tokenizer_config.json beside it, if any, for
                            bos/eos/pad and the chat template)
    SentencePieceTokenizer  LLaMA-1/2's kind: ids unk 0, bos 1, eos 2
    BPETokenizer            Llama-3's kind: a regex split, then byte-level BPE; special tokens added

Every caller (packing and its shard hash, chat templates, reports, eval, infer, exports) uses only
what `Tokenizer` defines, so either kind goes anywhere a tokenizer goes. docs/reference.md, section
"Tokenizers", states the formats.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece as spm

from llama_zh.errors import LlamaZhError

BPE_FILE = "tokenizer.json"
BPE_CONFIG_FILE = "tokenizer_config.json"
SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZER_FILES = (SENTENCEPIECE_FILE, BPE_FILE)  # what a checkpoint directory may carry, in this order


class TokenizerError(LlamaZhError, ValueError):
    pass


def is_rank_file(path: Path) -> bool:
    """Whether `path` is a tiktoken rank file (`base64(token) rank` lines), which Meta's Llama-3 release
    ships under sentencepiece's name tokenizer.model."""
    with open(path, "rb") as f:
        first = f.read(256).split(b"\n", 1)[0].split(b" ")
    return len(first) == 2 and first[1].strip().isdigit()


def tokenizer_kind(path: Path) -> str:
    """ "sentencepiece" or "bpe", from the file's first byte (a tokenizer.json is JSON, a sentencepiece
    model a protobuf whose first field tag is never `{`); a Meta tiktoken rank file is named."""
    if not Path(path).is_file():
        raise TokenizerError(f"{path}: tokenizer model not found")
    with open(path, "rb") as f:
        head = f.read(256)
    if head.lstrip()[:1] == b"{":
        return "bpe"
    if is_rank_file(path):
        raise TokenizerError(
            f"{path}: a tiktoken rank file (Meta's Llama-3 release), not a sentencepiece model; "
            f"turn it into a tokenizer.json with `python -m llama_zh.convert.tiktoken RANK_FILE OUT_DIR`"
        )
    return "sentencepiece"


class Tokenizer:
    """The interface every caller uses. `Tokenizer(path)` returns the subclass for the file's kind."""

    kind = ""
    path: Path

    def __new__(cls, path: str | Path | None = None):
        if cls is Tokenizer and path is not None:
            path = Path(path)
            if not path.is_file():
                raise TokenizerError(f"{path}: tokenizer model not found")
            kind = BPETokenizer if tokenizer_kind(path) == "bpe" else SentencePieceTokenizer
            return super().__new__(kind)
        return super().__new__(cls)

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int  # -1: none

    @property
    def eot_id(self) -> int:
        """The end of a chat turn (Llama-3's <|eot_id|>); eos where the vocabulary has no such token."""
        return self.eos_id

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generation: eos, and the end of a turn where that differs."""
        return sorted({i for i in (self.eos_id, self.eot_id) if i >= 0})

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` and each token's (start, end) in characters of `text`."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; control/special tokens decode to nothing. A character whose bytes are not all
        in `ids` decodes as U+FFFD (streaming holds such a tail back)."""
        raise NotImplementedError

    def token_id(self, token: str) -> int | None:
        """The id of the token spelling exactly `token` as text, None if the vocabulary has none."""
        raise NotImplementedError

    def documents_encoder(self) -> DocumentsEncoder:
        """A picklable encoder of whole documents (`<bos> ids <eos>` each), for packing workers."""
        raise NotImplementedError

    def files(self) -> list[Path]:
        """The files that make up this tokenizer, the main one first: what a checkpoint copies."""
        return [self.path]

    def sha256(self) -> str:
        return file_sha256(self.path)


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"{self.path}: tokenizer model not found")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{self.path}: not a sentencepiece model ({e})") from e

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.EncodeAsIds(texts)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        try:
            pieces = self.sp.encode(text, return_type="proto").pieces
        except (TypeError, ValueError):  # sentencepiece before return_type
            pieces = self.sp.encode(text, out_type="immutable_proto").pieces
        # sentencepiece gives byte offsets; characters are what callers count.
        char_at = _byte_to_char(text)
        return [p.id for p in pieces], [(char_at[p.begin], char_at[p.end]) for p in pieces]

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def token_id(self, token: str) -> int | None:
        i = self.sp.PieceToId(token)
        return None if i == self.sp.unk_id() and token != self.sp.IdToPiece(i) else i

    def documents_encoder(self) -> DocumentsEncoder:
        return DocumentsEncoder("sentencepiece", self.sp.serialized_model_proto())


class BPETokenizer(Tokenizer):
    """A tokenizer.json whose model is BPE (byte-level in Llama-3 and in what llama_zh writes), run by the
    `tokenizers` library; bos/eos/pad names and the chat template come from tokenizer_config.json."""

    kind = "bpe"

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"{self.path}: tokenizer model not found")
        self.spec = read_bpe_json(self.path)
        try:
            self.hf = HFTokenizer.from_str(json.dumps(self.spec))
        except Exception as e:  # the library raises its own Exception type for a malformed file
            raise TokenizerError(f"{self.path}: the tokenizers library refuses it ({str(e).splitlines()[0]})") from None
        self.config_file = self.path.with_name(BPE_CONFIG_FILE)
        self.config = read_tokenizer_config(self.config_file) if self.config_file.is_file() else {}
        specials = {t["content"]: t["id"] for t in self.spec.get("added_tokens", [])}
        self.special_tokens = specials
        self._vocab_size = 1 + max([*self.spec["model"]["vocab"].values(), *specials.values()], default=-1)
        self._bos = self._special("bos_token", ("<|begin_of_text|>", "<s>"))
        self._eos = self._special("eos_token", ("<|end_of_text|>", "</s>"))
        self._pad = self._special("pad_token", ())
        self._eot = specials.get("<|eot_id|>", self._eos)

    def _special(self, field: str, fallbacks: tuple[str, ...]) -> int:
        """tokenizer_config.json's `field` (a string or {"content": ...}) as an id, else the first of
        `fallbacks` the vocabulary has; -1 if none."""
        named = self.config.get(field)
        if isinstance(named, dict):
            named = named.get("content")
        if isinstance(named, str):
            token_id = self.hf.token_to_id(named)
            if token_id is None:
                raise TokenizerError(f"{self.config_file}: {field} {named!r} is not a token of {self.path}")
            return token_id
        return next((self.hf.token_to_id(t) for t in fallbacks if self.hf.token_to_id(t) is not None), -1)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def eot_id(self) -> int:
        return self._eot

    @property
    def chat_template(self) -> str | None:
        text = self.config.get("chat_template")
        return text if isinstance(text, str) and text.strip() else None

    def token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        # add_special_tokens=False: the file's post-processor (Llama-3's adds <|begin_of_text|>) is the
        # caller's `bos` here, as for sentencepiece.
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self.hf.encode(text, add_special_tokens=False)
        return list(encoding.ids), [tuple(o) for o in encoding.offsets]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        ids = self.hf.encode(token, add_special_tokens=False).ids
        return ids[0] if len(ids) == 1 else None

    def documents_encoder(self) -> DocumentsEncoder:
        return DocumentsEncoder("bpe", self.path.read_bytes(), self.bos_id, self.eos_id)

    def files(self) -> list[Path]:
        return [self.path] + ([self.config_file] if self.config_file.is_file() else [])


def read_bpe_json(path: Path) -> dict:
    """A tokenizer.json, refused in one line unless it parses and its model is BPE."""
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not a tokenizer.json (invalid JSON: {e})") from None
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict):
        raise TokenizerError(f"{path}: not a tokenizer.json (no `model` object)")
    if model.get("type") != "BPE":
        raise TokenizerError(
            f"{path}: model.type is {model.get('type')!r}; llama_zh reads BPE tokenizer.json files only"
        )
    if not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
        raise TokenizerError(f"{path}: model.vocab or model.merges is missing")
    return spec


def read_tokenizer_config(path: Path) -> dict:
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return config


def find_tokenizer(directory: Path) -> Path | None:
    """The tokenizer a checkpoint directory carries (tokenizer.model, else tokenizer.json), None if none."""
    return next((Path(directory) / f for f in TOKENIZER_FILES if (Path(directory) / f).is_file()), None)


def tokenizer_files(path: Path) -> list[Path]:
    """The files of the tokenizer at `path` (tokenizer.json comes with its tokenizer_config.json)."""
    return Tokenizer(path).files()


def copy_tokenizer(path: Path, directory: Path) -> None:
    """Copy the tokenizer at `path` into `directory` under the names a checkpoint reader looks for."""
    files = tokenizer_files(path)
    main = BPE_FILE if tokenizer_kind(files[0]) == "bpe" else SENTENCEPIECE_FILE
    shutil.copyfile(files[0], Path(directory) / main)
    for f in files[1:]:
        shutil.copyfile(f, Path(directory) / f.name)


class DocumentsEncoder:
    """`<bos> ids <eos>` for each of many documents, rebuilt from bytes in each packing worker."""

    def __init__(self, kind: str, data: bytes, bos_id: int = -1, eos_id: int = -1):
        self.kind, self.data, self.bos_id, self.eos_id = kind, data, bos_id, eos_id
        self._impl = None

    def __getstate__(self):
        return {"kind": self.kind, "data": self.data, "bos_id": self.bos_id, "eos_id": self.eos_id}

    def __setstate__(self, state):
        self.__init__(**state)

    def _load(self):
        if self._impl is None:
            if self.kind == "sentencepiece":
                sp = spm.SentencePieceProcessor()
                sp.LoadFromSerializedProto(self.data)
                self._impl = sp
            else:
                from tokenizers import Tokenizer as HFTokenizer

                self._impl = HFTokenizer.from_str(self.data.decode("utf-8"))
        return self._impl

    def encode(self, docs: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """(tokens back to back, tokens per document)."""
        impl = self._load()
        if self.kind == "sentencepiece":
            return _sentencepiece_documents(impl, docs, dtype)
        lists = [[self.bos_id, *e.ids, self.eos_id] for e in impl.encode_batch(docs, add_special_tokens=False)]
        lengths = np.fromiter(map(len, lists), np.int64, count=len(lists))
        flat = (token for ids in lists for token in ids)
        return np.fromiter(flat, dtype, count=int(lengths.sum())), lengths


_encode_numpy = True  # sentencepiece builds that predate return_type="numpy" fall back to lists


def _sentencepiece_documents(sp, docs: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    global _encode_numpy
    # One thread: parallelism comes from the worker processes.
    if _encode_numpy:
        try:
            arrays = sp.encode(docs, add_bos=True, add_eos=True, num_threads=1, return_type="numpy")
            lengths = np.fromiter(map(len, arrays), np.int64, count=len(arrays))
            return (np.concatenate(arrays).astype(dtype) if arrays else np.empty(0, dtype)), lengths
        except (TypeError, ValueError):
            _encode_numpy = False
    lists = sp.encode(docs, add_bos=True, add_eos=True, num_threads=1)
    lengths = np.fromiter(map(len, lists), np.int64, count=len(lists))
    flat = (token for ids in lists for token in ids)
    return np.fromiter(flat, dtype, count=int(lengths.sum())), lengths


def _byte_to_char(text: str) -> dict[int, int]:
    table, byte = {}, 0
    for i, ch in enumerate(text):
        table[byte] = i
        byte += len(ch.encode("utf-8"))
    table[byte] = len(text)
    return table


def file_sha256(path: str | Path) -> str:
    """A tokenizer's identity, as token shards, training states and native checkpoints record it."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def train_sentencepiece(
    corpus: Path,
    output: Path,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    max_sentence_length: int = 16384,
    input_sentence_size: int = 2_000_000,
    seed_sentencepiece_size: int = 1_000_000,
    num_threads: int | None = None,
) -> Path:
    """Train a LLaMA-style sentencepiece model on `corpus` (one document per line) into `output`.

    byte_fallback: no character is ever unknown; identity normalization: Chinese punctuation and
    full-width characters round-trip exactly (NFKC would fold them); split_digits as LLaMA does.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        prefix = os.path.join(tmp, "spm")
        try:
            spm.SentencePieceTrainer.Train(
                input=str(corpus),
                model_prefix=prefix,
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                byte_fallback=True,
                split_digits=True,
                normalization_rule_name="identity",
                add_dummy_prefix=True,
                remove_extra_whitespaces=False,
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=-1,
                max_sentence_length=max_sentence_length,
                input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True,
                seed_sentencepiece_size=seed_sentencepiece_size,
                train_extremely_large_corpus=False,
                num_threads=num_threads or os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise TokenizerError(f"{corpus}: sentencepiece training failed: {str(e).splitlines()[0]}") from None
        shutil.move(prefix + ".model", str(output) + ".tmp")
        os.replace(str(output) + ".tmp", output)
    return output
