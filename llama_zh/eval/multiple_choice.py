"""Multiple choice in the C-Eval CSV layout (id, question, A, B, C, D, answer), zero- or few-shot.

Two protocols (`scoring`), whose accuracies are not comparable with each other:

letter  C-Eval's answer-only format: a header, then each shot as `question / A. .. / D. .. / 答案：X`,
        then the question ending in `答案：`. The model's choice is the option letter whose token
        scores highest as the next token (letters tokenized as they follow the prompt).
option  the cloze form lm-eval's multiple-choice tasks use: the question alone ending in `答案：`
        (shots end in their answer's text), and each option's text scored as the continuation.
        acc: the highest summed log-likelihood; acc_norm: the highest log-likelihood per character
        of the option text (lm-eval divides by `len(choice)`, characters); acc_norm_bytes: per byte
        of its UTF-8 text (the same ranking for all-CJK options, not for mixed ones such as H2O).
        The option's tokens are those the prompt followed by the option becomes after the prompt's
        own tokens, as lm-eval splits a context and continuation.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llama_zh.config import ConfigError
from llama_zh.data.corpus import DataError
from llama_zh.eval.scoring import batches_by_length, continuation_logprobs, row_continuation_logprobs
from llama_zh.model import Transformer
from llama_zh.tokenizer import Tokenizer

LETTERS = ("A", "B", "C", "D")
COLUMNS = ("id", "question", *LETTERS, "answer")
SCORINGS = ("letter", "option")
# The prompt each protocol builds, recorded with its scores (shots are whole questions in the same form).
TEMPLATES = {
    "letter": "{header}{shots}{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\n答案：  -> scored: the letter token",
    "option": "{header}{shots}{question}\n答案：  -> scored: each option's text",
}


@dataclass
class Question:
    id: str
    question: str
    options: tuple[str, str, str, str]
    answer: str
    where: str  # file:line, for messages

    def format(self, with_answer: bool) -> str:
        lines = [self.question] + [f"{letter}. {text}" for letter, text in zip(LETTERS, self.options, strict=False)]
        return "\n".join(lines) + "\n答案：" + (self.answer + "\n\n" if with_answer else "")

    def cloze(self, with_answer: bool) -> str:
        """The question alone; a shot ends in its answer's text."""
        answer = self.options[LETTERS.index(self.answer)] + "\n\n" if with_answer else ""
        return self.question + "\n答案：" + answer


def read_questions(path: Path) -> list[Question]:
    """Rows of a C-Eval CSV; a missing column or an answer outside A-D names the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such multiple-choice file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    reader = csv.DictReader(text.splitlines(keepends=True))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; the C-Eval layout is {', '.join(COLUMNS)}")
    questions = []
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if any(row[c] is None for c in COLUMNS):
            raise DataError(f"{where}: fewer fields than the header's {len(reader.fieldnames)}")
        answer = row["answer"].strip().upper()
        if answer not in LETTERS:
            raise DataError(f"{where}: answer {row['answer']!r} is not one of A, B, C, D")
        questions.append(
            Question(row["id"], row["question"].strip(), tuple(row[c].strip() for c in LETTERS), answer, where)
        )
    if not questions:
        raise DataError(f"{path}: no questions")
    return questions


def header(subject: str | None) -> str:
    if subject:
        return f"以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
    return "以下是单项选择题，请选出其中的正确答案。\n\n"


def build_prompt(question: Question, shots: list[Question], subject: str | None = None, scoring: str = "letter") -> str:
    if scoring == "option":
        return header(subject) + "".join(s.cloze(True) for s in shots) + question.cloze(False)
    return header(subject) + "".join(s.format(True) for s in shots) + question.format(False)


def letter_ids(tokenizer: Tokenizer, prompt: str, prompt_ids: list[int]) -> list[int]:
    """The token each letter becomes right after `prompt` (its piece if the tokenizer merges across)."""
    ids = []
    for letter in LETTERS:
        full = tokenizer.encode(prompt + letter, bos=True)
        if len(full) == len(prompt_ids) + 1 and full[:-1] == prompt_ids:
            ids.append(full[-1])
        else:
            token_id = tokenizer.token_id(letter)
            ids.append(token_id if token_id is not None else tokenizer.encode(letter)[-1])
    return ids


def option_ids(tokenizer: Tokenizer, prompt: str, prompt_ids: list[int], text: str) -> list[int]:
    """The tokens of `text` as it follows `prompt`: what prompt + text encodes to after the prompt's own
    tokens (the option alone would get a word-start piece it never has after `答案：`); the text
    encoded alone if the tokenizer merged across the boundary."""
    whole = tokenizer.encode(prompt + text, bos=True)
    if len(whole) > len(prompt_ids) and whole[: len(prompt_ids)] == prompt_ids:
        return whole[len(prompt_ids) :]
    return tokenizer.encode(text)


def check_scoring(scoring: str) -> str:
    if scoring not in SCORINGS:
        raise ConfigError(f"stage.mc.scoring: {scoring!r}; expected one of {', '.join(SCORINGS)}")
    return scoring


def evaluate_multiple_choice(
    model: Transformer,
    tokenizer: Tokenizer,
    questions: list[Question],
    shots: list[Question] = (),
    subject: str | None = None,
    batch_size: int = 8,
    scoring: str = "letter",
    progress: Callable[[int], None] | None = None,
) -> dict:
    """{'accuracy', 'correct', 'n', 'scoring', 'predictions': [{'id', 'answer', 'predicted', ...}]}; with
    scoring 'option' also 'acc', 'acc_norm', 'acc_norm_bytes' ('accuracy' is 'acc'). `progress` is
    called with the number of questions each batch finished."""
    if check_scoring(scoring) == "option":
        return _evaluate_options(model, tokenizer, questions, list(shots), subject, batch_size, progress)
    prompts = [build_prompt(q, list(shots), subject) for q in questions]
    ids = [tokenizer.encode(p, bos=True) for p in prompts]
    letters = [letter_ids(tokenizer, p, i) for p, i in zip(prompts, ids, strict=False)]
    predicted: list[str] = [""] * len(questions)
    for batch in batches_by_length([len(i) for i in ids], batch_size):
        # All four letters as single-token continuations; rows whose letter ids differ are rare (a
        # tokenizer merging across the prompt's end), so they are scored as candidates of their own.
        candidates = sorted({t for i in batch for t in letters[i]})
        scores = continuation_logprobs(model, [ids[i] for i in batch], [[t] for t in candidates])
        column = {t: n for n, t in enumerate(candidates)}
        for row, i in enumerate(batch):
            option_scores = [float(scores[row, column[t]]) for t in letters[i]]
            predicted[i] = LETTERS[max(range(4), key=option_scores.__getitem__)]
        if progress:
            progress(len(batch))
    correct = sum(p == q.answer for p, q in zip(predicted, questions, strict=False))
    return {
        "accuracy": correct / len(questions),
        "correct": correct,
        "n": len(questions),
        "scoring": "letter",
        "predictions": [
            {"id": q.id, "answer": q.answer, "predicted": p} for q, p in zip(questions, predicted, strict=False)
        ],
    }


def _best(scores: list[float]) -> str:
    return LETTERS[max(range(len(scores)), key=scores.__getitem__)]


def _evaluate_options(
    model: Transformer,
    tokenizer: Tokenizer,
    questions: list[Question],
    shots: list[Question],
    subject: str | None,
    batch_size: int,
    progress: Callable[[int], None] | None,
) -> dict:
    for q in questions:
        empty = [letter for letter, text in zip(LETTERS, q.options, strict=False) if not text]
        if empty:
            raise DataError(f"{q.where}: option {empty[0]} is empty; stage.mc.scoring=option scores the option texts")
    prompts = [build_prompt(q, shots, subject, "option") for q in questions]
    ids = [tokenizer.encode(p, bos=True) for p in prompts]
    options = [
        [option_ids(tokenizer, p, i, text) for text in q.options]
        for p, i, q in zip(prompts, ids, questions, strict=False)
    ]
    loglik: list[list[float]] = [[] for _ in questions]
    for batch in batches_by_length([len(i) for i in ids], batch_size):
        scores = row_continuation_logprobs(model, [ids[i] for i in batch], [options[i] for i in batch])
        for row, i in enumerate(batch):
            loglik[i] = [float(x) for x in scores[row]]
        if progress:
            progress(len(batch))
    predictions = []
    for q, ll in zip(questions, loglik, strict=False):
        per_char = [x / len(text) for x, text in zip(ll, q.options, strict=False)]
        per_byte = [x / len(text.encode("utf-8")) for x, text in zip(ll, q.options, strict=False)]
        predictions.append(
            {
                "id": q.id,
                "answer": q.answer,
                "predicted": _best(ll),
                "predicted_norm": _best(per_char),
                "predicted_norm_bytes": _best(per_byte),
                "loglikelihood": ll,
            }
        )
    n = len(questions)
    correct = {
        k: sum(p[k] == p["answer"] for p in predictions)
        for k in ("predicted", "predicted_norm", "predicted_norm_bytes")
    }
    return {
        "accuracy": correct["predicted"] / n,
        "acc": correct["predicted"] / n,
        "acc_norm": correct["predicted_norm"] / n,
        "acc_norm_bytes": correct["predicted_norm_bytes"] / n,
        "correct": correct["predicted"],
        "correct_norm": correct["predicted_norm"],
        "n": n,
        "scoring": "option",
        "predictions": predictions,
    }
