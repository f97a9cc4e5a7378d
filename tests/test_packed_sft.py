"""Packed SFT: examples sharing a sequence are computed as if alone (block-diagonal attention,
positions from 0 in each), so packing changes the speed of SFT, not its losses or gradients."""

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import llama_zh
from tiny_checkpoints import make_checkpoint, tiny_config, train_tokenizer

from llama_zh.data.datasets import IGNORE_INDEX, PackedSFTDataset, SFTDataset, pad_collate
from llama_zh.data.sft import pack_examples
from llama_zh.model import KVCache, build_model, segment_runs
from llama_zh.train.module import CausalLM, OptimConfig

VOCAB = 300
MAX_LEN = 48
PAD = 0


def make_examples(seed: int = 0, n: int = 9) -> list[list[tuple[list[int], bool]]]:
    """Random examples as segments; some start with a trained segment, as a template may render them
    (the first token of an example is then a trained token that nothing in it predicts)."""
    g = torch.Generator().manual_seed(seed)

    def rand(k):
        return torch.randint(1, VOCAB, (k,), generator=g).tolist()

    examples = []
    for i in range(n):
        prompt, answer = rand(3 + (5 * i) % 11), rand(2 + (3 * i) % 7)
        examples.append([([], False), (answer, True)] if i % 4 == 1 else [(prompt, False), (answer, True)])
    return examples


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config(vocab_size=VOCAB, max_seq_len=64), seed=0)


def packed_batch(examples):
    packs = pack_examples(examples, MAX_LEN)
    assert len(packs) < len(examples) and any(len(p) > 2 for p in packs)
    return packs, pad_collate(PAD)([PackedSFTDataset(packs)[i] for i in range(len(packs))])


def test_packs_keep_examples_whole_and_in_order():
    examples = make_examples()
    packs = pack_examples(examples, MAX_LEN)
    assert [ex for pack in packs for ex in pack] == examples
    assert all(sum(len(ids) for ex in pack for ids, _ in ex) <= MAX_LEN + 1 for pack in packs)


def test_packed_labels_are_the_unpacked_ones():
    examples = make_examples()
    packs, batch = packed_batch(examples)
    alone = iter(SFTDataset(examples)[i]["labels"].tolist() for i in range(len(examples)))
    for row, pack in enumerate(packs):
        segments, labels = batch["segment_ids"][row], batch["labels"][row]
        for index in range(len(pack)):
            mine, expected = labels[segments == index].tolist(), next(alone)
            assert mine[: len(expected)] == expected
            # An example's last token predicts nothing (not the next example's first token, trained or not).
            assert mine[len(expected) :] == ([IGNORE_INDEX] if index < len(pack) - 1 else [])
        assert (labels[segments == -1] == IGNORE_INDEX).all()  # padding


def test_segment_runs_restart_positions_at_each_example():
    segments = torch.tensor([[0, 0, 0, 1, 1, 0, 0, -1], [5, 5, 5, 5, 5, 5, 5, 5]])
    runs, positions = segment_runs(segments)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 0], list(range(8))]
    assert runs[0].tolist() == [1, 1, 1, 2, 2, 3, 3, 4]  # a recurring id is another example


def test_each_packed_example_has_the_logits_it_has_alone(model):
    examples = make_examples()
    packs, batch = packed_batch(examples)
    with torch.no_grad():
        packed = model(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])
        derived = model(batch["input_ids"], segment_ids=batch["segment_ids"])  # positions from the segments
        real = batch["segment_ids"] >= 0  # padding's positions are 0 from the collate, 0.. derived
        torch.testing.assert_close(derived[real], packed[real], atol=0, rtol=0)
        for row, pack in enumerate(packs):
            for index, example in enumerate(pack):
                ids = torch.tensor([[t for seg, _ in example for t in seg]])
                alone = model(ids)[0]
                inside = packed[row, batch["segment_ids"][row] == index]
                n = min(len(inside), len(alone))  # the pack's last token is not an input
                assert n >= len(alone) - 1
                torch.testing.assert_close(inside[:n], alone[:n], atol=1e-5, rtol=0)
        # Without the segments the examples see each other: the check above can fail.
        crosstalk = model(batch["input_ids"])
        assert not torch.allclose(crosstalk, packed, atol=1e-3)


@pytest.mark.parametrize("loss_kind", ["chunked", "plain"])
def test_packed_loss_and_gradients_equal_unpacked(model, loss_kind):
    examples = make_examples()
    _, packed = packed_batch(examples)
    unpacked = pad_collate(PAD)([SFTDataset(examples)[i] for i in range(len(examples))])
    assert "segment_ids" not in unpacked
    module = CausalLM(model, OptimConfig(), total_steps=1, loss_kind=loss_kind)

    def loss_and_grads(batch):
        model.zero_grad()
        loss = module.loss(batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_packed, grads_packed = loss_and_grads(packed)
    loss_unpacked, grads_unpacked = loss_and_grads(unpacked)
    model.zero_grad()
    # The same mean over the same trained tokens.
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == int((unpacked["labels"] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss_packed, loss_unpacked, atol=1e-5, rtol=0)
    for name, grad in grads_unpacked.items():
        torch.testing.assert_close(grads_packed[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_default_path_is_plain_causal_attention(model, monkeypatch):
    ids = torch.randint(1, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, attn_mask=None, is_causal=False, **kwargs):
        calls.append((attn_mask, is_causal))
        return sdpa(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        plain = model(ids)
        assert calls and all(mask is None and causal for mask, causal in calls)
        calls.clear()
        one_example = model(
            ids, positions=torch.arange(20).expand(2, 20), segment_ids=torch.ones(2, 20, dtype=torch.long)
        )
        assert calls and all(mask is not None and not causal for mask, causal in calls)
    torch.testing.assert_close(one_example, plain, atol=1e-6, rtol=0)


def test_cache_refuses_packing_inputs(model):
    cache = KVCache.allocate(model.config, 1, 16)
    with pytest.raises(ValueError, match="not with a KV cache"):
        model(torch.ones(1, 4, dtype=torch.long), cache, segment_ids=torch.zeros(1, 4, dtype=torch.long))


def _val_loss(run) -> float:
    with open(run / "metrics.csv") as f:
        values = [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]
    assert values
    return values[-1]


@pytest.mark.slow
def test_sft_cli_with_pack_validates_as_unpacked(tmp_path):
    """Two CLI runs, packed and not, with a learning rate too small to move the weights: the same
    validation examples (split before packing) must give the same token-weighted val/loss."""
    tokenizer = train_tokenizer(tmp_path / "tok")
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", tokenizer)
    records = [
        {
            "instruction": "判断情感",
            "input": f"第{i}本书{'很好' if i % 2 else '太差'}" * (1 + i % 3),
            "output": "正面" if i % 2 else "负面",
        }
        for i in range(40)
    ]
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    losses = {}
    for pack in ("true", "false"):
        run = tmp_path / f"pack_{pack}"
        llama_zh(
            "stage=sft",
            f"stage.checkpoint={ckpt}",
            f"stage.data={data}",
            f"stage.pack={pack}",
            "template=raw",
            "stage.seq_len=64",
            "stage.batch_size=2",
            "stage.val_fraction=0.25",
            "optim.lr=1e-30",
            "optim.weight_decay=0",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "logger=csv",
            "trainer.enable_progress_bar=false",
            run_dir=run,
            env_extra={"LLAMA_ZH_DATA": str(tmp_path / "data")},
        )
        assert (run / "checkpoints" / "final" / "model.safetensors").is_file()
        losses[pack] = _val_loss(run)
    assert math.isfinite(losses["true"])
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-5)
