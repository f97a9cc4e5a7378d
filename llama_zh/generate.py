"""Sampling and autoregressive decoding: prefill the prompt once, then one cached step per token.

Plain PyTorch: the model is any `llama_zh.model.Transformer`. Logits processing is a set of pure
functions on (B, V) tensors (B batch, V vocabulary, T history length), each testable alone.

Order of the logits processors. The reference tool (ANCHORS §3; llama_inference's generate.py) applies
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
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch

from llama_zh.model import KVCache, Transformer


class Decoder(Protocol):
    """What generation needs of a tokenizer (llama_zh.tokenizer.Tokenizer is one)."""

    eos_id: int

    def decode(self, ids: list[int]) -> str: ...


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
        self.stop_strings = list(self.stop_strings)  # also turns an omegaconf ListConfig into a list
        for s in self.stop_strings:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stage.stop_strings must hold non-empty strings, got {s!r}")
        if not isinstance(self.penalty_after_filters, bool):
            raise ValueError(f"stage.penalty_after_filters must be true or false, got {self.penalty_after_filters!r}")

    @classmethod
    def reference(cls, **overrides) -> "SamplingConfig":
        """The reference tool's defaults and processor order (ANCHORS §3)."""
        values = dict(temperature=0.85, top_k=10, top_p=1.0, repetition_penalty=1.15, repetition_window=1024,
                      penalty_after_filters=True)
        values.update(overrides)
        return cls(**values)


# ------------------------------------------------------------------------------------- logits processors


def apply_repetition_penalty(logits: torch.Tensor, previous_ids: torch.Tensor, penalty: float, window: int) -> torch.Tensor:
    """CTRL penalty: logits (B, V) of tokens among the last `window` of previous_ids (B, T) are made less
    likely, positive ones divided by `penalty`, negative ones multiplied; a token seen several times is
    penalised once. Returns a new tensor."""
    if penalty == 1.0 or previous_ids.shape[-1] == 0:
        return logits
    recent = previous_ids[:, -window:]  # (B, min(T, window))
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, recent, True)  # (B, V): a set, so once each
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


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None,
                previous_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Next ids (B,) from logits (B, V); previous_ids (B, T) feed the repetition penalty."""
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
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -------------------------------------------------------------------------------------------- decoding


def _earliest_stop(text: str, stops: list[str]) -> int | None:
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


@torch.inference_mode()
def stream_generate(model: Transformer, prompt_ids: list[int], cfg: SamplingConfig, eos_id: int | None = None,
                    tokenizer: Decoder | None = None) -> Iterator[int]:
    """Yield new token ids one by one (batch of one).

    Stops at `eos_id` (not yielded; None: the tokenizer's eos if a tokenizer is given, else never),
    after `cfg.max_new_tokens` tokens, when prompt + new tokens fill `model.config.max_seq_len`
    (with a warning), or at a stop string.

    Stop strings are searched in the decoded text of the new tokens only (not the prompt). When one
    appears, generation ends and the ids yielded are exactly the longest prefix of the new ids whose
    text ends before the stop string: the tokens that make up the stop string are dropped, and so is
    any text a token carries just before the stop string inside that same token. To honour this
    while streaming, ids whose text could be the start of a stop string are held back until the
    stop string is ruled out (then they are yielded) or completed (then they are dropped).

    A prompt of max_seq_len tokens or more keeps only its last max_seq_len - 1 tokens (warning).
    """
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty: give at least one token (e.g. bos) to condition on")
    if cfg.stop_strings and tokenizer is None:
        raise ValueError("stage.stop_strings needs a tokenizer to decode the generated text")
    if eos_id is None and tokenizer is not None and tokenizer.eos_id >= 0:
        eos_id = tokenizer.eos_id
    max_len = model.config.max_seq_len
    prompt = list(prompt_ids)
    if len(prompt) >= max_len:
        warnings.warn(f"prompt of {len(prompt)} tokens leaves no room in the context of {max_len}: "
                      f"keeping its last {max_len - 1} tokens", stacklevel=3)
        prompt = prompt[-(max_len - 1):]
    n_new = min(cfg.max_new_tokens, max_len - len(prompt))

    weight = model.embed.weight  # the activation device and dtype: the cache must match both
    generator = torch.Generator(device=weight.device).manual_seed(cfg.seed) if cfg.seed is not None else None
    cache = KVCache.allocate(model.config, 1, len(prompt) + n_new, device=weight.device, dtype=weight.dtype)
    prompt_t = torch.tensor([prompt], device=weight.device)  # (1, T)
    logits = model(prompt_t, cache)[:, -1]  # (1, V): prefill in one pass
    history = prompt_t[:, -cfg.repetition_window:]  # (1, <= window): what the penalty looks back on

    new_ids: list[int] = []
    emitted = 0  # new_ids[:emitted] are yielded; the rest is held back (possible stop string)
    for step in range(n_new):
        next_id = sample_next(logits, cfg, generator, history)  # (1,)
        token = int(next_id)
        if token == eos_id:
            break
        new_ids.append(token)
        if cfg.stop_strings:
            text = tokenizer.decode(new_ids)
            stop_at = _earliest_stop(text, cfg.stop_strings)
            safe_chars = stop_at if stop_at is not None else len(text) - _partial_stop_len(text, cfg.stop_strings)
            safe = _ids_within(new_ids, safe_chars, tokenizer, emitted)
            yield from new_ids[emitted:safe]
            emitted = safe
            if stop_at is not None:
                return
        else:
            yield token
            emitted += 1
        if step + 1 == n_new:
            if n_new < cfg.max_new_tokens:
                warnings.warn(f"generation stopped after {n_new} new tokens: the context of {max_len} is full",
                              stacklevel=3)
            break
        history = torch.cat((history, next_id.view(1, 1)), dim=1)[:, -cfg.repetition_window:]
        logits = model(next_id.view(1, 1), cache)[:, -1]
    yield from new_ids[emitted:]  # held back for a stop string that never completed


def generate(model: Transformer, prompt_ids: list[int], cfg: SamplingConfig, eos_id: int | None = None,
             tokenizer: Decoder | None = None) -> list[int]:
    """The new token ids (eos and stop string excluded); see `stream_generate` for when it stops."""
    return list(stream_generate(model, prompt_ids, cfg, eos_id=eos_id, tokenizer=tokenizer))
