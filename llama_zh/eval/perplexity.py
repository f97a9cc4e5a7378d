"""Token-weighted perplexity on token streams (packed held-out documents), by sliding windows.

A stream longer than the window is read in windows of `window` inputs starting every `stride`
tokens; each token is scored once, by the first window that reaches it, so with stride < window every
scored token after the first window has at least window - stride tokens of context. stride = window
gives back-to-back windows (cheapest). The last window is aligned to the end of the stream, so every
token is scored and every window is full. Perplexity is exp(total negative log-likelihood / scored
tokens): sources and shards weigh by their token counts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from llama_zh.model import Transformer


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
def stream_nll(model: Transformer, tokens: np.ndarray, window: int, stride: int, batch_size: int,
               max_windows: int | None = None) -> tuple[float, int]:
    """(summed negative log-likelihood, scored tokens) of one token stream."""
    device = model.norm.weight.device
    spans = window_spans(len(tokens), window, stride)[:max_windows]
    width = min(window, len(tokens) - 1)
    total, count = 0.0, 0
    for i in range(0, len(spans), batch_size):
        chunk = spans[i : i + batch_size]
        x = torch.stack([torch.from_numpy(np.asarray(tokens[b : b + width + 1], dtype=np.int64)) for b, _ in chunk]).to(device)
        logits = model(x[:, :-1])  # (b, width, V)
        nll = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(len(chunk), width)
        skip = torch.tensor([s for _, s in chunk], device=device)
        scored = torch.arange(width, device=device)[None, :] >= skip[:, None]  # (b, width)
        total += float(nll[scored].sum())
        count += int(scored.sum())
    return total, count


def perplexity(model: Transformer, streams: Sequence[np.ndarray], window: int, stride: int | None = None,
               batch_size: int = 8, max_batches: int | None = None) -> dict:
    """{'loss', 'ppl', 'tokens'} over several streams (e.g. the shards of one source), token-weighted;
    at most `max_batches` batches of windows in all."""
    stride = stride or window
    budget = max_batches * batch_size if max_batches is not None else None
    total, count = 0.0, 0
    for tokens in streams:
        if budget is not None and budget <= 0:
            break
        nll, n = stream_nll(model, tokens, window, stride, batch_size, budget)
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


def source_perplexities(model: Transformer, sources: dict[str, Path | list[Path]], load: Callable[[Path], np.ndarray],
                        window: int, stride: int | None = None, batch_size: int = 8,
                        max_batches: int | None = None) -> dict[str, dict]:
    """Per source (each a token file or a list of shard files) and 'all' (token-weighted)."""
    results = {}
    for source, files in sources.items():
        results[source] = perplexity(model, [load(p) for p in as_paths(files)], window, stride, batch_size, max_batches)
    tokens = sum(r["tokens"] for r in results.values())
    loss = sum(r["loss"] * r["tokens"] for r in results.values() if r["tokens"]) / tokens if tokens else float("nan")
    results["all"] = {"loss": loss, "ppl": math.exp(loss) if tokens else float("nan"), "tokens": tokens}
    return results
