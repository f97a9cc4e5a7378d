"""Continuous batching: requests join and leave the running batch between decoding steps.

Each running sequence owns one slot of a KV cache allocated once (`max_concurrent` slots of
`context_length` positions). A lone new sequence's prompt is prefilled into its slot (the model's
own forward on a view of the slot, the same computation as stream_generate's prefill of one
prompt). Requests admitted together are prefilled in one forward (`prefill_step`: the weights are read
once for all of them, either laid end to end in one row under a block-diagonal mask or right-padded
to the longest, whichever costs less; each prompt written into its own slot and read at its own last
token), up to `max_prefill_tokens` (prompts x the longest) a round, so a burst of arrivals waits for one
prefill rather than one per prompt, and a huge batch of prompts is split over rounds with decoding
steps between. Then each decoding step feeds the last token of every running sequence together through
the model's own forward, each at its own position (`positions=`), attending to its own slot's keys
up to that position only (`SlotRows`, the cache the step hands the forward: `decode_step`). A
sequence is therefore computed as it would be alone: greedy answers do not depend on what else is in
the batch, and sampling draws from the sequence's own generator (seeded by the request, or at random),
so a seeded answer does not depend on its neighbours either (under dynamic RoPE scaling, whose tables
depend on the length, a row past the original context shares no forward with rows of other lengths:
`rope_groups`). A finished or cancelled sequence frees
its slot at once; the next queued request takes it at the next step.

Sampling is generate.py's (`sample_next`, per sequence with its own SamplingConfig); stop ids, stop
strings and the token budget are handled by generate.py's `RowState`, so stage=serve and stage=infer
end answers identically. Text is streamed as deltas that never end inside a character (`TextDeltas`).

Threads: one engine thread owns the model (`start`/`stop`); `submit` and `cancel` may be called from
any thread, and events reach the caller through a callback (asyncio: `submit_async`). `step` runs one
round and may also be driven by hand (tests) when no thread is started.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llama_zh.config import ModelConfig
from llama_zh.errors import LlamaZhError
from llama_zh.generate import RowState, SamplingConfig, earliest_stop, sample_next, stop_ids_of
from llama_zh.model import KVCache, Transformer
from llama_zh.prefix import fill_prefix, prefix_len

log = logging.getLogger(__name__)
REPLACEMENT = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 character to


class EngineError(LlamaZhError):
    pass


class QueueFull(EngineError):
    """Every slot is taken and the queue is full: the caller should retry later (HTTP 429)."""


class ContextExceeded(EngineError, ValueError):
    def __init__(self, length: int, context_length: int):
        super().__init__(
            f"the prompt has {length} tokens; the context holds {context_length} "
            f"(prompt and completion together), so no token is left to generate"
        )
        self.length, self.context_length = length, context_length


class EngineStopped(EngineError):
    pass


@dataclass
class Event:
    """What a sequence reports: new text, and at the end why it ended and what it counted."""

    text: str = ""
    finish_reason: str | None = None  # stop | length | cancelled | error; None: more to come
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def final(self) -> bool:
        return self.finish_reason is not None


class TextDeltas:
    """The text of a growing list of ids, as deltas.

    The ids are decoded whole each time (sentencepiece joins pieces differently at the start of a
    text than inside it), and a delta is given only when the text so far ends on a whole character:
    a character split across byte tokens decodes as U+FFFD until its last byte arrives."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def push(self, ids: list[int]) -> str:
        if not ids:
            return ""
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids)
        if text.endswith(REPLACEMENT) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def finish(self) -> str:
        """What is still held back (the ids are complete: nothing more will join the last character)."""
        text = self.tokenizer.decode(self.ids)
        delta = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent += delta
        return delta


@dataclass
class SlotCache:
    """Keys and values of `slots` sequences, each up to `max_len` positions: (L, slots, K, max_len, D)."""

    k: torch.Tensor
    v: torch.Tensor
    start: int = 0  # positions of every slot before its sequence: a prefix's (llama_zh.prefix.fill_prefix)

    @classmethod
    def allocate(cls, config: ModelConfig, slots: int, max_len: int, device=None, dtype=torch.float32) -> SlotCache:
        shape = (config.n_layers, slots, config.n_kv_heads, max_len, config.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def slot(self, index: int) -> KVCache:
        """Slot `index` as a one-row KVCache from position `start`: the model's own forward fills it (prefill)."""
        return KVCache(self.k[:, index : index + 1], self.v[:, index : index + 1], pos=self.start)

    def prompts(self, slots: list[int], length: int) -> SlotPrompts:
        """The cache of a batched prefill: `length` tokens per row from `start` of slot slots[i]."""
        return SlotPrompts(self, slots, length)

    def rows(self, slots: list[int], positions: list[int]) -> SlotRows:
        """The cache of one decoding step: row i's next token at positions[i] of slot slots[i]."""
        return SlotRows(self, slots, positions)


class SlotRows:
    """One new token per row, row i at `positions[i]` of cache slot `slots[i]`, seeing only that
    slot's keys up to its position: the cache a decoding step hands Transformer.forward (it answers
    what model.KVCache answers; the engine, not the cache, keeps each sequence's length)."""

    def __init__(self, cache: SlotCache, slots: list[int], positions: list[int]):
        device = cache.k.device
        self.cache = cache
        self.length = max(positions) + 1
        self.pos = torch.tensor(positions, device=device)  # (B,)
        self.slots = torch.tensor(slots, device=device)
        first = slots[0]
        # consecutive slots: a view of the cache, no copy
        self.span = slice(first, first + len(slots)) if slots == list(range(first, first + len(slots))) else None
        self._mask = None
        if min(positions) != self.length - 1:  # rows of other lengths: each sees its own positions only
            self._mask = (torch.arange(self.length, device=device)[None, :] <= self.pos[:, None])[:, None, None]

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def end(self, T: int) -> int:
        if T != 1:
            raise ValueError(f"a decoding step feeds one token per row, got {T}")
        return self.length

    def positions(self, T: int) -> torch.Tensor:
        return self.pos[:, None]  # (B, 1)

    def mask(self, T: int) -> tuple[torch.Tensor | None, bool]:
        return self._mask, False  # (B, 1, 1, S)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cached_k, cached_v = self.cache.k[layer], self.cache.v[layer]  # (slots, K, S_max, D)
        cached_k[self.slots, :, self.pos] = k[:, :, 0]  # (B, K, D) into each row's own slot and position
        cached_v[self.slots, :, self.pos] = v[:, :, 0]
        if self.span is not None:
            return cached_k[self.span, :, : self.length], cached_v[self.span, :, : self.length]
        return cached_k[self.slots, :, : self.length], cached_v[self.slots, :, : self.length]  # (B, K, S, D)

    def advance(self, T: int) -> None:
        pass  # the engine keeps each sequence's length


class SlotPrompts:
    """Right-padded prompts, row i written from position `start` of cache slot `slots[i]`: the cache a
    batched prefill hands Transformer.forward. Every real token sits where it would alone and, the
    attention being causal, sees only its own prompt (and the prefix); the padding after a prompt
    writes keys past that sequence's length, which its decoding overwrites position by position
    before any of its queries may see them (SlotRows masks keys past a row's position)."""

    def __init__(self, cache: SlotCache, slots: list[int], length: int):
        self.cache, self.start, self.length = cache, cache.start, length
        self.slots = torch.tensor(slots, device=cache.k.device)
        first = slots[0]
        self.span = slice(first, first + len(slots)) if slots == list(range(first, first + len(slots))) else None

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def end(self, T: int) -> int:
        return self.start + T

    def positions(self, T: int) -> int:
        return self.start

    def mask(self, T: int) -> tuple[torch.Tensor | None, bool]:
        if self.start == 0:
            return None, T > 1
        # SDPA's is_causal aligns the mask top-left; the prompt's queries sit after the prefix.
        device = self.cache.k.device
        query_pos = torch.arange(self.start, self.start + T, device=device)
        return torch.arange(self.start + T, device=device)[None, :] <= query_pos[:, None], False  # (T, S)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.start + k.shape[2]
        cached_k, cached_v = self.cache.k[layer], self.cache.v[layer]  # (slots, K, S_max, D)
        if self.span is not None:
            cached_k[self.span, :, self.start : end] = k
            cached_v[self.span, :, self.start : end] = v
            return cached_k[self.span, :, :end], cached_v[self.span, :, :end]
        cached_k[self.slots, :, self.start : end] = k  # (B, K, T, D) into each row's own slot
        cached_v[self.slots, :, self.start : end] = v
        return cached_k[self.slots, :, :end], cached_v[self.slots, :, :end]  # (B, K, S, D)

    def advance(self, T: int) -> None:
        pass


class PackedPrompts:
    """Prompts laid end to end in one row, prompt i written from position `start` of cache slot
    `slots[i]`: the other cache a batched prefill hands Transformer.forward. Each token takes the
    rotary position it would have alone and attends to its own prompt's earlier tokens (and the
    prefix) only, a block-diagonal causal mask; no padding is computed."""

    def __init__(self, cache: SlotCache, slots: list[int], lengths: list[int]):
        device = cache.k.device
        self.cache, self.start, self.first = cache, cache.start, slots[0]
        self.longest = max(lengths)
        segment = torch.repeat_interleave(
            torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device)
        )
        offsets = torch.tensor([0, *itertools.accumulate(lengths)][:-1], device=device)
        within = torch.arange(segment.numel(), device=device) - offsets[segment]  # each token's index in its prompt
        self.slot_of = torch.tensor(slots, device=device)[segment]  # (T,) the slot each token is written to
        self.pos = self.start + within  # (T,)
        order = torch.arange(segment.numel(), device=device)
        packed = (segment[:, None] == segment[None, :]) & (order[None, :] <= order[:, None])  # (T, T)
        self._mask = torch.cat((packed.new_ones(segment.numel(), self.start), packed), dim=1)  # prefix: seen by all

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def end(self, T: int) -> int:
        return self.start + self.longest  # the furthest position any prompt reaches in its slot

    def positions(self, T: int) -> torch.Tensor:
        return self.pos[None, :]  # (1, T)

    def mask(self, T: int) -> tuple[torch.Tensor | None, bool]:
        return self._mask, False  # (T, start + T)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cached_k, cached_v = self.cache.k[layer], self.cache.v[layer]  # (slots, K, S_max, D)
        cached_k[self.slot_of, :, self.pos] = k[0].transpose(0, 1)  # (T, K, D): token t into its slot, position
        cached_v[self.slot_of, :, self.pos] = v[0].transpose(0, 1)
        if self.start == 0:
            return k, v
        prefix = slice(self.first, self.first + 1), slice(None), slice(0, self.start)  # the same in every slot
        return torch.cat((cached_k[prefix], k), dim=2), torch.cat((cached_v[prefix], v), dim=2)

    def advance(self, T: int) -> None:
        pass


PREFILL_LAYOUTS = ("auto", "packed", "padded")


def rope_groups(config: ModelConfig, ends: list[int]) -> list[list[int]]:
    """The rows (indices into `ends`, each row's last position + 1) that may share one forward.

    The rotary tables of a forward are those of its longest row. They are the same for every length
    except under dynamic scaling past the original context, where the base grows with the length: there
    each such row goes alone, so that it is computed as it would be alone (as stream_generate does)."""
    if config.rope_type != "dynamic":
        return [list(range(len(ends)))]
    original = config.rope_scaling["original_max_position_embeddings"]
    within = [i for i, end in enumerate(ends) if end <= original]
    return ([within] if within else []) + [[i] for i, end in enumerate(ends) if end > original]


def packing_pays(config: ModelConfig, lengths: list[int], start: int = 0) -> bool:
    """Whether one packed row of `lengths` costs fewer multiply-adds than the right-padded batch.

    Per layer a token costs its projections (4 dim^2 + 3 dim ffn_dim) and a (query, key) pair the
    score and the weighted sum (2 dim). Packing computes no padding tokens but lets every query face
    every key of the row (SDPA computes the masked-out pairs too), so it wins for many short prompts
    of different lengths and loses when the row grows long next to the model's width."""
    d, f = config.dim, config.ffn_dim
    per_token, per_pair = 4 * d * d + 3 * d * f, 2 * d
    n, longest, total = len(lengths), max(lengths), sum(lengths)
    padded = n * longest * (per_token + (start + longest) * per_pair)
    packed = total * (per_token + (start + total) * per_pair)
    return packed < padded


def prefill_step(
    model: Transformer, cache: SlotCache, slots: list[int], prompts: list[list[int]], layout: str = "auto"
) -> torch.Tensor:
    """Logits (B, V) of the token after each of B prompts, read in one forward: prompt i is written
    into cache slot slots[i] after the slot's prefix, and its logits are those of its last token.

    layout: `padded` (B rows, right-padded to the longest), `packed` (one row, end to end, a
    block-diagonal mask), or `auto` (whichever `packing_pays` counts cheaper)."""
    if layout not in PREFILL_LAYOUTS:
        raise ValueError(f"prefill layout must be one of {', '.join(PREFILL_LAYOUTS)}, got {layout!r}")
    lengths = [len(p) for p in prompts]
    device = cache.k.device
    if layout == "auto":
        layout = "packed" if packing_pays(model.config, lengths, cache.start) else "padded"
    if layout == "packed":
        ids = torch.tensor([[t for p in prompts for t in p]], device=device)  # (1, sum of lengths)
        packed = PackedPrompts(cache, slots, lengths)
        hidden = model(ids, packed, return_hidden=True)  # (1, T, C), each token at its position in its slot
        last = torch.tensor(list(itertools.accumulate(lengths)), device=device) - 1
        return model.head(hidden[0, last])  # (B, V)
    T = max(lengths)
    ids = torch.tensor([p + [0] * (T - len(p)) for p in prompts], device=device)  # (B, T), right-padded
    hidden = model(ids, cache.prompts(slots, T), return_hidden=True)  # (B, T, C), normalised
    last = torch.tensor([n - 1 for n in lengths], device=device)
    return model.head(hidden[torch.arange(len(prompts), device=device), last])  # (B, V)


def decode_step(
    model: Transformer, cache: SlotCache, slots: list[int], tokens: torch.Tensor, positions: list[int]
) -> torch.Tensor:
    """Logits (B, V) of the next token of B sequences: row i feeds tokens[i] at positions[i] of cache
    slot slots[i] (which holds that sequence's positions before it) and sees only those keys."""
    rows = cache.rows(slots, positions)
    return model(tokens[:, None], rows, last_only=True, positions=rows.positions(1))[:, -1]


class Sequence:
    """One request's state in the engine. Callers keep it to cancel the request."""

    def __init__(
        self,
        id: int,
        prompt_ids: list[int],
        sampling: SamplingConfig,
        budget: int,
        deliver: Callable[[Event], None],
        tokenizer,
        device: torch.device,
    ):
        self.id = id
        self.prompt_ids = list(prompt_ids)
        self.sampling = sampling
        self.row = RowState(budget)
        self.deltas = TextDeltas(tokenizer)
        self._deliver = deliver
        # Seeded: the request's own stream; unseeded: a random one, still this sequence's alone.
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator(device=device).manual_seed(int(seed)) if sampling.temperature > 0 else None
        self.history = None  # (1, <= window): what the repetition penalty looks back on
        if sampling.repetition_penalty != 1.0:
            self.history = torch.tensor([self.prompt_ids[-sampling.repetition_window :]], device=device)
        self.slot: int | None = None
        self.length = 0  # positions of its slot filled
        self.logits: torch.Tensor | None = None  # (1, V): the next token's
        self.prefilled: torch.Tensor | None = None  # (1, V): its prompt's, from a batched prefill
        self.next_token: int | None = None  # sampled, to be fed at the next step
        self.cancelled = False
        self.finish_reason: str | None = None
        self.submitted = time.monotonic()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def emit(self, event: Event) -> None:
        if event.final:
            self.finish_reason = event.finish_reason
            event.prompt_tokens, event.completion_tokens = len(self.prompt_ids), len(self.row.new_ids)
        try:
            self._deliver(event)
        except Exception:  # a listener that is gone must not stop the engine
            log.debug("sequence %d: event not delivered", self.id, exc_info=True)


class Engine:
    """Continuous batching over one model; see the module docstring."""

    def __init__(
        self,
        model: Transformer,
        tokenizer,
        max_concurrent: int = 8,
        max_queue: int = 64,
        context_length: int | None = None,
        max_prefill_tokens: int = 2048,
        prefill_layout: str = "auto",
    ):
        max_len = model.config.max_seq_len
        if not isinstance(max_concurrent, int) or max_concurrent < 1:
            raise ValueError(f"max_concurrent must be an integer >= 1, got {max_concurrent!r}")
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        if isinstance(max_prefill_tokens, bool) or not isinstance(max_prefill_tokens, int) or max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be an integer >= 1, got {max_prefill_tokens!r}")
        if prefill_layout not in PREFILL_LAYOUTS:
            raise ValueError(f"prefill_layout must be one of {', '.join(PREFILL_LAYOUTS)}, got {prefill_layout!r}")
        context_length = max_len if context_length is None else context_length
        if not isinstance(context_length, int) or not 2 <= context_length <= max_len:
            raise ValueError(
                f"context_length must be an integer in [2, {max_len}] (the model's max_seq_len), got {context_length!r}"
            )
        self.model, self.tokenizer = model, tokenizer
        self.max_concurrent, self.max_queue, self.context_length = max_concurrent, max_queue, context_length
        self.max_prefill_tokens, self.prefill_layout = max_prefill_tokens, prefill_layout
        # Norms are never quantized: their weight gives the activations' device and dtype.
        self.device, dtype = model.norm.weight.device, model.norm.weight.dtype
        with torch.inference_mode():  # written only by `step`, which runs in inference mode
            self.cache = SlotCache.allocate(
                model.config, max_concurrent, prefix_len(model) + context_length, self.device, dtype
            )
            self.cache.start = fill_prefix(model, self.cache.k, self.cache.v)
        self.stop_ids = stop_ids_of(tokenizer)
        self._slots: list[Sequence | None] = [None] * max_concurrent
        self._waiting: deque[Sequence] = deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.counts = dict(completed=0, cancelled=0, failed=0, refused=0, generated_tokens=0, steps=0)

    # ------------------------------------------------------------------------------- callers' side

    def submit(self, prompt_ids: list[int], sampling: SamplingConfig, deliver: Callable[[Event], None]) -> Sequence:
        """Queue a request; `deliver` gets its events (from the engine thread). Raises ContextExceeded,
        QueueFull or EngineStopped; nothing is queued then."""
        if not prompt_ids:
            raise ValueError("an empty prompt: give at least one token (e.g. bos) to condition on")
        if len(prompt_ids) >= self.context_length:
            raise ContextExceeded(len(prompt_ids), self.context_length)
        budget = min(sampling.max_new_tokens, self.context_length - len(prompt_ids))
        seq = Sequence(next(self._ids), prompt_ids, sampling, budget, deliver, self.tokenizer, self.device)
        with self._cond:
            if self._stopping:
                raise EngineStopped("the engine is stopping")
            if self._running() + len(self._waiting) >= self.max_concurrent + self.max_queue:
                self.counts["refused"] += 1
                raise QueueFull(
                    f"{self.max_concurrent} sequences are running and {len(self._waiting)} wait "
                    f"(stage.max_concurrent, stage.max_queue): retry later"
                )
            self._waiting.append(seq)
            self._cond.notify_all()
        return seq

    def submit_async(self, prompt_ids: list[int], sampling: SamplingConfig) -> tuple[Sequence, asyncio.Queue[Event]]:
        """`submit` from a running asyncio loop: the events arrive in the returned queue."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def deliver(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is listening
                pass

        return self.submit(prompt_ids, sampling, deliver), queue

    def cancel(self, seq: Sequence) -> None:
        """Stop `seq` (no-op if it has ended): its slot is freed at the next step."""
        if seq.finished:
            return
        with self._cond:
            seq.cancelled = True
            self._cond.notify_all()

    def stats(self) -> dict:
        with self._cond:
            running = self._running()
            return dict(
                running=running,
                queued=len(self._waiting),
                free_slots=self.max_concurrent - running,
                max_concurrent=self.max_concurrent,
                max_queue=self.max_queue,
                context_length=self.context_length,
                **self.counts,
            )

    # ------------------------------------------------------------------------------------- thread

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="llama_zh-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the thread after its current step; every unfinished request gets an error event."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the engine thread did not stop within %s s", timeout)
                return
        self._drain()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._busy():
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # outside any one sequence: fail the running ones, keep serving
                log.exception("engine step failed")
                for seq in [s for s in self._slots if s is not None]:
                    self._fail(seq, e)

    def _busy(self) -> bool:
        return bool(self._waiting) or self._running() > 0

    def _running(self) -> int:
        return sum(s is not None for s in self._slots)

    def _drain(self) -> None:
        with self._cond:
            left = [s for s in self._slots if s is not None] + list(self._waiting)
            self._slots = [None] * self.max_concurrent
            self._waiting.clear()
        for seq in left:
            if not seq.finished:
                seq.emit(Event(finish_reason="error", error="the server is shutting down"))

    # ------------------------------------------------------------------------------------ decoding

    @torch.inference_mode()
    def step(self) -> bool:
        """One round: cancelled sequences leave, queued ones take free slots (prefilled together, up to
        max_prefill_tokens), every running sequence samples a token, and those that go on are decoded
        together. Returns whether work is left.

        Every admitted sequence samples and streams its first token right after the one prefill of the
        round, before any decoding step: a burst of arrivals waits for one forward, not one per prompt."""
        admitted = self._admit()
        self._prefill_together(admitted)
        for seq in admitted:
            self._guarded(seq, self._prefill)
            if seq.logits is not None:  # None: the prefill failed and the sequence has left
                self._guarded(seq, self._sample)
        running = [s for s in self._slots if s is not None and s.logits is not None]
        for seq in running:
            self._guarded(seq, self._sample)
        going = [s for s in self._slots if s is not None and s.next_token is not None]
        if going:
            try:
                self._decode(going)
            except Exception as e:
                log.exception("decoding step failed")
                for seq in going:
                    self._fail(seq, e)
        self.counts["steps"] += 1
        with self._cond:
            return self._busy()

    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        """Drive the engine by hand (no thread) until nothing runs or waits."""
        for _ in range(max_steps):
            if not self.step():
                return
        raise RuntimeError(f"the engine was still busy after {max_steps} steps")

    def _admit(self) -> list[Sequence]:
        cancelled, admitted = [], []
        with self._cond:
            for i, seq in enumerate(self._slots):
                if seq is not None and seq.cancelled:
                    self._slots[i] = None
                    cancelled.append(seq)
            for seq in [s for s in self._waiting if s.cancelled]:
                self._waiting.remove(seq)
                cancelled.append(seq)
            longest = 0
            for i in range(self.max_concurrent):
                if self._slots[i] is None and self._waiting:
                    # Padded to the longest prompt: that is the prefill's work. The first one is taken
                    # whatever its length; the ones that do not fit wait for a later round, in order.
                    length = max(longest, len(self._waiting[0].prompt_ids))
                    if admitted and length * (len(admitted) + 1) > self.max_prefill_tokens:
                        break
                    seq, longest = self._waiting.popleft(), length
                    seq.slot, self._slots[i] = i, seq
                    admitted.append(seq)
        for seq in cancelled:
            self.counts["cancelled"] += 1
            seq.emit(Event(finish_reason="cancelled"))
        return admitted

    def _release(self, seq: Sequence) -> None:
        with self._cond:
            if seq.slot is not None and self._slots[seq.slot] is seq:
                self._slots[seq.slot] = None

    def _guarded(self, seq: Sequence, action: Callable[[Sequence], None]) -> None:
        try:
            action(seq)
        except Exception as e:  # this request fails alone
            log.exception("sequence %d failed", seq.id)
            self._fail(seq, e)

    def _fail(self, seq: Sequence, error: Exception) -> None:
        self._release(seq)
        if not seq.finished:
            self.counts["failed"] += 1
            seq.emit(Event(finish_reason="error", error=f"{type(error).__name__}: {error}"))

    def _prefill_together(self, seqs: list[Sequence]) -> None:
        """Read the prompts of `seqs` in one forward (each sequence's logits wait in `prefilled`). If
        that fails (memory, one bad prompt), each is read alone by `_prefill` and fails alone."""
        for group in rope_groups(self.model.config, [self.cache.start + len(s.prompt_ids) for s in seqs]):
            together = [seqs[i] for i in group]
            if len(together) < 2:
                continue  # read alone by _prefill
            try:
                logits = prefill_step(
                    self.model,
                    self.cache,
                    [s.slot for s in together],
                    [s.prompt_ids for s in together],
                    self.prefill_layout,
                )
            except Exception:
                log.exception("batched prefill of %d prompts failed; reading them one by one", len(together))
                continue
            for i, seq in enumerate(together):
                seq.prefilled = logits[i : i + 1]

    def _prefill(self, seq: Sequence) -> None:
        """Give `seq` its prompt's logits: from the round's batched prefill, or read alone."""
        if seq.prefilled is not None:
            seq.logits, seq.prefilled = seq.prefilled, None
        else:
            ids = torch.tensor([seq.prompt_ids], device=self.device)
            seq.logits = self.model(ids, self.cache.slot(seq.slot), last_only=True)[:, -1]  # (1, V)
        seq.length = self.cache.start + len(seq.prompt_ids)

    def _sample(self, seq: Sequence) -> None:
        cfg = seq.sampling
        generators = [seq.generator] if seq.generator is not None else None
        token = int(sample_next(seq.logits, cfg, generators, seq.history)[0])
        seq.logits, seq.next_token = None, None
        self.counts["generated_tokens"] += 1
        released = seq.row.add(token, self.stop_ids, cfg, self.tokenizer)
        text = seq.deltas.push(released)
        if seq.row.done:
            self._release(seq)
            self.counts["completed"] += 1
            seq.emit(Event(text=text + seq.deltas.finish(), finish_reason=self._finish_reason(seq, token)))
            return
        if text:
            seq.emit(Event(text=text))
        seq.next_token = token
        if seq.history is not None:
            seq.history = torch.cat((seq.history, seq.history.new_tensor([[token]])), dim=1)[
                :, -cfg.repetition_window :
            ]

    def _finish_reason(self, seq: Sequence, last_token: int) -> str:
        """stop: a stop id (eos, end of turn) or a stop string ended it; length: the budget (max
        tokens or the context) did."""
        if last_token in self.stop_ids:
            return "stop"
        stops = seq.sampling.stop_strings
        if stops and earliest_stop(self.tokenizer.decode(seq.row.new_ids), stops) is not None:
            return "stop"
        return "length"

    def _decode(self, seqs: list[Sequence]) -> None:
        for group in rope_groups(self.model.config, [s.length + 1 for s in seqs]):
            together = [seqs[i] for i in group]
            tokens = torch.tensor([s.next_token for s in together], device=self.device)
            positions = [s.length for s in together]
            logits = decode_step(self.model, self.cache, [s.slot for s in together], tokens, positions)
            for i, seq in enumerate(together):
                seq.logits, seq.next_token = logits[i : i + 1], None
                seq.length += 1


@dataclass
class Completion:
    """A finished request gathered from its events (tests, scripts)."""

    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    deltas: list[str] = field(default_factory=list)

    def add(self, event: Event) -> None:
        if event.text:
            self.deltas.append(event.text)
            self.text += event.text
        if event.final:
            self.finish_reason, self.error = event.finish_reason, event.error
            self.prompt_tokens, self.completion_tokens = event.prompt_tokens, event.completion_tokens
