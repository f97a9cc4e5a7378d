"""Sampling and autoregressive decoding: prefill the prompts once, then one cached step per token.

Plain PyTorch: the model is any `llama_zh.model.Transformer`, plain or swapped for inference
(llama_zh.infer.load); generation never changes its weights or their layout. Logits processing is a set of pure
functions on (B, V) tensors (B batch, V vocabulary, T history length), each testable alone.

Batches. Prompts of different lengths are left-padded into one KV cache (`KVCache.left_pad`), which
gives each row the positions it would have alone and hides the padding from attention, so a batch
decodes each prompt as it would be decoded alone: greedy rows are the same tokens, and seeded sampling
draws each row from its own generator (seed + row), so a row does not depend on its neighbours either.

Order of the logits processors. The reference tool (docs/reference.md#recipe; llama_inference's generate.py) applies
top-k, then top-p, then temperature, then the repetition penalty, i.e. the penalty only reweights
tokens that survived the filters. Transformers (and most tools) apply the penalty first, so that it
can push a repeated token out of the top-k set. Both orders are offered: `penalty_after_filters`
False (default) is penalty -> top-k -> top-p -> temperature; True is the reference's order and is
what `SamplingConfig.reference()` sets. Temperature and the CTRL penalty are both sign-preserving
rescalings, so they commute; only the penalty's place relative to the filters matters.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from llama_zh.model import Transformer
from llama_zh.prefix import allocate_cache


class Decoder(Protocol):
    """What generation needs of a tokenizer (llama_zh.tokenizer.Tokenizer is one)."""

    eos_id: int

    def decode(self, ids: list[int]) -> str: ...


def stop_ids_of(tokenizer: Decoder | None, eos_id: int | None = None) -> frozenset[int]:
    """The ids that end a row: `eos_id` alone when given (-1: none), else every stop id of the
    tokenizer (eos and a chat model's end of turn, e.g. Llama-3's <|eot_id|>, which an instruct model
    emits instead of eos), else none."""
    if eos_id is not None:
        return frozenset({eos_id} if eos_id >= 0 else ())
    if tokenizer is None:
        return frozenset()
    ids = getattr(tokenizer, "stop_ids", None)
    if ids is None:  # a bare Decoder knows only its eos
        ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    return frozenset(i for i in ids if i >= 0)


LONG_PROMPT = ("truncate", "fail")


class PromptTooLong(ValueError):
    def __init__(self, row: int, length: int, max_len: int):
        super().__init__(f"prompt {row} has {length} tokens, the model's context is {max_len} (stage.long_prompt=fail)")
        self.row, self.length, self.max_len = row, length, max_len


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # 0: greedy (argmax after the repetition penalty)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    repetition_window: int = 1024  # how many of the latest ids (prompt included) the penalty looks at
    max_new_tokens: int = 128
    seed: int | None = None  # None: torch's global RNG, not reproducible
    stop_strings: list[str] = field(default_factory=list)
    penalty_after_filters: bool = False  # True: the reference's order (see the module docstring)
    long_prompt: str = "truncate"  # a prompt that fills the context: "truncate" (left, warning) or "fail"

    def __post_init__(self) -> None:
        def number(name: str, value) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"stage.{name} must be a finite number, got {value!r}")
            return float(value)

        def integer(name: str, value, minimum: int) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"stage.{name} must be an integer >= {minimum}, got {value!r}")
            return value

        self.temperature = number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"stage.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        self.top_k = integer("top_k", self.top_k, 0)
        self.top_p = number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"stage.top_p must be in (0, 1], got {self.top_p}")
        self.repetition_penalty = number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"stage.repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        self.repetition_window = integer("repetition_window", self.repetition_window, 1)
        self.max_new_tokens = integer("max_new_tokens", self.max_new_tokens, 1)
        if self.seed is not None:
            integer("seed", self.seed, 0)
        if isinstance(self.stop_strings, str):
            raise ValueError(f"stage.stop_strings must be a list of strings, got the string {self.stop_strings!r}")
        self.stop_strings = list(self.stop_strings)  # a tuple or other sequence becomes a list
        for s in self.stop_strings:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stage.stop_strings must hold non-empty strings, got {s!r}")
        if not isinstance(self.penalty_after_filters, bool):
            raise ValueError(f"stage.penalty_after_filters must be true or false, got {self.penalty_after_filters!r}")
        if self.long_prompt not in LONG_PROMPT:
            raise ValueError(f"stage.long_prompt must be one of {', '.join(LONG_PROMPT)}, got {self.long_prompt!r}")

    @classmethod
    def reference(cls, **overrides) -> SamplingConfig:
        """The reference tool's defaults and processor order (docs/reference.md#recipe)."""
        values = dict(
            temperature=0.85,
            top_k=10,
            top_p=1.0,
            repetition_penalty=1.15,
            repetition_window=1024,
            penalty_after_filters=True,
        )
        values.update(overrides)
        return cls(**values)


# ------------------------------------------------------------------------------------- logits processors


def apply_repetition_penalty(
    logits: torch.Tensor, previous_ids: torch.Tensor, penalty: float, window: int
) -> torch.Tensor:
    """CTRL penalty: logits (B, V) of tokens among the last `window` of previous_ids (B, T) are made less
    likely, positive ones divided by `penalty`, negative ones multiplied; a token seen several times is
    penalised once; negative ids (padding of shorter rows) are ignored. Returns a new tensor."""
    if penalty == 1.0 or previous_ids.shape[-1] == 0:
        return logits
    B, V = logits.shape
    recent = previous_ids[:, -window:]  # (B, min(T, window))
    recent = torch.where(recent >= 0, recent, V)  # padding -> an extra column, dropped below
    seen = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device).scatter_(1, recent, True)[:, :V]  # a set
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits of each row (B, V) (ties broken by torch.topk), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, logits.topk(k, dim=-1).indices, True)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter on (B, V): keep the smallest set of most likely tokens whose probability mass is
    >= p (the top token always), -inf elsewhere."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.float().softmax(dim=-1)
    cum = probs.cumsum(dim=-1)
    mass_before = torch.cat((torch.zeros_like(cum[:, :1]), cum[:, :-1]), dim=-1)  # mass of the better tokens
    # A token is needed while the better ones have not reached p yet; the first is always needed.
    drop_sorted = mass_before >= p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    cfg: SamplingConfig,
    generator: torch.Generator | list[torch.Generator] | None = None,
    previous_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next ids (B,) from logits (B, V); previous_ids (B, T) feed the repetition penalty.

    `generator`: one for the whole batch, or a list of B, one per row (each row then draws exactly
    what it would draw alone with that generator)."""
    logits = logits.float()  # fp16 logits lose the small differences the filters compare
    penalise = previous_ids is not None and cfg.repetition_penalty != 1.0
    if penalise and (not cfg.penalty_after_filters or cfg.temperature == 0):
        logits = apply_repetition_penalty(logits, previous_ids, cfg.repetition_penalty, cfg.repetition_window)
    if cfg.temperature == 0:
        # The filters never remove the argmax, so greedy is the same in both orders.
        return logits.argmax(dim=-1)
    logits = top_k_filter(logits, cfg.top_k)
    logits = top_p_filter(logits, cfg.top_p)
    logits = logits / cfg.temperature
    if penalise and cfg.penalty_after_filters:
        logits = apply_repetition_penalty(logits, previous_ids, cfg.repetition_penalty, cfg.repetition_window)
    probs = logits.softmax(dim=-1)  # (B, V)
    if isinstance(generator, (list, tuple)):
        return torch.cat(
            [torch.multinomial(probs[i : i + 1], 1, generator=g) for i, g in enumerate(generator)]
        ).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -------------------------------------------------------------------------------------------- decoding


def earliest_stop(text: str, stops: list[str]) -> int | None:
    """Where the first of `stops` starts in `text` (None: none does)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def _ids_within(ids: list[int], n_chars: int, tokenizer: Decoder, lo: int) -> int:
    """The largest n >= lo with len(decode(ids[:n])) <= n_chars (lo if none)."""
    n = len(ids)
    while n > lo and len(tokenizer.decode(ids[:n])) > n_chars:
        n -= 1
    return n


class RowState:
    """One prompt's decoding state: the ids it generated, how many are released, whether it has ended.

    Stop strings are searched in the decoded text of the new tokens only (not the prompt). When one
    appears, the row ends and the ids released are exactly the longest prefix of the new ids whose
    text ends before the stop string: the tokens that make up the stop string are dropped, and so is
    any text a token carries just before the stop string inside that same token. To honour this
    while streaming, ids whose text could be the start of a stop string are held back until the
    stop string is ruled out (then they are released) or completed (then they are dropped).
    """

    def __init__(self, budget: int):
        self.new_ids: list[int] = []
        self.emitted = 0  # new_ids[:emitted] are released; the rest is held back
        self.budget = budget  # new tokens the context leaves room for (max_new_tokens at most)
        self.done = False

    def add(self, token: int, stop_ids: Collection[int], cfg: SamplingConfig, tokenizer: Decoder | None) -> list[int]:
        """Take the next sampled token; return the ids it releases. A token in `stop_ids` ends the row
        unreleased."""
        if token in stop_ids:
            self.done = True
            return self._flush()
        self.new_ids.append(token)
        if cfg.stop_strings:
            text = tokenizer.decode(self.new_ids)
            stop_at = earliest_stop(text, cfg.stop_strings)
            safe_chars = stop_at if stop_at is not None else len(text) - _partial_stop_len(text, cfg.stop_strings)
            safe = _ids_within(self.new_ids, safe_chars, tokenizer, self.emitted)
            released = self.new_ids[self.emitted : safe]
            self.emitted = safe
            if stop_at is not None:
                self.done = True
                return released
        else:
            released = [token]
            self.emitted += 1
        if len(self.new_ids) >= self.budget:
            self.done = True
            released += self._flush()
        return released

    def _flush(self) -> list[int]:
        """Held-back ids of a stop string that never completed."""
        released = self.new_ids[self.emitted :]
        self.emitted = len(self.new_ids)
        return released


def fit_prompt(prompt: list[int], cfg: SamplingConfig, max_len: int, row: int = 0) -> list[int]:
    """The prompt as decoded: unchanged if it leaves room for a new token in the context of `max_len`.

    Otherwise, with `cfg.long_prompt == "fail"`, PromptTooLong; with "truncate", its last
    max(max_len - max_new_tokens, max_len // 2) tokens, with a warning: the start is lost anyway, so
    the answer is given room, but never more than half the context.
    """
    if len(prompt) == 0:
        raise ValueError(f"prompt_ids is empty (row {row}): give at least one token (e.g. bos) to condition on")
    if len(prompt) < max_len:
        return list(prompt)
    if cfg.long_prompt == "fail":
        raise PromptTooLong(row, len(prompt), max_len)
    keep = max(max_len - cfg.max_new_tokens, max_len // 2)
    warnings.warn(
        f"prompt {row} of {len(prompt)} tokens leaves no room in the context of {max_len}: "
        f"keeping its last {keep} tokens",
        stacklevel=4,
    )
    return list(prompt[-keep:])


@torch.inference_mode()
def stream_generate_batch(
    model: Transformer,
    prompts: list[list[int]],
    cfg: SamplingConfig,
    eos_id: int | None = None,
    tokenizer: Decoder | None = None,
    seeds: list[int] | None = None,
) -> Iterator[list[list[int]]]:
    """Decode a batch of prompts (any lengths) together; after each step, yield the ids each row
    releases in it (one list per row, often empty).

    A row ends at a stop id (not released; `stop_ids_of`: `eos_id` if given, else the tokenizer's
    eos and end of turn), at a stop string (see `RowState`), after `cfg.max_new_tokens` tokens, or
    when its prompt and new tokens fill `model.config.max_seq_len` (with a warning). Decoding stops
    when every row has ended. The KV cache is allocated once, for the longest prompt plus the most new tokens any row
    can take. Seeded sampling: row i draws from a generator seeded with `seeds[i]` (default
    cfg.seed + i); cfg.seed None and no seeds: torch's global RNG, not reproducible.
    """
    if cfg.stop_strings and tokenizer is None:
        raise ValueError("stage.stop_strings needs a tokenizer to decode the generated text")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    stop_ids = stop_ids_of(tokenizer, eos_id)
    max_len = model.config.max_seq_len
    prompts = [fit_prompt(p, cfg, max_len, row) for row, p in enumerate(prompts)]
    if not prompts:
        return
    B = len(prompts)
    rows = [RowState(min(cfg.max_new_tokens, max_len - len(p))) for p in prompts]
    n_steps = max(r.budget for r in rows)

    # Norms are never quantized: their weight gives the activations' device and dtype, which the cache must match.
    device, dtype = model.norm.weight.device, model.norm.weight.dtype
    P = max(len(p) for p in prompts)
    left_pad = [P - len(p) for p in prompts]
    ids = torch.zeros(B, P, dtype=torch.long)  # padding id 0: the cache hides it from attention
    for i, p in enumerate(prompts):
        ids[i, left_pad[i] :] = torch.tensor(p)
    ids = ids.to(device)
    cache = allocate_cache(
        model,
        B,
        P + n_steps - 1,
        device=device,
        dtype=dtype,  # + a prefix's slots, if any
        left_pad=left_pad if any(left_pad) else None,
    )

    generators = None
    if seeds is not None or cfg.seed is not None:
        seeds = seeds if seeds is not None else [cfg.seed + i for i in range(B)]
        generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    history = None  # (B, <= window): what the penalty looks back on, padding as -1
    if cfg.repetition_penalty != 1.0:
        pad_mask = torch.arange(P, device=device)[None, :] < torch.tensor(left_pad, device=device)[:, None]
        history = ids.masked_fill(pad_mask, -1)[:, -cfg.repetition_window :]

    logits = model(ids, cache, last_only=True)[:, -1]  # (B, V): prefill in one pass
    for _step in range(n_steps):
        next_ids = sample_next(logits, cfg, generators, history)  # (B,)
        tokens = next_ids.tolist()
        released = [
            row.add(t, stop_ids, cfg, tokenizer) if not row.done else [] for row, t in zip(rows, tokens, strict=False)
        ]
        finished = all(row.done for row in rows)
        if finished:
            short = [i for i, r in enumerate(rows) if r.budget < cfg.max_new_tokens and len(r.new_ids) == r.budget]
            if short:
                warnings.warn(
                    f"generation of prompt(s) {short} stopped after {rows[short[0]].budget} new tokens: "
                    f"the context of {max_len} is full",
                    stacklevel=3,
                )
        yield released
        if finished:
            return
        if history is not None:
            history = torch.cat((history, next_ids[:, None]), dim=1)[:, -cfg.repetition_window :]
        logits = model(next_ids[:, None], cache, last_only=True)[:, -1]


def generate_batch(
    model: Transformer,
    prompts: list[list[int]],
    cfg: SamplingConfig,
    eos_id: int | None = None,
    tokenizer: Decoder | None = None,
    seeds: list[int] | None = None,
) -> list[list[int]]:
    """The new ids of each prompt (stop id and stop string excluded); see `stream_generate_batch`."""
    out: list[list[int]] = [[] for _ in prompts]
    for released in stream_generate_batch(model, prompts, cfg, eos_id=eos_id, tokenizer=tokenizer, seeds=seeds):
        for ids, new in zip(out, released, strict=False):
            ids.extend(new)
    return out


def stream_generate(
    model: Transformer,
    prompt_ids: list[int],
    cfg: SamplingConfig,
    eos_id: int | None = None,
    tokenizer: Decoder | None = None,
) -> Iterator[int]:
    """Yield the new ids of one prompt as they are released; see `stream_generate_batch`."""
    for released in stream_generate_batch(model, [prompt_ids], cfg, eos_id=eos_id, tokenizer=tokenizer):
        yield from released[0]


def generate(
    model: Transformer,
    prompt_ids: list[int],
    cfg: SamplingConfig,
    eos_id: int | None = None,
    tokenizer: Decoder | None = None,
) -> list[int]:
    """The new token ids of one prompt (stop id and stop string excluded); see `stream_generate_batch`."""
    return generate_batch(model, [prompt_ids], cfg, eos_id=eos_id, tokenizer=tokenizer)[0]
