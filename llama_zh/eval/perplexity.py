"""Perplexity two ways, whose figures are not comparable with each other.

Packed streams (`perplexity`, token-weighted): the held-out documents packed into token streams are
read in windows of `window` inputs starting every `stride` tokens; each token is scored once, by the
first window that reaches it, so with stride < window every scored token after the first window has
at least window - stride tokens of context. stride = window gives back-to-back windows (cheapest).
The last window is aligned to the end of the stream, so every token is scored and every window is
full. A window crosses document boundaries, so a document's first tokens see the previous one.
Perplexity is exp(total negative log-likelihood / scored tokens): sources and shards weigh by their
token counts.

Per document (`rolling_perplexity`, lm-eval's loglikelihood_rolling): each document alone, bos
first, in back-to-back windows of the context length (the last one aligned to the document's end),
so every token is predicted once from its own document only, with as much of it as fits. Reported
as bits per byte of UTF-8 text (tokenizer-independent: the figure to compare across tokenizers),
byte, word (whitespace-separated, as lm-eval counts them; a Chinese line is about one "word") and
token perplexity.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llama_zh.model import Transformer
from llama_zh.tokenizer import Tokenizer


def window_spans(n_tokens: int, window: int, stride: int) -> list[tuple[int, int]]:
    """(begin, skip) per window over a stream of `n_tokens`: the window's inputs are
    tokens[begin : begin + w] with w = min(window, n_tokens - 1), its targets the next token of each,
    and its first `skip` targets were already scored by an earlier window."""
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    if n_tokens < 2:
        return []
    if n_tokens - 1 <= window:
        return [(0, 0)]
    spans, begin, scored_to = [], 0, 0  # targets 1 .. scored_to (stream indices) are scored
    while scored_to < n_tokens - 1:
        begin = min(begin, n_tokens - 1 - window)
        spans.append((begin, max(0, scored_to - begin)))
        scored_to = begin + window
        begin += stride
    return spans


@torch.inference_mode()
def stream_nll(
    model: Transformer,
    tokens: np.ndarray,
    window: int,
    stride: int,
    batch_size: int,
    max_windows: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[float, int]:
    """(summed negative log-likelihood, scored tokens) of one token stream; `progress` is called with
    the number of windows each batch read."""
    device = model.norm.weight.device
    spans = window_spans(len(tokens), window, stride)[:max_windows]
    width = min(window, len(tokens) - 1)
    total, count = 0.0, 0
    for i in range(0, len(spans), batch_size):
        chunk = spans[i : i + batch_size]
        x = torch.stack([torch.from_numpy(np.asarray(tokens[b : b + width + 1], dtype=np.int64)) for b, _ in chunk]).to(
            device
        )
        logits = model(x[:, :-1])  # (b, width, V)
        nll = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(
            len(chunk), width
        )
        skip = torch.tensor([s for _, s in chunk], device=device)
        scored = torch.arange(width, device=device)[None, :] >= skip[:, None]  # (b, width)
        total += float(nll[scored].sum())
        count += int(scored.sum())
        if progress:
            progress(len(chunk))
    return total, count


def planned_windows(
    lengths: Sequence[int], window: int, stride: int | None = None, batch_size: int = 8, max_batches: int | None = None
) -> int:
    """How many windows `perplexity` reads over streams of these lengths (a progress total)."""
    spans = [len(window_spans(n, window, stride or window)) for n in lengths]
    return sum(spans) if max_batches is None else min(sum(spans), max_batches * batch_size)


def perplexity(
    model: Transformer,
    streams: Sequence[np.ndarray],
    window: int,
    stride: int | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """{'loss', 'ppl', 'tokens'} over several streams (e.g. the shards of one source), token-weighted;
    at most `max_batches` batches of windows in all."""
    stride = stride or window
    budget = max_batches * batch_size if max_batches is not None else None
    total, count = 0.0, 0
    for tokens in streams:
        if budget is not None and budget <= 0:
            break
        nll, n = stream_nll(model, tokens, window, stride, batch_size, budget, progress)
        total, count = total + nll, count + n
        if budget is not None:
            budget -= len(window_spans(len(tokens), window, stride))
    loss = total / count if count else float("nan")
    return {"loss": loss, "ppl": math.exp(loss) if count else float("nan"), "tokens": count}


def as_paths(files: Path | str | Sequence[Path | str]) -> list[Path]:
    """One packed token file, or a list of shards of one source."""
    if isinstance(files, (str, Path)):
        return [Path(files)]
    return [Path(f) for f in files]


def source_perplexities(
    model: Transformer,
    sources: dict[str, Path | list[Path]],
    load: Callable[[Path], np.ndarray],
    window: int,
    stride: int | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict]:
    """Per source (each a token file or a list of shard files) and 'all' (token-weighted)."""
    results = {}
    for source, files in sources.items():
        results[source] = perplexity(
            model, [load(p) for p in as_paths(files)], window, stride, batch_size, max_batches, progress
        )
    tokens = sum(r["tokens"] for r in results.values())
    loss = sum(r["loss"] * r["tokens"] for r in results.values() if r["tokens"]) / tokens if tokens else float("nan")
    results["all"] = {"loss": loss, "ppl": math.exp(loss) if tokens else float("nan"), "tokens": tokens}
    return results


@torch.inference_mode()
def document_nlls(
    model: Transformer,
    documents: Sequence[Sequence[int]],
    window: int,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, scored tokens) per token document (bos included: it is the
    first window's first input, never a target), each read alone in back-to-back windows of `window`.

    The windows of all documents are batched together, longest first; a shorter window is padded on
    the right, which cannot change the scores before the padding. `progress` is called with the
    number of documents each batch finished."""
    device = model.norm.weight.device
    windows = []  # (document, begin, skip, width)
    for d, doc in enumerate(documents):
        width = min(window, len(doc) - 1)
        windows += [(d, begin, skip, width) for begin, skip in window_spans(len(doc), window, window)]
    windows.sort(key=lambda w: -w[3])
    left = [0] * len(documents)
    for d, *_ in windows:
        left[d] += 1
    totals = [(0.0, 0) for _ in documents]
    if progress and left.count(0):  # bos alone: nothing to predict
        progress(left.count(0))
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        width = chunk[0][3]
        x = torch.zeros(len(chunk), width + 1, dtype=torch.long)
        for row, (d, begin, _, w) in enumerate(chunk):
            x[row, : w + 1] = torch.as_tensor(np.asarray(documents[d][begin : begin + w + 1], dtype=np.int64))
        x = x.to(device)
        logits = model(x[:, :-1])
        nll = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(
            len(chunk), width
        )
        position = torch.arange(width, device=device)[None, :]
        skip = torch.tensor([w[2] for w in chunk], device=device)[:, None]
        end = torch.tensor([w[3] for w in chunk], device=device)[:, None]
        scored = (position >= skip) & (position < end)
        per_row = torch.where(scored, nll, 0.0).sum(dim=1).tolist()
        counts = scored.sum(dim=1).tolist()
        finished = 0
        for (d, *_), total, count in zip(chunk, per_row, counts, strict=False):
            totals[d] = (totals[d][0] + total, totals[d][1] + count)
            left[d] -= 1
            finished += left[d] == 0
        if progress and finished:
            progress(finished)
    return totals


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))


def rolling_summary(nll: float, tokens: int, n_bytes: int, words: int, documents: int) -> dict:
    """The per-document figures from summed negative log-likelihood (nats) and the text's counts."""

    def ppl(count):  # a Chinese "word" is a whole line: its perplexity can pass the float range
        if not count:
            return float("nan")
        return math.exp(nll / count) if nll / count < 709 else float("inf")

    return {
        "bits_per_byte": nll / n_bytes / math.log(2) if n_bytes else float("nan"),
        "byte_perplexity": ppl(n_bytes),
        "word_perplexity": ppl(words),
        "token_perplexity": ppl(tokens),
        "loss": nll / tokens if tokens else float("nan"),
        "documents": documents,
        "tokens": tokens,
        "bytes": n_bytes,
        "words": words,
    }


def rolling_perplexity(
    model: Transformer,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    window: int,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """`rolling_summary` of documents given as text (empty ones skipped), each scored alone."""
    texts = [t for t in texts if t.strip()]
    documents = [tokenizer.encode(t, bos=True) for t in texts]
    nlls = document_nlls(model, documents, window, batch_size, progress)
    return rolling_summary(
        sum(n for n, _ in nlls),
        sum(c for _, c in nlls),
        sum(len(t.encode("utf-8")) for t in texts),
        sum(count_words(t) for t in texts),
        len(texts),
    )


def combine_rolling(results: dict[str, dict]) -> dict:
    """The figures of several sources together (weighted by their tokens, bytes and words)."""

    def total(key: str) -> float:
        return sum(r[key] for r in results.values())

    nll = sum(r["loss"] * r["tokens"] for r in results.values() if r["tokens"])
    return rolling_summary(nll, total("tokens"), total("bytes"), total("words"), total("documents"))
