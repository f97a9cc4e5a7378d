"""Tasks on an instruction file (Alpaca records: instruction, input, output).

classification: the label set is the distinct outputs (or a given list); the model's label is the
one with the highest log-likelihood as the response, tokenized as SFT tokenizes a response (the
label followed by eos: the answer must also end there). Summed, not length-normalised: the labels
of a classification set are short and of similar length (正面 / 负面).

generation: greedy answers (batched), compared with the reference output: exact match (after
stripping surrounding whitespace) and character-level ROUGE-L F1 (longest common subsequence of the
characters, whitespace removed; no tokenizer, so any language scores alike).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

from llama_zh.data.corpus import DataError
from llama_zh.data.sft import Template, load_records
from llama_zh.eval.scoring import batches_by_length, continuation_logprobs
from llama_zh.generate import SamplingConfig, generate_batch
from llama_zh.model import Transformer
from llama_zh.tokenizer import Tokenizer

MAX_LABELS = 50


def read_instruction_records(path: Path) -> list[dict]:
    records = [r for r in load_records(Path(path)) if "conversation" not in r] if path else []
    if not records:
        raise DataError(f"{path}: no Alpaca records (instruction, input, output); conversations are not scored")
    return records


def spread(records: list, limit: int | None) -> list:
    """At most `limit` records evenly spaced over the list (files are often sorted by label)."""
    if not limit or limit >= len(records):
        return records
    return [records[i * len(records) // limit] for i in range(limit)]


def classification_records(records: list[dict], max_records: int | None) -> list[dict]:
    """The records classification scores."""
    return spread(records, max_records)


def generation_records(records: list[dict], max_records: int | None) -> list[dict]:
    """The records generation answers: those with a reference output, at most `max_records`."""
    return spread([r for r in records if r["output"].strip()], max_records)


def evaluate_classification(
    model: Transformer,
    tokenizer: Tokenizer,
    records: list[dict],
    template: Template,
    labels: list[str] | None = None,
    batch_size: int = 8,
    max_records: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """{'accuracy', 'correct', 'n', 'labels', 'confusion': {gold: {predicted: count}}}; labels None: the
    distinct outputs of all records, scored on `spread(records, max_records)`. `progress` is called
    with the number of records each batch finished."""
    labels = sorted({r["output"].strip() for r in records}) if labels is None else [str(label) for label in labels]
    records = classification_records(records, max_records)
    gold = [r["output"].strip() for r in records]
    if len(labels) < 2:
        raise DataError(f"classification needs at least 2 labels, got {labels}")
    if len(labels) > MAX_LABELS:
        raise DataError(
            f"{len(labels)} distinct outputs: not a classification set (at most {MAX_LABELS} labels); "
            f"use the generation task, or list the labels"
        )
    unknown = sorted(set(gold) - set(labels))
    if unknown:
        raise DataError(f"outputs {unknown[:5]} are not among the labels {labels}")
    prompts = [tokenizer.encode(template.format(r["instruction"], r.get("input", "")), bos=True) for r in records]
    label_ids = [tokenizer.encode(label, eos=True) for label in labels]
    predicted: list[str] = [""] * len(records)
    for batch in batches_by_length([len(p) for p in prompts], batch_size):
        scores = continuation_logprobs(model, [prompts[i] for i in batch], label_ids)  # (b, n_labels)
        for row, i in enumerate(batch):
            predicted[i] = labels[int(scores[row].argmax())]
        if progress:
            progress(len(batch))
    correct = sum(p == g for p, g in zip(predicted, gold, strict=False))
    confusion = {g: dict(Counter(p for p, gg in zip(predicted, gold, strict=False) if gg == g)) for g in labels}
    return {
        "accuracy": correct / len(records),
        "correct": correct,
        "n": len(records),
        "labels": labels,
        "confusion": confusion,
    }


def lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence of two strings (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for ca in a:
        current = [0]
        for j, cb in enumerate(b):
            current.append(previous[j] + 1 if ca == cb else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_chars(prediction: str, reference: str) -> float:
    """Character-level ROUGE-L F1, whitespace removed; 1.0 for two empty strings."""
    p, r = "".join(prediction.split()), "".join(reference.split())
    if not p or not r:
        return float(p == r)
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def evaluate_generation(
    model: Transformer,
    tokenizer: Tokenizer,
    records: list[dict],
    template: Template,
    sampling: SamplingConfig,
    batch_size: int = 8,
    max_records: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """{'exact_match', 'rouge_l', 'n', 'new_tokens', 'examples': first few (prompt, reference, answer)}.

    Records with an empty reference output are skipped (nothing to compare with); then at most
    `max_records`, evenly spaced."""
    records = generation_records(records, max_records)
    if not records:
        raise DataError("generation: no record has a reference output")
    prompts = [tokenizer.encode(template.format(r["instruction"], r.get("input", "")), bos=True) for r in records]
    answers: list[str] = [""] * len(records)
    new_tokens = 0
    for batch in batches_by_length([len(p) for p in prompts], batch_size):
        out = generate_batch(model, [prompts[i] for i in batch], sampling, tokenizer=tokenizer)
        for i, ids in zip(batch, out, strict=False):
            answers[i] = tokenizer.decode(ids)
            new_tokens += len(ids)
        if progress:
            progress(len(batch))
    em = [exact_match(a, r["output"]) for a, r in zip(answers, records, strict=False)]
    rouge = [rouge_l_chars(a, r["output"]) for a, r in zip(answers, records, strict=False)]
    examples = [
        {"input": r.get("input", "")[:100], "reference": r["output"], "answer": a}
        for r, a in zip(records[:5], answers[:5], strict=False)
    ]
    return {
        "exact_match": sum(em) / len(records),
        "rouge_l": sum(rouge) / len(records),
        "n": len(records),
        "new_tokens": new_tokens,
        "examples": examples,
    }
