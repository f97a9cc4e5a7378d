"""Eval tasks on hand-checked cases: sliding-window and per-document perplexity, continuation scores,
multiple choice by letters and by option texts, classification by label likelihood, exact match and
character ROUGE-L, progress reporting, and stage=eval end to end (protocol record, sweep table)."""

import io
import json
import math
import random
import re

import numpy as np
import pytest
import torch
from helpers import llama_zh
from tiny_checkpoints import make_checkpoint

from llama_zh.config import ConfigError, ModelConfig, from_mapping
from llama_zh.data.corpus import DataError
from llama_zh.data.prepare import DataConfig, prepare_tokens
from llama_zh.data.sft import Template
from llama_zh.eval.instructions import (
    evaluate_classification,
    evaluate_generation,
    exact_match,
    lcs_length,
    read_instruction_records,
    rouge_l_chars,
)
from llama_zh.eval.multiple_choice import (
    Question,
    build_prompt,
    check_scoring,
    evaluate_multiple_choice,
    letter_ids,
    read_questions,
)
from llama_zh.eval.perplexity import (
    document_nlls,
    perplexity,
    rolling_perplexity,
    source_perplexities,
    stream_nll,
    window_spans,
)
from llama_zh.eval.progress import Progress
from llama_zh.eval.report import comparison_table, markdown_table, result_metrics
from llama_zh.eval.scoring import continuation_logprobs, row_continuation_logprobs
from llama_zh.generate import SamplingConfig
from llama_zh.model import build_model

# The prompt is the instruction (and input on the next line) as is.
RAW = Template(
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}"
    "{% else %}{% generation %}{{ m.content + eos_token }}{% endgeneration %}{% endif %}{% endfor %}"
)


class BigramLM(torch.nn.Module):
    """logits[t] = table[token t]: the next token depends on the current one only, so every score can be
    worked out from the table by hand, whatever the window, batch or padding."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.as_tensor(table, dtype=torch.float32)  # (V, V) logits
        V = self.table.shape[0]
        self.config = ModelConfig(vocab_size=V, dim=8, n_layers=1, n_heads=1, ffn_dim=8, max_seq_len=64)
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, ids, cache=None, last_only=False):
        if cache is not None:
            cache.pos += ids.shape[1]
        return self.table[ids[:, -1:] if last_only else ids]

    def logp(self, prev, nxt):
        return float(self.table[prev].log_softmax(-1)[nxt])


def tiny_real_model(vocab=300, seed=0, max_seq_len=64):
    return build_model(
        ModelConfig(
            vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=max_seq_len
        ),
        seed=seed,
    ).eval()


# ------------------------------------------------------------------------------------------ perplexity


def test_window_spans_by_hand():
    # 11 tokens: targets 1..10. Windows of 4 every 2: (0: targets 1-4), (2: 3-6, 3 and 4 done), ...
    assert window_spans(11, 4, 2) == [(0, 0), (2, 2), (4, 2), (6, 2)]
    # Back to back, the last window aligned to the end: targets 6-9, of which 6-8 were scored.
    assert window_spans(10, 4, 4) == [(0, 0), (4, 0), (5, 3)]
    assert window_spans(4, 8, 8) == [(0, 0)] and window_spans(1, 8, 8) == []
    with pytest.raises(ValueError, match="stride"):
        window_spans(10, 4, 5)


def test_window_spans_score_every_target_once():
    rng = random.Random(0)
    for _ in range(300):
        n, window = rng.randrange(2, 60), rng.randrange(1, 20)
        stride = rng.randrange(1, window + 1)
        scored = []
        for begin, skip in window_spans(n, window, stride):
            width = min(window, n - 1)
            assert 0 <= begin and begin + width <= n - 1
            scored += list(range(begin + 1 + skip, begin + width + 1))
        assert scored == list(range(1, n)), (n, window, stride)


def test_perplexity_of_a_bigram_model_by_hand():
    # P(next | prev) from logits: after 0, token 1 has logit ln 3 (p = 3/5 of {1, 1, 3}); etc.
    table = [[0.0, math.log(3), 0.0], [math.log(2), 0.0, math.log(2)], [0.0, 0.0, 0.0]]
    model = BigramLM(table)
    tokens = np.array([0, 1, 2, 0, 1, 0], dtype=np.uint16)
    # -log P: 0->1: 3/5, 1->2: 2/5, 2->0: 1/3, 0->1: 3/5, 1->0: 2/5
    expected = -(math.log(3 / 5) * 2 + math.log(2 / 5) * 2 + math.log(1 / 3))
    for window, stride in ((5, 5), (2, 1), (3, 2), (4, 4)):
        nll, n = stream_nll(model, tokens, window, stride, batch_size=2)
        assert n == 5 and nll == pytest.approx(expected, rel=1e-6)
    r = perplexity(model, [tokens, tokens[:3]], window=2)
    extra = -(math.log(3 / 5) + math.log(2 / 5))  # the second stream: 0->1, 1->2
    assert r["tokens"] == 7 and r["loss"] == pytest.approx((expected + extra) / 7, rel=1e-6)
    assert r["ppl"] == pytest.approx(math.exp(r["loss"]))


def test_sliding_window_gives_each_token_its_context():
    model = tiny_real_model()
    tokens = np.random.default_rng(0).integers(3, 300, 30).astype(np.uint16)
    window, stride = 8, 3
    expected = 0.0
    with torch.no_grad():
        for begin, skip in window_spans(30, window, stride):
            x = torch.tensor(tokens[begin : begin + window + 1].astype(np.int64))[None]
            logp = model(x[:, :-1])[0].log_softmax(-1)
            for t in range(skip, window):
                expected -= float(logp[t, x[0, t + 1]])
    nll, n = stream_nll(model, tokens, window, stride, batch_size=3)
    assert n == 29 and nll == pytest.approx(expected, rel=1e-5)


def test_sources_accept_a_path_or_a_list_of_shards(tmp_path):
    model = BigramLM([[0.0, 1.0], [1.0, 0.0]])
    shards = {
        name: np.array(t, dtype=np.uint16)
        for name, t in {"a.bin": [0, 1, 0, 1], "b0.bin": [1, 1], "b1.bin": [0, 0, 1]}.items()
    }

    def load(path):
        return shards[path.name]

    results = source_perplexities(
        model, {"a": tmp_path / "a.bin", "b": [tmp_path / "b0.bin", tmp_path / "b1.bin"]}, load, window=2
    )
    assert results["a"]["tokens"] == 3 and results["b"]["tokens"] == 1 + 2 and results["all"]["tokens"] == 6
    p_same, p_diff = 1 / (1 + math.e), math.e / (1 + math.e)  # logit 1 on the other token
    assert results["a"]["loss"] == pytest.approx(-math.log(p_diff))
    assert results["b"]["loss"] == pytest.approx(-(2 * math.log(p_same) + math.log(p_diff)) / 3)
    assert results["all"]["loss"] == pytest.approx((3 * results["a"]["loss"] + 3 * results["b"]["loss"]) / 6)


# ------------------------------------------------------------------------------------ continuation scores


def test_continuation_logprobs_by_hand():
    table = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    model = BigramLM(table)
    prompts = [[1, 3], [1, 4, 4, 5], [2]]
    conts = [[3], [4, 2], [5, 5, 0]]
    got = continuation_logprobs(model, prompts, conts)
    for b, p in enumerate(prompts):
        for n, c in enumerate(conts):
            seq = [p[-1]] + c
            expected = sum(model.logp(a, z) for a, z in zip(seq, seq[1:], strict=False))
            assert float(got[b, n]) == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_continuation_logprobs_batched_equals_full_forward():
    model = tiny_real_model()
    prompts = [[1, 17, 42, 99, 5], [1], list(range(3, 40)), [1, 250, 7]]
    conts = [[8], [9, 10, 11], [2, 2]]
    got = continuation_logprobs(model, prompts, conts)
    with torch.no_grad():
        for b, p in enumerate(prompts):
            for n, c in enumerate(conts):
                logp = model(torch.tensor([p + c[:-1]]))[0].log_softmax(-1)
                expected = sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(c))
                assert float(got[b, n]) == pytest.approx(expected, abs=1e-4)


def test_continuation_logprobs_chunks_a_long_prompt(monkeypatch):
    from llama_zh.eval import scoring

    model = tiny_real_model()
    prompts = [list(range(3, 50)), list(range(10, 20))]
    whole = continuation_logprobs(model, prompts, [[5], [6, 7]])
    monkeypatch.setattr(scoring, "LOGIT_BUDGET", 10)  # chunks of 5 positions for 2 rows
    torch.testing.assert_close(continuation_logprobs(model, prompts, [[5], [6, 7]]), whole, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------- multiple choice

CEVAL = """id,question,A,B,C,D,answer
0,1+1等于几？,1,2,3,4,B
1,中国的首都是哪里？,上海,广州,北京,深圳,C
2,"水的化学式是
哪一个？",H2O,CO2,O2,NaCl,A
"""


def test_read_questions_and_prompt_format(tmp_path):
    path = tmp_path / "val.csv"
    path.write_text(CEVAL, encoding="utf-8")
    qs = read_questions(path)
    assert [q.answer for q in qs] == ["B", "C", "A"] and qs[2].question == "水的化学式是\n哪一个？"
    zero = build_prompt(qs[0], [], "数学")
    assert (
        zero
        == "以下是中国关于数学考试的单项选择题，请选出其中的正确答案。\n\n1+1等于几？\nA. 1\nB. 2\nC. 3\nD. 4\n答案："
    )
    one = build_prompt(qs[1], [qs[0]])
    assert one == (
        "以下是单项选择题，请选出其中的正确答案。\n\n1+1等于几？\nA. 1\nB. 2\nC. 3\nD. 4\n答案：B\n\n"
        "中国的首都是哪里？\nA. 上海\nB. 广州\nC. 北京\nD. 深圳\n答案："
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("id,question,A,B,C,answer\n0,q,a,b,c,A\n", r"missing column\(s\) D;"),
        ("id,question,A,B,C,D\n0,q,a,b,c,d\n", r"missing column\(s\) answer;"),
        (
            "id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n1,q,a,b,c,d,E\n",
            r"val.csv:3: answer 'E' is not one of A, B, C, D",
        ),
        ("id,question,A,B,C,D,answer\n0,q,a,b,c,d\n", r"val.csv:2: fewer fields"),
        ("id,question,A,B,C,D,answer\n", "no questions"),
    ],
)
def test_bad_ceval_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "val.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_questions(path)


def test_letters_are_the_tokens_after_the_prompt(tok):
    prompt = "1+1等于几？\nA. 1\nB. 2\nC. 3\nD. 4\n答案："
    ids = tok.encode(prompt, bos=True)
    letters = letter_ids(tok, prompt, ids)
    assert [tok.sp.IdToPiece(i) for i in letters] == ["A", "B", "C", "D"]


def test_multiple_choice_by_hand(tok, tmp_path):
    path = tmp_path / "val.csv"
    path.write_text(CEVAL, encoding="utf-8")
    qs = read_questions(path)
    b = tok.sp.PieceToId("B")
    table = torch.zeros(tok.vocab_size, tok.vocab_size)
    table[:, b] = 5.0  # whatever the prompt, B is the likeliest next token
    result = evaluate_multiple_choice(BigramLM(table), tok, qs, batch_size=2)
    assert [p["predicted"] for p in result["predictions"]] == ["B", "B", "B"]
    assert (result["correct"], result["n"]) == (1, 3) and result["accuracy"] == pytest.approx(1 / 3)


def test_multiple_choice_batched_equals_one_by_one(tok, tmp_path):
    path = tmp_path / "val.csv"
    path.write_text(CEVAL, encoding="utf-8")
    qs = read_questions(path)
    model = tiny_real_model(vocab=tok.vocab_size, max_seq_len=256)
    batched = evaluate_multiple_choice(model, tok, qs[1:], shots=qs[:1], batch_size=4)
    expected = []
    with torch.no_grad():
        for q in qs[1:]:
            prompt = build_prompt(q, qs[:1])
            ids = tok.encode(prompt, bos=True)
            logits = model(torch.tensor([ids]))[0, -1]
            expected.append("ABCD"[int(logits[letter_ids(tok, prompt, ids)].argmax())])
    assert [p["predicted"] for p in batched["predictions"]] == expected


# ----------------------------------------------------------------------------------------- classification


def sentiment_records():
    return [
        {"instruction": "情感？", "input": text, "output": label}
        for text, label in [("很好", "正面"), ("太差", "负面"), ("不错", "正面"), ("失望", "负面"), ("推荐", "正面")]
    ]


def test_classification_by_label_likelihood_by_hand(tok):
    records = sentiment_records()
    pos, neg = tok.encode("正面", eos=True), tok.encode("负面", eos=True)
    assert pos != neg
    k = next(
        i for i, (a, b) in enumerate(zip(pos, neg, strict=False)) if a != b
    )  # both may start with the same "▁" piece
    assert k > 0 and pos[:k] == neg[:k]
    table = torch.zeros(tok.vocab_size, tok.vocab_size)
    # Where the labels part (正 vs 负 after their shared prefix), 正 scores 2 and 负 1; all else is uniform.
    table[pos[k - 1], pos[k]] = 2.0
    table[neg[k - 1], neg[k]] = 1.0
    model = BigramLM(table)
    result = evaluate_classification(model, tok, records, RAW, batch_size=2)
    assert result["labels"] == ["正面", "负面"]
    assert (result["correct"], result["n"]) == (3, 5) and result["accuracy"] == pytest.approx(0.6)
    assert result["confusion"] == {"正面": {"正面": 3}, "负面": {"正面": 2}}
    # The scores themselves: log P(label + eos | prompt), summed token by token from the table.
    prompt = tok.encode(RAW.format("情感？", "很好"), bos=True)
    scores = continuation_logprobs(model, [prompt], [pos, neg])[0]
    for label, score in zip((pos, neg), scores, strict=False):
        seq = [prompt[-1]] + label
        assert float(score) == pytest.approx(
            sum(model.logp(a, z) for a, z in zip(seq, seq[1:], strict=False)), abs=1e-5
        )
    flipped = evaluate_classification(model, tok, records, RAW, labels=["负面", "正面"])
    assert flipped["accuracy"] == pytest.approx(0.6)  # the label order does not matter


def test_classification_refuses_bad_label_sets(tok, tmp_path):
    records = sentiment_records()
    with pytest.raises(DataError, match="at least 2 labels"):
        evaluate_classification(BigramLM(torch.zeros(4, 4)), tok, records[:1], RAW)
    with pytest.raises(DataError, match="not among the labels"):
        evaluate_classification(BigramLM(torch.zeros(4, 4)), tok, records, RAW, labels=["正面", "中性"])
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]))
    with pytest.raises(DataError, match="no Alpaca records"):
        read_instruction_records(conv)


# ---------------------------------------------------------------------------------- exact match, ROUGE-L


def test_lcs_and_rouge_l_by_hand():
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # BCBA
    assert lcs_length("", "abc") == 0 and lcs_length("abc", "abc") == 3
    assert rouge_l_chars("今天天气很好", "今天天气不错") == pytest.approx(2 * (4 / 6) * (4 / 6) / (8 / 6))  # 2/3
    assert rouge_l_chars("正面", "正面") == 1.0 and rouge_l_chars("负面", "正面") == pytest.approx(0.5)
    assert rouge_l_chars("正 面\n", "正面") == 1.0  # whitespace does not count
    # P = 2/2, R = 2/4: F = 2 * 1 * 0.5 / 1.5
    assert rouge_l_chars("北京", "北京大学") == pytest.approx(2 / 3)
    assert rouge_l_chars("", "") == 1.0 and rouge_l_chars("x", "") == 0.0 and rouge_l_chars("ab", "cd") == 0.0
    assert exact_match(" 正面\n", "正面") and not exact_match("正面。", "正面")


class FixedAnswerLM(torch.nn.Module):
    """Greedy decoding yields `answer` then eos, whatever the prompt."""

    def __init__(self, answer, vocab_size, eos=2):
        super().__init__()
        self.script = list(answer) + [eos]
        self.config = ModelConfig(vocab_size=vocab_size, dim=8, n_layers=1, n_heads=1, ffn_dim=8, max_seq_len=128)
        self.norm = torch.nn.LayerNorm(8)
        self.prompt_len = None

    def forward(self, ids, cache, last_only=False):
        if cache.pos == 0:
            self.prompt_len = ids.shape[1]
        step = cache.pos + ids.shape[1] - self.prompt_len
        cache.pos += ids.shape[1]
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.config.vocab_size)
        logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 10.0
        return logits


def test_generation_metrics_by_hand(tok):
    records = sentiment_records()
    model = FixedAnswerLM(tok.encode("正面"), tok.vocab_size)
    result = evaluate_generation(
        model,
        tok,
        records + [{"instruction": "x", "output": " "}],
        RAW,
        SamplingConfig(temperature=0, max_new_tokens=8),
        batch_size=2,
    )
    assert result["n"] == 5  # the record without a reference is skipped
    assert result["exact_match"] == pytest.approx(3 / 5)
    assert result["rouge_l"] == pytest.approx((3 * 1.0 + 2 * 0.5) / 5)  # 负面 vs 正面 share 面
    assert all(e["answer"] == "正面" for e in result["examples"])


# --------------------------------------------------------------------------------------------- reports


def test_comparison_table_ratios_to_none():
    jobs = [
        {
            "job": 0,
            "overrides": ["stage=eval", "quant=none"],
            "others": "stage=eval",
            "metrics": {"quant": "none", "mc/accuracy": 0.5, "weight_mib": 100.0, "decode_tokens_per_s": 50.0},
        },
        {
            "job": 1,
            "overrides": ["stage=eval", "quant=int8"],
            "others": "stage=eval",
            "metrics": {"quant": "int8", "mc/accuracy": 0.45, "weight_mib": 30.0, "decode_tokens_per_s": 10.0},
        },
    ]
    columns, rows = comparison_table(jobs)
    assert columns == [
        "job",
        "overrides",
        "quant",
        "mc acc",
        "weight MiB",
        "weight / none",
        "decode tok/s",
        "tok/s / none",
    ]
    assert rows[1] == [1, "quant=int8", "int8", 0.45, 30.0, 0.3, 10.0, 0.2]
    table = markdown_table(columns, rows)
    assert table.splitlines()[3].startswith("| 1   | quant=int8 | int8  | 0.45") and table.count("\n") == 3


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_eval_sweep_over_quant_ends_with_one_comparison_table(tok, tmp_path):
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", tok, sharpen=1.0, dim=128, ffn_dim=256, max_seq_len=256)
    val = tmp_path / "val.csv"
    val.write_text(CEVAL, encoding="utf-8")
    sweep = tmp_path / "sweep"
    llama_zh(
        "--multirun",
        "stage=eval",
        "quant=none,int8,nf4",
        f"stage.checkpoint={ckpt}",
        "stage.tasks=[mc,classification,generation]",
        f"stage.mc.file={val}",
        f"stage.mc.dev_file={val}",
        "stage.mc.shots=1",
        "stage.classification.max_records=40",
        "stage.generation.max_records=8",
        "stage.generation.max_new_tokens=4",
        "stage.speed_probe_tokens=8",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.sweep.dir={sweep}",
        "logger=csv",
    )
    text = (sweep / "comparison.md").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(lines) == 4, text  # header + none, int8, nf4
    assert [line.split("|")[3].strip() for line in lines[1:]] == ["none", "int8", "nf4"]
    for column in ("mc acc", "cls acc", "EM", "ROUGE-L", "weight MiB", "weight / none", "decode tok/s", "tok/s / none"):
        assert column in lines[0]
    rows = json.loads((sweep / "comparison.json").read_text())["rows"]
    weight_ratio = [r[-3] for r in rows]
    assert weight_ratio[0] == 1.0 and weight_ratio[2] < weight_ratio[1] < 0.8  # nf4 < int8 < none
    report = json.loads((sweep / "1" / "eval_results.json").read_text())
    assert report["quant"]["method"] == "int8" and report["mc"]["n"] == 3 and report["mc"]["shots"] == 1
    assert report["classification"]["n"] == 40 and report["classification"]["labels"] == ["正面", "负面"]
    assert (sweep / "1" / "eval_results.md").is_file()


def test_max_records_spreads_over_a_sorted_file():
    from llama_zh.eval.instructions import spread

    assert spread(list(range(10)), 4) == [0, 2, 5, 7]
    assert spread(list(range(3)), 5) == [0, 1, 2] and spread(list(range(3)), None) == [0, 1, 2]


# ----------------------------------------------------------------------- per-document (rolling) perplexity


def rolling_reference(model, doc, window):
    """-log P of each token of `doc` (bos first) computed one token at a time: token j is predicted from
    the window that holds it, windows of `window` back to back, the last one ending at the document's
    end (lm-eval's rolling windows), by a plain forward pass over exactly that window's inputs up to j."""
    n, nll = len(doc), 0.0
    with torch.no_grad():
        for j in range(1, n):
            start = (j - 1) // window * window
            start = min(start, max(0, n - 1 - window))  # the last window is full, aligned to the end
            context = torch.tensor([doc[start:j]])
            nll -= float(model(context)[0, -1].log_softmax(-1)[doc[j]])
    return nll


def test_rolling_perplexity_equals_a_token_by_token_reference():
    model = tiny_real_model(max_seq_len=64)
    rng = np.random.default_rng(1)
    window = 8
    # One document far longer than the window (a partial last window), others shorter than it or just
    # over, batched together so that short windows are padded next to full ones.
    docs = [[1] + rng.integers(3, 300, n).tolist() for n in (45, 4, 12, 8, 1)]
    got = document_nlls(model, docs, window, batch_size=3)
    for doc, (nll, count) in zip(docs, got, strict=False):
        assert count == len(doc) - 1
        assert nll == pytest.approx(rolling_reference(model, doc, window), rel=1e-5, abs=1e-5)
    # A document scored alone ignores the others: the same as a batch of one.
    assert document_nlls(model, docs[:1], window, batch_size=1)[0][0] == pytest.approx(got[0][0], rel=1e-6)


def test_rolling_perplexity_reports_bits_per_byte_and_word_perplexity(tok):
    model = tiny_real_model(vocab=tok.vocab_size, max_seq_len=64)
    texts = ["这本书的内容很好，值得一读。 推荐给大家 second part", "质量太差了", "   "]
    r = rolling_perplexity(model, tok, texts, window=8, batch_size=2)
    docs = [tok.encode(t, bos=True) for t in texts[:2]]  # the blank text is no document
    nll = sum(rolling_reference(model, d, 8) for d in docs)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts[:2])
    words = sum(len(re.split(r"\s+", t)) for t in texts[:2])
    assert (r["documents"], r["tokens"], r["bytes"], r["words"]) == (2, sum(len(d) - 1 for d in docs), n_bytes, words)
    assert r["bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-5)
    assert r["byte_perplexity"] == pytest.approx(math.exp(nll / n_bytes), rel=1e-5)
    assert r["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-5)
    assert r["token_perplexity"] == pytest.approx(math.exp(nll / r["tokens"]), rel=1e-5)


# ----------------------------------------------------------------------------- multiple choice by option text


class CharTokenizer:
    """One token per character, bos 1: an option's tokens are its characters, so the scores can be
    summed by hand from a bigram table."""

    def __init__(self, text):
        self.ids = {c: i + 3 for i, c in enumerate(sorted(set(text)))}
        self.vocab_size, self.bos_id, self.eos_id = len(self.ids) + 3, 1, 2

    def encode(self, text, bos=False, eos=False):
        return [1] * bos + [self.ids[c] for c in text] + [2] * eos


def test_option_scoring_acc_and_acc_norm_by_hand():
    q1 = Question("1", "问", ("好好好好", "坏", "差", "错"), "A", "t.csv:2")
    q2 = Question("2", "水", ("H2O", "水", "差", "错"), "B", "t.csv:3")
    tok = CharTokenizer("".join(build_prompt(q, [], scoring="option") + "".join(q.options) for q in (q1, q2)))
    i = tok.ids
    table = torch.zeros(tok.vocab_size, tok.vocab_size)
    table[:, i["差"]] = table[:, i["错"]] = -5.0  # the distractors are unlikely everywhere
    table[i["："], i["好"]], table[i["好"], i["好"]], table[i["："], i["坏"]] = 1.0, 4.0, 2.5
    table[i["："], i["H"]], table[i["H"], i["2"]], table[i["2"], i["O"]] = 2.0, 5.0, 5.0
    table[i["："], i["水"]] = 3.0
    model = BigramLM(table)

    def by_hand(q, text):  # log P(text | prompt), the chain from the prompt's last character
        chain = [tok.ids["："]] + tok.encode(text)
        return sum(model.logp(a, z) for a, z in zip(chain, chain[1:], strict=False))

    result = evaluate_multiple_choice(model, tok, [q1, q2], batch_size=2, scoring="option")
    for q, pred in zip((q1, q2), result["predictions"], strict=False):
        assert pred["loglikelihood"] == pytest.approx([by_hand(q, t) for t in q.options], abs=1e-5)
    sums = {q.id: [by_hand(q, t) for t in q.options] for q in (q1, q2)}
    # q1: the one-token 坏 has the highest sum, 好好好好 the highest per character.
    assert max(range(4), key=sums["1"].__getitem__) == 1
    assert max(range(4), key=lambda k: sums["1"][k] / len(q1.options[k])) == 0
    # q2: 水 has the highest sum; per character H2O (3 characters) wins, per UTF-8 byte 水 (3 bytes) does.
    assert max(range(4), key=sums["2"].__getitem__) == 1
    assert max(range(4), key=lambda k: sums["2"][k] / len(q2.options[k])) == 0
    assert max(range(4), key=lambda k: sums["2"][k] / len(q2.options[k].encode())) == 1
    p1, p2 = result["predictions"]
    assert (p1["predicted"], p1["predicted_norm"], p1["predicted_norm_bytes"]) == ("B", "A", "A")
    assert (p2["predicted"], p2["predicted_norm"], p2["predicted_norm_bytes"]) == ("B", "A", "B")
    assert result["acc"] == result["accuracy"] == pytest.approx(0.5) and result["correct"] == 1
    assert result["acc_norm"] == pytest.approx(0.5) and result["acc_norm_bytes"] == pytest.approx(1.0)
    assert result["scoring"] == "option"


def test_option_scoring_equals_a_plain_forward_pass(tok, tmp_path):
    path = tmp_path / "val.csv"
    path.write_text(CEVAL, encoding="utf-8")
    qs = read_questions(path)
    model = tiny_real_model(vocab=tok.vocab_size, max_seq_len=256)
    result = evaluate_multiple_choice(model, tok, qs[1:], shots=qs[:1], batch_size=4, scoring="option")
    with torch.no_grad():
        for q, pred in zip(qs[1:], result["predictions"], strict=False):
            prompt = build_prompt(q, qs[:1], scoring="option")
            assert prompt.endswith(q.question + "\n答案：") and "A. " not in prompt  # options are not listed
            ids = tok.encode(prompt, bos=True)
            expected = []
            for text in q.options:
                whole = tok.encode(prompt + text, bos=True)
                assert whole[: len(ids)] == ids
                cont = whole[len(ids) :]
                logp = model(torch.tensor([ids + cont[:-1]]))[0].log_softmax(-1)
                expected.append(sum(float(logp[len(ids) - 1 + k, t]) for k, t in enumerate(cont)))
            assert pred["loglikelihood"] == pytest.approx(expected, abs=1e-4)
            assert pred["predicted"] == "ABCD"[int(np.argmax(expected))]


def test_row_continuations_of_different_lengths_by_hand():
    table = torch.randn(7, 7, generator=torch.Generator().manual_seed(3))
    model = BigramLM(table)
    prompts = [[1, 3], [2, 4, 4]]
    conts = [[[5], [6, 6, 2]], [[3, 3, 3, 3], [0]]]
    got = row_continuation_logprobs(model, prompts, conts)
    for b, p in enumerate(prompts):
        for n, c in enumerate(conts[b]):
            chain = [p[-1]] + c
            assert float(got[b, n]) == pytest.approx(
                sum(model.logp(a, z) for a, z in zip(chain, chain[1:], strict=False)), abs=1e-5
            )


def test_an_unknown_mc_scoring_is_refused():
    with pytest.raises(ConfigError, match=r"^stage\.mc\.scoring: 'text'; expected one of letter, option$"):
        check_scoring("text")
    with pytest.raises(ConfigError, match="stage.mc.scoring"):
        evaluate_multiple_choice(BigramLM(torch.zeros(4, 4)), CharTokenizer("x"), [], scoring="Option")


# ------------------------------------------------------------------------------------------------ progress


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_writes_a_periodic_line_when_not_a_terminal():
    stream, clock = io.StringIO(), FakeClock()
    bar = Progress("eval mc", 10, "questions", every_s=30, stream=stream, clock=clock)
    clock.now = 5
    bar.update(4)
    assert stream.getvalue() == ""  # not yet: one line per 30 s, not one per batch
    clock.now = 31
    bar.update(4)
    assert stream.getvalue() == "eval mc: 8/10 questions (80%), 31 s, 0.3 questions/s\n"
    clock.now = 40
    bar.update(2)
    bar.close()
    assert stream.getvalue().splitlines()[-1].startswith("eval mc: 10/10 questions (100%), 40 s")
    assert len(stream.getvalue().splitlines()) == 2


def test_progress_is_a_bar_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    with Progress("eval mc", 3, "questions", stream=stream) as bar:
        bar.update(3)
    assert "eval mc" in stream.getvalue() and "3/3" in stream.getvalue() and "\r" in stream.getvalue()


# ------------------------------------------------------------------------------- held-out-only data for eval


def held_out_only_data(tmp_path, docs=("第一篇文档。", "第二篇文档。", "第三篇文档。", "第四篇文档。")):
    text = tmp_path / "held.txt"
    text.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return from_mapping(
        DataConfig,
        {
            "name": "held",
            "dir": str(tmp_path / "data"),
            "holdout_modulus": 1,  # all held out
            "sources": {"held": {"files": [str(text)]}},
            "packing": {"num_proc": 1},
        },
        "data",
    )


def test_a_held_out_only_source_is_enough_for_eval_but_not_for_training(tok, tmp_path):
    cfg = held_out_only_data(tmp_path)
    with pytest.raises(
        DataError, match=r"source 'held' .*: no documents to train on \(read 4, kept 4, train 0, val 4,"
    ):
        prepare_tokens(cfg, tok)  # the corpus built for training
    shards = prepare_tokens(cfg, tok, splits=["val"])["val"]["held"]  # what eval asks for
    assert sum(len(np.fromfile(s, dtype=np.uint16)) for s in shards) > 4
    # The corpus eval wrote (no training split) is then refused for training, naming the counts.
    with pytest.raises(
        DataError, match=r"source 'held' .*: no documents to train on \(train 0, val 4; data.holdout_modulus=1\)"
    ):
        prepare_tokens(cfg, tok)


# ------------------------------------------------------------------------------------------ protocol record


def test_result_metrics_carry_the_new_scores():
    report = {
        "rolling_perplexity": {
            "all": {
                "bits_per_byte": 1.5,
                "byte_perplexity": 2.8,
                "word_perplexity": 9.0,
                "token_perplexity": 7.0,
                "documents": 3,
            }
        },
        "mc": {"accuracy": 0.5, "acc_norm": 0.75, "acc_norm_bytes": 0.25, "n": 4, "scoring": "option"},
    }
    m = result_metrics(report)
    assert m["rolling_perplexity/all/bits_per_byte"] == 1.5 and m["mc/acc_norm"] == 0.75 and m["mc/scoring"] == "option"
    assert "mc/acc_norm" not in result_metrics({"mc": {"accuracy": 0.5, "n": 4}})


@pytest.mark.slow
def test_eval_records_the_protocol_of_every_score(tok, tmp_path):
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", tok, dim=64, ffn_dim=128, max_seq_len=256)
    val = tmp_path / "val.csv"
    val.write_text(CEVAL, encoding="utf-8")
    docs = tmp_path / "held.txt"
    docs.write_text("这本书的内容很好，值得一读。\n质量太差了，不推荐。\n物流很快，包装完好。\n", encoding="utf-8")
    run = tmp_path / "run"
    result = llama_zh(
        "stage=eval",
        f"stage.checkpoint={ckpt}",
        "stage.tasks=[perplexity,rolling_perplexity,mc]",
        f"stage.mc.file={val}",
        f"stage.mc.dev_file={val}",
        "stage.mc.shots=1",
        "stage.mc.scoring=option",
        "stage.rolling.window=16",
        "data.seq_len=16",
        "stage.speed_probe_tokens=0",
        "~data.sources.reviews",
        f"data.sources.news.files=[{docs}]",
        "data.sources.news.format=text",
        "data.holdout_modulus=1",
        f"paths.data_dir={tmp_path / 'data'}",
        "logger=csv",
        run_dir=run,
    )
    report = json.loads((run / "eval_results.json").read_text())
    sha = tok.sha256()
    assert report["tokenizer_sha256"] == sha
    assert set(report["protocol"]) == {"perplexity", "rolling_perplexity", "mc"}
    for task, p in report["protocol"].items():
        assert p["tokenizer_sha256"] == sha and "template" in p and "shots" in p, task
    mc = report["protocol"]["mc"]
    assert (mc["scoring"], mc["shots"]) == ("option", 1) and "答案：" in mc["template"]
    assert report["protocol"]["perplexity"]["scoring"] == "packed-stream"
    assert (
        report["protocol"]["rolling_perplexity"]["scoring"],
        report["protocol"]["rolling_perplexity"]["window"],
    ) == ("rolling-per-document", 16)
    assert report["rolling_perplexity"]["news"]["documents"] == 3 and report["perplexity"]["news"]["tokens"] > 0
    assert report["mc"]["n"] == 3 and 0 <= report["mc"]["acc_norm"] <= 1
    # stderr is a pipe here: one progress line per task at least, with its count.
    for line in ("eval perplexity: ", "eval rolling_perplexity: 3/3 documents", "eval mc: 3/3 questions"):
        assert line in result.stderr, result.stderr[-2000:]


def test_eval_refuses_an_unknown_scoring_in_one_line(tmp_path):
    result = llama_zh(
        "stage=eval",
        "stage.checkpoint=/nonexistent/ckpt",
        "stage.tasks=mc",
        "stage.mc.scoring=text",
        run_dir=tmp_path / "run",
        check=False,
    )
    assert result.returncode != 0
    assert (
        result.stderr.strip().splitlines()[-1]
        == "llama_zh: error: stage.mc.scoring: 'text'; expected one of letter, option"
    )
