"""Log-likelihoods of continuations given prompts, the primitive of the choice and classification tasks.

Prompts of different lengths are left-padded into one KV cache (as generation does), so every row's
prompt ends at the same slot: the prompt is run once, in chunks (the logits of a chunk are B x C x V,
so long few-shot prompts never hold B x T x V at once), and each candidate continuation is then run
on top of the same cache, rewinding it between candidates.
"""

from __future__ import annotations

import torch

from llama_zh.model import Transformer
from llama_zh.prefix import allocate_cache

LOGIT_BUDGET = 4096  # rows x positions of logits alive at once during the prompt pass


def _left_padded(prompts: list[list[int]], device) -> tuple[torch.Tensor, list[int]]:
    P = max(len(p) for p in prompts)
    pad = [P - len(p) for p in prompts]
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, pad[i] :] = torch.tensor(p)
    return ids.to(device), pad


def fit_left(prompt: list[int], max_len: int) -> list[int]:
    """The prompt's last `max_len` tokens, bos (its first token) kept: the question sits at the end."""
    if len(prompt) <= max_len:
        return prompt
    return prompt[:1] + prompt[len(prompt) - max_len + 1 :]


@torch.inference_mode()
def continuation_logprobs(model: Transformer, prompts: list[list[int]], continuations: list[list[int]]) -> torch.Tensor:
    """(B, N) float: log P(continuation n | prompt b), summed over the continuation's tokens.

    Every continuation is scored after every prompt. Prompts longer than the context minus the
    longest continuation keep their last tokens (see `fit_left`).
    """
    return row_continuation_logprobs(model, prompts, [continuations] * len(prompts))


@torch.inference_mode()
def row_continuation_logprobs(
    model: Transformer, prompts: list[list[int]], continuations: list[list[list[int]]]
) -> torch.Tensor:
    """(B, N) float: log P(continuations[b][n] | prompts[b]), summed over the continuation's tokens.

    Each prompt has its own N candidates (the option texts of its question). Candidate n of every
    row is run in one pass on top of the shared prompt cache; shorter candidates are right-padded,
    which cannot change the scores of the tokens before the padding (the model is causal).
    """
    if not prompts or len(continuations) != len(prompts):
        raise ValueError("need at least one prompt and one list of continuations per prompt")
    n_cands = len(continuations[0])
    if not n_cands or any(len(c) != n_cands for c in continuations) or any(not t for c in continuations for t in c):
        raise ValueError("every prompt needs the same number of non-empty continuations")
    longest = max(len(t) for c in continuations for t in c)
    room = model.config.max_seq_len - longest + 1  # the last continuation token is never fed
    prompts = [fit_left(p, room) for p in prompts]
    device, dtype = model.norm.weight.device, model.norm.weight.dtype
    ids, pad = _left_padded(prompts, device)
    B, P = ids.shape
    cache = allocate_cache(
        model,
        B,
        P + longest - 1,
        device=device,
        dtype=dtype,  # + a prefix's slots, if any
        left_pad=pad if any(pad) else None,
    )
    chunk = max(1, LOGIT_BUDGET // B)
    for start in range(0, P, chunk):
        last = model(ids[:, start : start + chunk], cache, last_only=True)[:, -1]  # (B, V) after the last chunk
    prompted = cache.pos  # the prefix (finetune=prefix) and the prompts
    first = last.float().log_softmax(dim=-1)  # (B, V): the next token after each prompt

    scores = torch.empty(B, n_cands)
    rows = torch.arange(B, device=device)
    for n in range(n_cands):
        conts = [c[n] for c in continuations]
        total = first[rows, torch.tensor([c[0] for c in conts], device=device)]  # (B,)
        L = max(len(c) for c in conts)
        if L > 1:
            cache.pos = prompted  # rewind: this candidate overwrites the previous one's slots
            padded = torch.zeros(B, L, dtype=torch.long)
            for b, c in enumerate(conts):
                padded[b, : len(c)] = torch.tensor(c)
            padded = padded.to(device)
            lengths = torch.tensor([len(c) for c in conts], device=device)
            logp = model(padded[:, :-1], cache).float().log_softmax(dim=-1)  # (B, L-1, V)
            picked = logp.gather(-1, padded[:, 1:, None]).squeeze(-1)  # (B, L-1)
            real = torch.arange(1, L, device=device)[None, :] < lengths[:, None]
            total = total + torch.where(real, picked, 0.0).sum(dim=-1)
        scores[:, n] = total.cpu()
    return scores


def batches_by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped `batch_size` at a time, longest first, so a batch pads little."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
