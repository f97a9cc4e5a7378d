"""Batched prefill: requests admitted together are read in one forward, each still gets its solo
greedy answer (prompts of different lengths, with a prefix too), and max_prefill_tokens splits a
burst into rounds."""

import pytest
import torch
from tiny_checkpoints import make_checkpoint, train_tokenizer

from llama_zh.generate import SamplingConfig, generate
from llama_zh.infer.engine import Completion, Engine
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
    """The prefills (forwards of more than one token) the model runs, with the rows of each."""
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape) if args[0].shape[1] > 1 else None)
    return calls


def run_together(engine, ids, budget=6):
    seqs = [engine.submit(p, greedy(budget), Completion().add) for p in ids]
    engine.step()
    first_round = [s.row.new_ids[:1] for s in seqs]
    engine.run_until_idle()
    return seqs, first_round


@pytest.mark.parametrize("prefix", [False, True])
def test_requests_submitted_together_are_prefilled_in_one_forward(tok, tmp_path, prefix):
    model = build(tok, tmp_path, prefix)
    ids = [tok.encode(p, bos=True) for p in PROMPTS]
    assert len({len(p) for p in ids}) == len(ids)  # every prompt its own length: rows are padded
    solo = [generate(model, p, greedy(6), eos_id=tok.eos_id) for p in ids]
    prefills = count_forwards(model)
    engine = Engine(model, tok, max_concurrent=4)
    seqs, first_round = run_together(engine, ids)
    assert len(prefills) == 1 and prefills[0][0] == len(ids)
    assert [s.row.new_ids for s in seqs] == solo
    assert first_round == [a[:1] for a in solo]  # every first token streamed in the round of the prefill


def test_max_prefill_tokens_splits_a_burst_into_rounds(tok, tmp_path):
    model = build(tok, tmp_path)
    ids = [tok.encode(p, bos=True) for p in PROMPTS]
    longest = max(len(p) for p in ids)
    solo = [generate(model, p, greedy(6), eos_id=tok.eos_id) for p in ids]
    prefills = count_forwards(model)
    engine = Engine(model, tok, max_concurrent=4, max_prefill_tokens=2 * longest)
    seqs, first_round = run_together(engine, ids)
    assert len(prefills) >= 2 and all(rows * length <= 2 * longest for rows, length in prefills)
    assert sum(rows for rows, _ in prefills) == len(ids)
    assert sum(bool(f) for f in first_round) == prefills[0][0] < len(ids)  # the rest waited for a later round
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
