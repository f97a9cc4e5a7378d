"""Log-likelihoods of continuations given prompts, the primitive of the choice and classification tasks.

Prompts of different lengths are left-padded into one KV cache (as generation does), so every row's
prompt ends at the same slot: the prompt is run once, in chunks (the logits of a chunk are B x C x V,
so long few-shot prompts never hold B x T x V at once), and each candidate continuation is then run
on top of the same cache, rewinding it between candidates.
"""

from __future__ import annotations

import torch

from llama_zh.model import KVCache, Transformer

LOGIT_BUDGET = 4096  # rows x positions of logits alive at once during the prompt pass


def _left_padded(prompts: list[list[int]], device) -> tuple[torch.Tensor, list[int]]:
    P = max(len(p) for p in prompts)
    pad = [P - len(p) for p in prompts]
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, pad[i]:] = torch.tensor(p)
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
    if not prompts or not continuations or any(len(c) == 0 for c in continuations):
        raise ValueError("need at least one prompt and non-empty continuations")
    longest = max(len(c) for c in continuations)
    room = model.config.max_seq_len - longest + 1  # the last continuation token is never fed
    prompts = [fit_left(p, room) for p in prompts]
    device, dtype = model.norm.weight.device, model.norm.weight.dtype
    ids, pad = _left_padded(prompts, device)
    B, P = ids.shape
    cache = KVCache.allocate(model.config, B, P + longest - 1, device=device, dtype=dtype,
                             left_pad=pad if any(pad) else None)
    chunk = max(1, LOGIT_BUDGET // B)
    for start in range(0, P, chunk):
        last = model(ids[:, start : start + chunk], cache, last_only=True)[:, -1]  # (B, V) after the last chunk
    first = last.float().log_softmax(dim=-1)  # (B, V): the next token after each prompt

    scores = torch.empty(B, len(continuations))
    for n, cont in enumerate(continuations):
        total = first[:, cont[0]]  # (B,)
        if len(cont) > 1:
            cache.pos = P  # rewind: this continuation overwrites the previous one's slots
            fed = torch.tensor(cont[:-1], device=device).expand(B, -1)  # (B, L-1)
            logp = model(fed, cache).float().log_softmax(dim=-1)  # (B, L-1, V)
            target = torch.tensor(cont[1:], device=device).expand(B, -1)
            total = total + logp.gather(-1, target[..., None]).squeeze(-1).sum(dim=-1)
        scores[:, n] = total.cpu()
    return scores


def batches_by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped `batch_size` at a time, longest first, so a batch pads little."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
