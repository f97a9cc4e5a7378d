"""Preference data for stage=dpo: a context, a chosen and a rejected response, laid out by the chat template.

A record (JSON array or JSON lines) gives the context as `prompt` (one user message), as Alpaca
`instruction` (+ `input`, joined as SFT joins them), or as `conversations` / `messages` (turns as in
SFT, ending with a user turn), and the two responses as strings `chosen` and `rejected`.

Each response is rendered after the context by the `template=` chat template, as SFT renders an
answer, and tokenized whole; its tokens are those of the last generation block (the response with its
end-of-turn and eos). Only they are labelled: a response's log-probability is summed over them, and
earlier answers in a conversation are context. Long examples are cut as SFT cuts an exchange: the
context keeps its last tokens (never below half of `max_len`), the response its first.

Examples carry an `index` (their position in the whole set, validation first) under which a stored
reference log-probability is looked up (llama_zh.dpo).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from llama_zh.data.chat_template import ChatTemplate, record_messages
from llama_zh.data.corpus import DataError, is_held_out
from llama_zh.data.datasets import IGNORE_INDEX
from llama_zh.data.sft import SENTIMENT_LABELS, SPEAKERS, _fit_pair, build_review_sentiment
from llama_zh.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Sequence = tuple[list[int], list[int]]  # (context ids, response ids)


# ------------------------------------------------------------------------------------------ reading


def _json_records(path: Path) -> list[tuple[object, str]]:
    """(record, "file:line") of a JSON array or JSON lines file; an array's records are located by
    the line they start on, so that every message names a line."""
    if not path.is_file():
        raise DataError(f"{path}: no such preference file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    decoder = json.JSONDecoder()
    records: list[tuple[object, str]] = []
    if text.lstrip().startswith("["):
        try:
            json.loads(text)  # the whole array first: its error names the right line
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        pos = text.index("[") + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text) or text[pos] == "]":
                break
            record, end = decoder.raw_decode(text, pos)
            records.append((record, f"{path}:{text.count(chr(10), 0, pos) + 1}"))
            pos = end
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((json.loads(line), f"{path}:{lineno}"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON line ({e.msg})") from None
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _context_turns(turns, loc: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{loc}: 'conversations' must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{loc}: turn {i} must be an object with a speaker and a text")
        speaker, text = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        if speaker not in SPEAKERS:
            raise DataError(f"{loc}: turn {i}: speaker {speaker!r}; expected one of {', '.join(SPEAKERS)}")
        if not isinstance(text, str):
            raise DataError(f"{loc}: turn {i}: missing or non-string text ('value' or 'content')")
        messages.append({"role": SPEAKERS[speaker], "content": text})
    if messages[-1]["role"] != "user":
        raise DataError(f"{loc}: the context must end with a user turn (chosen and rejected answer it)")
    if not any(m["content"].strip() for m in messages if m["role"] == "user"):
        raise DataError(f"{loc}: empty prompt")
    return messages


def _context(record: dict, loc: str, separator: str) -> list[dict]:
    """The record's context as chat messages (see the module docstring for the three forms)."""
    turns = record.get("conversations", record.get("messages"))
    if turns is not None:
        return _context_turns(turns, loc)
    if "prompt" in record:
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            raise DataError(f"{loc}: field 'prompt' must be a string")
        if not prompt.strip():
            raise DataError(f"{loc}: empty prompt")
        return [{"role": "user", "content": prompt}]
    if "instruction" in record:
        instruction, extra = record["instruction"], record.get("input", "")
        if not isinstance(instruction, str) or not isinstance(extra, str):
            raise DataError(f"{loc}: fields 'instruction' and 'input' must be strings")
        if not (instruction.strip() or extra.strip()):
            raise DataError(f"{loc}: empty prompt")
        return record_messages(instruction, extra, separator)
    raise DataError(f"{loc}: no prompt; give 'prompt', 'instruction' or 'conversations' / 'messages'")


def load_preferences(path: Path, separator: str = "\n") -> list[dict]:
    """Records as {"messages": context, "chosen": str, "rejected": str, "where": "file:line"};
    `separator` joins an Alpaca instruction and input (the template's `input_separator`)."""
    path = Path(path)
    out = []
    for record, loc in _json_records(path):
        if not isinstance(record, dict):
            raise DataError(f"{loc}: expected an object with a prompt, 'chosen' and 'rejected'")
        messages = _context(record, loc, separator)
        for key in ("chosen", "rejected"):
            if not isinstance(record.get(key), str):
                raise DataError(f"{loc}: missing or non-string field {key!r}")
            if not record[key].strip():
                raise DataError(f"{loc}: field {key!r} is empty")
        if record["chosen"] == record["rejected"]:
            raise DataError(f"{loc}: 'chosen' and 'rejected' are identical (nothing to prefer)")
        out.append({"messages": messages, "chosen": record["chosen"], "rejected": record["rejected"], "where": loc})
    return out


# --------------------------------------------------------------------------------------- tokenizing


def response_sequence(
    messages: list[dict], response: str, template: ChatTemplate, tokenizer: Tokenizer, max_len: int, where: str = ""
) -> Sequence:
    """(context ids, response ids) of `response` rendered after `messages`, cut to `max_len` + 1 tokens."""
    ids, trained = template.encode(messages + [{"role": "assistant", "content": response}], tokenizer)
    if not any(trained):
        raise DataError(
            f"chat template {template.name}: marks nothing to train on "
            "({% generation %}...{% endgeneration %} around the answers)"
        )
    end = len(trained) - trained[::-1].index(True)
    start = end
    while start > 0 and trained[start - 1]:
        start -= 1
    # Anything after the last answer is context for nothing: dropped.
    context, answer = _fit_pair(ids[:start], ids[start:end], max_len + 1)  # +1: the last token is a label only
    if len(context) + len(answer) < 2 or not answer:
        raise DataError(f"{where}: nothing of the response is left within seq_len={max_len}")
    return context, answer


def tokenize_pair(
    record: dict, template: ChatTemplate, tokenizer: Tokenizer, max_len: int
) -> tuple[Sequence, Sequence]:
    return tuple(
        response_sequence(record["messages"], record[key], template, tokenizer, max_len, record.get("where", ""))
        for key in ("chosen", "rejected")
    )


def sequence_tensors(sequence: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels) of one sequence, shifted: labels are the response's tokens, -100 elsewhere."""
    context, answer = sequence
    ids = torch.tensor(context + answer)
    labels = torch.tensor([IGNORE_INDEX] * len(context) + answer)
    return ids[:-1], labels[1:]


class PreferenceDataset(Dataset):
    """Pairs (chosen, rejected), each item carrying its index in the whole set."""

    def __init__(self, pairs: list[tuple[Sequence, Sequence]], indices: list[int]):
        self.pairs, self.indices = pairs, indices

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        (c_ids, c_labels), (r_ids, r_labels) = (sequence_tensors(s) for s in self.pairs[i])
        return {
            "chosen_ids": c_ids,
            "chosen_labels": c_labels,
            "rejected_ids": r_ids,
            "rejected_labels": r_labels,
            "index": self.indices[i],
        }


def preference_collate(pad_id: int):
    """One batch of 2B right-padded rows, the B chosen responses first and then the B rejected ones
    (one forward pass for both), plus the pairs' `index` (B,)."""

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        rows = [(b["chosen_ids"], b["chosen_labels"]) for b in batch] + [
            (b["rejected_ids"], b["rejected_labels"]) for b in batch
        ]
        length = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for row, (row_ids, row_labels) in enumerate(rows):
            ids[row, : len(row_ids)] = row_ids
            labels[row, : len(row_labels)] = row_labels
        return {"input_ids": ids, "labels": labels, "index": torch.tensor([b["index"] for b in batch])}

    return collate


class PreferenceData(pl.LightningDataModule):
    """Preference records -> tokenized pairs; a seeded slice of the file (`val_fraction`) for validation."""

    def __init__(
        self,
        file: Path,
        template: ChatTemplate,
        tokenizer: Tokenizer,
        max_len: int,
        batch_size: int,
        val_fraction: float = 0.02,
        seed: int = 0,
        num_workers: int = 0,
        max_records: int | None = None,
    ):
        super().__init__()
        if not 0 <= val_fraction < 1:
            raise DataError(f"stage.val_fraction={val_fraction}: expected a fraction in [0, 1)")
        if max_records is not None and max_records < 2:
            raise DataError(f"stage.max_records={max_records}: expected null or at least 2")
        self.file, self.template, self.tokenizer = Path(file), template, tokenizer
        self.max_len, self.batch_size, self.val_fraction = max_len, batch_size, val_fraction
        self.seed, self.num_workers, self.max_records = seed, num_workers, max_records
        self.train = self.val = self.all = None
        self.fingerprint = ""

    def setup(self, stage: str | None = None) -> None:
        if self.all is not None:
            return  # the stage sets up first, to refuse bad data before the model is built
        records = load_preferences(self.file, self.template.input_separator)
        random.Random(self.seed).shuffle(records)
        if self.max_records is not None:
            records = records[: self.max_records]
        pairs = [tokenize_pair(r, self.template, self.tokenizer, self.max_len) for r in records]
        n_val = max(1, int(len(pairs) * self.val_fraction)) if self.val_fraction > 0 and len(pairs) > 1 else 0
        if len(pairs) - n_val < 1:
            raise DataError(f"{self.file}: too few records to train on")
        # Validation first: indices 0..n_val-1, then training.
        self.val = PreferenceDataset(pairs[:n_val], list(range(n_val)))
        self.train = PreferenceDataset(pairs[n_val:], list(range(n_val, len(pairs))))
        self.all = PreferenceDataset(pairs, list(range(len(pairs))))
        digest = hashlib.sha256()
        for pair in pairs:
            digest.update(json.dumps(pair).encode())
        self.fingerprint = digest.hexdigest()  # what stored reference log-probs were computed for
        log.info(
            "preference data: %d pairs for training, %d for validation (%s)", len(self.train), len(self.val), self.file
        )

    def _loader(self, dataset, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id >= 0 else self.tokenizer.eos_id
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            collate_fn=preference_collate(pad),
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val, shuffle=False)

    def reference_dataloader(self) -> DataLoader:
        """Every pair in index order, for reference log-probs computed once before training."""
        return self._loader(self.all, shuffle=False)


# ------------------------------------------------------------------------------------- default set


def build_review_preferences(directory: Path) -> Path:
    """The review-sentiment instructions as preferences: the right label chosen, the other rejected.

    Built from the SFT set's train split, so the held-out reviews (the sha1 rule) are never among
    them. Writes `train.jsonl` under `directory` (once; temporary name + rename) and returns it."""
    directory = Path(directory)
    path = directory / "dpo_review_sentiment" / "train.jsonl"
    if path.is_file():
        return path
    source = build_review_sentiment(directory / "sft_review_sentiment")["train"]
    other = {a: b for a, b in zip(SENTIMENT_LABELS.values(), reversed(list(SENTIMENT_LABELS.values())), strict=False)}
    rows = []
    for line in source.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if is_held_out(record["input"]):
            continue
        rows.append(
            json.dumps(
                {
                    "instruction": record["instruction"],
                    "input": record["input"],
                    "chosen": record["output"],
                    "rejected": other[record["output"]],
                },
                ensure_ascii=False,
            )
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
