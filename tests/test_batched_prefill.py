"""Batched prefill: requests admitted together are read in one forward (right-padded rows, or packed
end to end in one row), each still gets its solo greedy answer (prompts of different lengths, with a
prefix too), and max_prefill_tokens splits a burst into rounds."""

import pytest
import torch
from helpers import llama_zh
from tiny_checkpoints import make_checkpoint, train_tokenizer

from llama_zh.config import ModelConfig
from llama_zh.generate import SamplingConfig, generate
from llama_zh.infer.engine import Completion, Engine, SlotCache, packing_pays, prefill_step
from llama_zh.prefix import FrozenPrefix, attach_prefix

PROMPTS = ["你好", "这个手机很好用，电池也耐用，屏幕清楚", "质量不好", "价格便宜，物流很快，包装也好"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


def build(tok, tmp_path, prefix=False):
    _, model = make_checkpoint(tmp_path, tok)
    if prefix:
        generator = torch.Generator().manual_seed(3)
        shape = (model.config.n_layers, model.config.n_kv_heads, 3, model.config.head_dim)
        attach_prefix(
            model, FrozenPrefix(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
        )
    return model


def greedy(n):
    return SamplingConfig(temperature=0.0, max_new_tokens=n)


def count_forwards(model):
    """The prefills (forwards of more than one token, or of one row holding several prompts) the
    model runs: the ids' shape and the cache's slots of each."""
    calls = []

    def record(module, args, out):
        ids, cache = args[0], args[1] if len(args) > 1 else None
        slots = getattr(cache, "slots", None)
        slots = slots.numel() if isinstance(slots, torch.Tensor) else len(set(cache.slot_of.tolist()))
        if ids.shape[1] > 1:
            calls.append((ids.shape, slots))

    model.register_forward_hook(record)
    return calls


def run_together(engine, ids, budget=6):
    seqs = [engine.submit(p, greedy(budget), Completion().add) for p in ids]
    engine.step()
    first_round = [s.row.new_ids[:1] for s in seqs]
    engine.run_until_idle()
    return seqs, first_round


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("prefix", [False, True])
def test_requests_submitted_together_are_prefilled_in_one_forward(tok, tmp_path, prefix, layout):
    model = build(tok, tmp_path, prefix)
    ids = [tok.encode(p, bos=True) for p in PROMPTS]
    assert len({len(p) for p in ids}) == len(ids)  # every prompt its own length: rows are padded
    solo = [generate(model, p, greedy(6), eos_id=tok.eos_id) for p in ids]
    prefills = count_forwards(model)
    engine = Engine(model, tok, max_concurrent=4, prefill_layout=layout)
    seqs, first_round = run_together(engine, ids)
    assert len(prefills) == 1 and prefills[0][1] == len(ids)
    expected = (1, sum(map(len, ids))) if layout == "packed" else (len(ids), max(map(len, ids)))
    assert tuple(prefills[0][0]) == expected
    assert [s.row.new_ids for s in seqs] == solo
    assert first_round == [a[:1] for a in solo]  # every first token streamed in the round of the prefill


def test_max_prefill_tokens_splits_a_burst_into_rounds(tok, tmp_path):
    model = build(tok, tmp_path)
    ids = [tok.encode(p, bos=True) for p in PROMPTS]
    longest = max(len(p) for p in ids)
    solo = [generate(model, p, greedy(6), eos_id=tok.eos_id) for p in ids]
    prefills = count_forwards(model)
    engine = Engine(model, tok, max_concurrent=4, max_prefill_tokens=2 * longest, prefill_layout="padded")
    seqs, first_round = run_together(engine, ids)
    assert len(prefills) >= 2 and all(rows * length <= 2 * longest for (rows, length), _ in prefills)
    assert sum(rows for _, rows in prefills) == len(ids)
    assert sum(bool(f) for f in first_round) == prefills[0][1] < len(ids)  # the rest waited for a later round
    assert [s.row.new_ids for s in seqs] == solo


def test_a_prompt_longer_than_the_budget_is_still_read(tok, tmp_path):
    model = build(tok, tmp_path)
    ids = [tok.encode(p, bos=True) for p in PROMPTS[:2]]
    solo = [generate(model, p, greedy(4), eos_id=tok.eos_id) for p in ids]
    engine = Engine(model, tok, max_concurrent=2, max_prefill_tokens=1)
    seqs, _ = run_together(engine, ids, budget=4)
    assert [s.row.new_ids for s in seqs] == solo


def test_max_prefill_tokens_must_be_positive(tok, tmp_path):
    model = build(tok, tmp_path)
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        Engine(model, tok, max_prefill_tokens=0)


@pytest.mark.parametrize("prefix", [False, True])
def test_packed_prefill_fills_each_slot_as_a_lone_prefill_does(tok, tmp_path, prefix):
    """The keys and values a packed row writes into each slot, and each prompt's next-token logits,
    equal those of the prompt read alone into its slot (another slot order than the prompts')."""
    model = build(tok, tmp_path, prefix)
    from llama_zh.prefix import fill_prefix

    ids = [tok.encode(p, bos=True) for p in PROMPTS]
    slots = [2, 0, 3, 1]
    with torch.inference_mode():
        packed, alone = (SlotCache.allocate(model.config, 4, 64) for _ in range(2))
        packed.start = fill_prefix(model, packed.k, packed.v)
        alone.start = fill_prefix(model, alone.k, alone.v)
        logits = prefill_step(model, packed, slots, ids, layout="packed")
        for i, (slot, p) in enumerate(zip(slots, ids, strict=True)):
            own = model(torch.tensor([p]), alone.slot(slot), last_only=True)[:, -1]
            torch.testing.assert_close(logits[i : i + 1], own, rtol=1e-4, atol=1e-4)
            end = alone.start + len(p)
            torch.testing.assert_close(packed.k[:, slot, :, :end], alone.k[:, slot, :, :end], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(packed.v[:, slot, :, :end], alone.v[:, slot, :, :end], rtol=1e-5, atol=1e-5)
            assert not packed.k[:, slot, :, end:].any()  # nothing written past the prompt


def test_packing_pays_for_short_prompts_of_different_lengths_only():
    config = ModelConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, ffn_dim=2048)
    assert packing_pays(config, [8, 23, 12, 15, 9, 20])  # padding would be a third of the work
    assert not packing_pays(config, [20, 20, 20, 20])  # nothing to save, the wider attention to pay
    assert not packing_pays(config, [2000, 1500, 1800])  # the row's attention outgrows the saved padding


def test_unknown_prefill_layout_is_refused(tok, tmp_path):
    model = build(tok, tmp_path)
    with pytest.raises(ValueError, match="prefill_layout"):
        Engine(model, tok, prefill_layout="diagonal")
    result = llama_zh(
        "stage=serve",
        f"stage.checkpoint={tmp_path}",
        "stage.prefill_layout=diagonal",
        "stage.port=0",
        check=False,
        run_dir=tmp_path / "run",
    )
    assert result.returncode != 0
    assert "stage.prefill_layout=diagonal: expected one of auto, packed, padded" in result.stderr


def logits_per_step(engine, ids, budget=6):
    """Each request's next-token logits at every step, submitted together to `engine`."""
    seen = {}
    sample = engine._sample

    def record(seq):
        seen.setdefault(seq.id, []).append(seq.logits.clone())
        sample(seq)

    engine._sample = record
    seqs = [engine.submit(p, greedy(budget), Completion().add) for p in ids]
    engine.run_until_idle()
    return [torch.cat(seen[s.id]) for s in seqs]


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_dynamic_rope_rows_past_the_original_context_get_their_solo_logits(tok, tmp_path, layout):
    """Dynamic RoPE's tables depend on the length they cover and a forward's rows share one table (its
    longest row's): a row is read and decoded only with rows whose tables are its own, so every
    step's logits are those of the request alone (its greedy answer too, whatever the margins)."""
    scaling = {"type": "dynamic", "factor": 32.0, "original_max_position_embeddings": 8}
    _, model = make_checkpoint(tmp_path, tok, sharpen=1.0, rope_scaling=scaling, max_seq_len=64)
    prompts = ["你好", "质量", PROMPTS[1], PROMPTS[3]]  # two within 8 tokens, two past them
    ids = [tok.encode(p, bos=True) for p in prompts]
    assert sorted(len(p) > 8 for p in ids) == [False, False, True, True]
    alone = [logits_per_step(Engine(model, tok, max_concurrent=1), [p])[0] for p in ids]
    together = logits_per_step(Engine(model, tok, max_concurrent=4, prefill_layout=layout), ids)
    for own, batched in zip(alone, together, strict=True):
        torch.testing.assert_close(batched, own, rtol=0, atol=2e-5)
