"""Multiple choice in the C-Eval CSV layout (id, question, A, B, C, D, answer), zero- or few-shot.

The prompt is C-Eval's answer-only format: a header, then each shot as `question / A. .. / D. .. /
答案：X`, then the question ending in `答案：`. The model's choice is the option letter whose token
scores highest as the next token (letters tokenized as they follow the prompt).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from llama_zh.data.corpus import DataError
from llama_zh.eval.scoring import batches_by_length, continuation_logprobs
from llama_zh.model import Transformer
from llama_zh.tokenizer import Tokenizer

LETTERS = ("A", "B", "C", "D")
COLUMNS = ("id", "question", *LETTERS, "answer")


@dataclass
class Question:
    id: str
    question: str
    options: tuple[str, str, str, str]
    answer: str
    where: str  # file:line, for messages

    def format(self, with_answer: bool) -> str:
        lines = [self.question] + [f"{letter}. {text}" for letter, text in zip(LETTERS, self.options)]
        return "\n".join(lines) + "\n答案：" + (self.answer + "\n\n" if with_answer else "")


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
        questions.append(Question(row["id"], row["question"].strip(), tuple(row[c].strip() for c in LETTERS), answer, where))
    if not questions:
        raise DataError(f"{path}: no questions")
    return questions


def header(subject: str | None) -> str:
    if subject:
        return f"以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
    return "以下是单项选择题，请选出其中的正确答案。\n\n"


def build_prompt(question: Question, shots: list[Question], subject: str | None = None) -> str:
    return header(subject) + "".join(s.format(True) for s in shots) + question.format(False)


def letter_ids(tokenizer: Tokenizer, prompt: str, prompt_ids: list[int]) -> list[int]:
    """The token each letter becomes right after `prompt` (its piece if the tokenizer merges across)."""
    ids = []
    for letter in LETTERS:
        full = tokenizer.encode(prompt + letter, bos=True)
        if len(full) == len(prompt_ids) + 1 and full[:-1] == prompt_ids:
            ids.append(full[-1])
        else:
            ids.append(tokenizer.sp.PieceToId(letter))
    return ids


def evaluate_multiple_choice(model: Transformer, tokenizer: Tokenizer, questions: list[Question],
                             shots: list[Question] = (), subject: str | None = None, batch_size: int = 8) -> dict:
    """{'accuracy', 'correct', 'n', 'predictions': [{'id', 'answer', 'predicted'}]}."""
    prompts = [build_prompt(q, list(shots), subject) for q in questions]
    ids = [tokenizer.encode(p, bos=True) for p in prompts]
    letters = [letter_ids(tokenizer, p, i) for p, i in zip(prompts, ids)]
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
    correct = sum(p == q.answer for p, q in zip(predicted, questions))
    return {"accuracy": correct / len(questions), "correct": correct, "n": len(questions),
            "predictions": [{"id": q.id, "answer": q.answer, "predicted": p} for q, p in zip(questions, predicted)]}
