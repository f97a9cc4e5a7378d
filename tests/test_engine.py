"""The continuous-batching engine: answers do not depend on what else runs, slots are freed, text
streams whole characters. The engine is driven step by step (no thread) where arrival order matters."""

import asyncio

import pytest
from serve_models import SPLIT_TEXT, chain_model

from llama_zh.generate import SamplingConfig, generate
from llama_zh.infer import engine as engine_module
from llama_zh.infer.engine import Completion, ContextExceeded, Engine, EngineStopped, QueueFull, TextDeltas

PROMPTS = [
    "你好",
    "这个手机很好用，电池也耐用，屏幕清楚",
    "质量不好",
    "User: 你好\nBot:",
    "价格便宜，物流很快，包装也好",
]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return tiny_checkpoint[1]


def greedy(max_new_tokens=16, **kw):
    return SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens, **kw)


def submit(engine, ids, cfg):
    done = Completion()
    return engine.submit(ids, cfg, done.add), done


@pytest.fixture
def decode_calls(monkeypatch):
    """The (slots, positions) of every batched decoding step, to show which cases a test covered."""
    calls = []
    real = engine_module.decode_step

    def spy(model, cache, slots, tokens, positions):
        calls.append((list(slots), list(positions)))
        return real(model, cache, slots, tokens, positions)

    monkeypatch.setattr(engine_module, "decode_step", spy)
    return calls


def test_staggered_arrivals_give_each_prompt_its_solo_greedy_answer(model, tok, decode_calls):
    ids = [tok.encode(p, bos=True) for p in PROMPTS]
    budgets = [16, 5, 12, 9, 14]  # rows leave at different steps: the slots in use stop being consecutive
    solo = [generate(model, p, greedy(n), tokenizer=tok) for p, n in zip(ids, budgets, strict=False)]

    engine = Engine(model, tok, max_concurrent=3, max_queue=8)
    seqs = []
    for p, n in zip(ids, budgets, strict=False):  # one arrival every other step; the last two queue for a slot
        seqs.append(submit(engine, p, greedy(n))[0])
        engine.step()
        engine.step()
    engine.run_until_idle()

    assert [s.row.new_ids for s in seqs] == solo
    assert all(s.finish_reason == "length" for s in seqs)
    assert engine.stats()["running"] == 0 and engine.stats()["free_slots"] == 3
    # What was exercised: several rows at different positions, and rows in non-consecutive slots.
    assert any(len(set(pos)) > 1 for _, pos in decode_calls)
    assert any(slots != list(range(slots[0], slots[0] + len(slots))) for slots, _ in decode_calls)


def test_seeded_sampling_does_not_depend_on_the_neighbours(model, tok):
    cfg = SamplingConfig(temperature=1.5, top_k=50, top_p=0.95, max_new_tokens=12, seed=7)
    ids = tok.encode(PROMPTS[1], bos=True)
    alone = generate(model, ids, cfg, tokenizer=tok)

    engine = Engine(model, tok, max_concurrent=4)
    submit(engine, tok.encode(PROMPTS[0], bos=True), SamplingConfig(temperature=1.0, max_new_tokens=12, seed=1))
    engine.step()
    seq, _ = submit(engine, ids, cfg)
    submit(engine, tok.encode(PROMPTS[2], bos=True), greedy(12))
    engine.run_until_idle()
    assert seq.row.new_ids == alone

    other = Engine(model, tok, max_concurrent=1)
    again, _ = submit(other, ids, cfg)
    other.run_until_idle()
    assert again.row.new_ids == alone


def test_stop_string_ends_the_answer_before_it(model, tok):
    ids = tok.encode(PROMPTS[0], bos=True)
    full = tok.decode(generate(model, ids, greedy(16), tokenizer=tok))
    stop = full[6:8]
    engine = Engine(model, tok)
    _, done = submit(engine, ids, greedy(16, stop_strings=[stop]))
    engine.run_until_idle()
    assert done.finish_reason == "stop" and done.text == full[: full.index(stop)]
    assert stop not in done.text


def test_cancelled_and_finished_rows_free_their_slots_and_the_queue_is_bounded(model, tok):
    engine = Engine(model, tok, max_concurrent=2, max_queue=1)
    ids = tok.encode(PROMPTS[1], bos=True)
    long, long_done = submit(engine, ids, greedy(40))
    short, short_done = submit(engine, ids, greedy(2))
    waiting, waiting_done = submit(engine, ids, greedy(3))
    with pytest.raises(QueueFull):
        submit(engine, ids, greedy(3))
    engine.step()
    assert engine.stats()["running"] == 2 and engine.stats()["queued"] == 1
    engine.step()  # short ends here: its slot is free at once
    assert short_done.finish_reason == "length" and engine.stats()["free_slots"] == 1
    engine.step()  # the waiting request takes it
    assert waiting.slot is not None and engine.stats()["queued"] == 0

    engine.cancel(long)
    engine.step()
    assert long_done.finish_reason == "cancelled" and long_done.completion_tokens < 40
    assert engine.stats()["cancelled"] == 1
    engine.run_until_idle()
    assert waiting_done.finish_reason == "length" and engine.stats()["free_slots"] == 2
    assert engine.stats()["completed"] == 2 and engine.stats()["refused"] == 1


def test_each_admitted_request_streams_its_first_token_before_the_next_prompt_is_read(model, tok, monkeypatch):
    """Requests that arrive together: each one's first text leaves right after its own prefill share is
    taken (with batched prefill the prompts were read in one forward before that), not after every
    admitted request has been handled; the answers stay the solo ones."""
    order = []
    engine = Engine(model, tok, max_concurrent=3)
    real = engine._prefill
    monkeypatch.setattr(engine, "_prefill", lambda seq: (order.append(("prefill", seq.id)), real(seq)))
    ids = [tok.encode(p, bos=True) for p in PROMPTS[:3]]
    solo = [generate(model, p, greedy(6), tokenizer=tok) for p in ids]
    seqs = [engine.submit(p, greedy(6), lambda e, i=i: order.append(("event", i))) for i, p in enumerate(ids)]
    engine.step()
    first_event = {}
    for n, (kind, who) in enumerate(order):
        if kind == "event":
            first_event.setdefault(who, n)
    prefill_at = {seq_id: n for n, (kind, seq_id) in enumerate(order) if kind == "prefill"}
    for i in range(2):  # the events of request i come before the prefill of request i + 1
        assert first_event[i] < prefill_at[seqs[i + 1].id]
    engine.run_until_idle()
    assert [s.row.new_ids for s in seqs] == solo


def test_prompt_that_fills_the_context_is_refused(model, tok):
    engine = Engine(model, tok, context_length=32)
    with pytest.raises(ContextExceeded):
        engine.submit([1] * 32, greedy(), lambda e: None)
    seq, done = submit(engine, [1] * 28, greedy(16))
    engine.run_until_idle()
    assert done.completion_tokens == 4 and done.finish_reason == "length"  # the context, not max_tokens, ended it


def test_streamed_chinese_never_splits_a_character(tok):
    prompt = tok.encode("价格", bos=True)
    answer = tok.encode(SPLIT_TEXT)
    assert sum(tok.sp.IsByte(i) for i in answer) >= 9  # three characters that are byte tokens only
    model = chain_model(tok, prompt, answer)
    engine = Engine(model, tok)
    _, done = submit(engine, prompt, greedy(40))
    engine.run_until_idle()
    assert done.finish_reason == "stop" and done.completion_tokens == len(answer)  # ended by eos
    assert done.text == tok.decode(answer) == SPLIT_TEXT
    assert all("\ufffd" not in d for d in done.deltas) and len(done.deltas) > 3


def test_text_deltas_hold_back_incomplete_characters(tok):
    ids = tok.encode(SPLIT_TEXT)
    deltas = TextDeltas(tok)
    pieces = [deltas.push([i]) for i in ids] + [deltas.finish()]
    assert "".join(pieces) == SPLIT_TEXT and not any("\ufffd" in p for p in pieces)
    assert pieces.count("") >= 6  # the first two bytes of each byte-encoded character wait


def test_engine_thread_serves_asyncio_callers_and_stops(model, tok):
    engine = Engine(model, tok, max_concurrent=2).start()
    ids = [tok.encode(p, bos=True) for p in PROMPTS[:4]]

    async def one(p):
        seq, events = engine.submit_async(p, greedy(8))
        done = Completion()
        while done.finish_reason is None:
            done.add(await asyncio.wait_for(events.get(), 60))
        return seq.row.new_ids

    async def main():
        return await asyncio.gather(*(one(p) for p in ids))

    try:
        assert asyncio.run(main()) == [generate(model, p, greedy(8), tokenizer=tok) for p in ids]
    finally:
        engine.stop()
    assert not engine.alive
    with pytest.raises(EngineStopped):
        engine.submit(ids[0], greedy(), lambda e: None)


def test_a_failing_request_does_not_stop_the_others(model, tok, monkeypatch):
    engine = Engine(model, tok, max_concurrent=2)
    bad, bad_done = submit(engine, tok.encode(PROMPTS[0], bos=True), greedy(8))
    real = engine._prefill

    def prefill(seq):
        if seq is bad:
            raise RuntimeError("out of memory")
        real(seq)

    monkeypatch.setattr(engine, "_prefill", prefill)
    ids = tok.encode(PROMPTS[2], bos=True)
    good, good_done = submit(engine, ids, greedy(8))
    engine.run_until_idle()
    assert bad_done.finish_reason == "error" and "out of memory" in bad_done.error
    assert good.row.new_ids == generate(model, ids, greedy(8), tokenizer=tok)
    assert engine.stats()["failed"] == 1 and engine.stats()["free_slots"] == 2
