"""tokenizer.json (byte-level BPE) behind the Tokenizer interface: transformers' ids, streaming, packing,
checkpoints."""

import json

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from bpe_fixture import CODE, ENGLISH, assert_same_ids, comparison_texts, news_split
from tiny_checkpoints import make_checkpoint, train_tokenizer

from llama_zh.checkpoint import read_native
from llama_zh.convert import load_checkpoint
from llama_zh.data.chat_template import ChatTemplate
from llama_zh.data.corpus import DataError
from llama_zh.data.packing import BlockEncoder, load_tokens, pack_corpus_file
from llama_zh.infer.engine import REPLACEMENT, TextDeltas
from llama_zh.tensor_io import CheckpointError
from llama_zh.tokenizer import BPETokenizer, SentencePieceTokenizer, Tokenizer, TokenizerError


@pytest.fixture(scope="module")
def bpe(bpe_tokenizer):
    return Tokenizer(bpe_tokenizer)


@pytest.fixture(scope="module")
def held_out():
    return news_split(True, 300)


def test_the_kind_comes_from_the_file(bpe, tmp_path):
    assert isinstance(bpe, BPETokenizer) and bpe.kind == "bpe"
    sp = train_tokenizer(tmp_path / "sp")
    assert isinstance(sp, SentencePieceTokenizer) and sp.kind == "sentencepiece"
    # Llama-3's layout: 3000 regular tokens, then the 256 special ones.
    assert (bpe.vocab_size, bpe.bos_id, bpe.eos_id, bpe.eot_id, bpe.pad_id) == (3256, 3000, 3001, 3009, -1)
    assert bpe.stop_ids == [3001, 3009]


def test_ids_equal_transformers_fast_tokenizer(bpe, bpe_tokenizer):
    hf = transformers.AutoTokenizer.from_pretrained(bpe_tokenizer.parent)
    assert hf.is_fast
    texts = comparison_texts()
    assert_same_ids(bpe, lambda t: hf(t)["input_ids"], lambda ids: hf.decode(ids, skip_special_tokens=True), texts)
    assert [bpe.encode(t) for t in texts[:50]] == bpe.encode_batch(texts[:50])
    # special tokens in text are ids, as transformers splits them
    assert bpe.encode("<|eot_id|>好")[0] == bpe.eot_id


def test_text_round_trips_and_chinese_is_compressed(bpe, held_out):
    chars = sum(map(len, held_out))
    tokens = sum(len(bpe.encode(d)) for d in held_out)
    assert all(bpe.decode(bpe.encode(d)) == d for d in held_out + ENGLISH + CODE)
    assert tokens / chars < 1.5  # bytes alone would be 3 per character


def test_streaming_never_emits_half_a_character(bpe, held_out):
    text = held_out[0] + "好评😀👍🏽龘𠮷"
    ids = bpe.encode(text)
    # The test means something only if some token ends inside a character.
    assert any(REPLACEMENT in bpe.decode(ids[:n]) for n in range(1, len(ids)))
    deltas, out = TextDeltas(bpe), []
    for i in ids:
        delta = deltas.push([i])
        assert REPLACEMENT not in delta
        out.append(delta)
    out.append(deltas.finish())
    assert "".join(out) == text


def test_offsets_are_characters_for_chat_masks(bpe):
    text = "用户：你好 Hello😀"
    ids, spans = bpe.encode_with_offsets(text)
    assert ids == bpe.encode(text) and spans[-1][1] == len(text) and spans[0][0] == 0
    template = ChatTemplate.named("chatml")
    ids, mask = template.encode([{"role": "user", "content": "你好"}, {"role": "assistant", "content": "很好。"}], bpe)
    answer = [i for i, m in zip(ids, mask, strict=False) if m]
    assert bpe.decode(answer).startswith("很好。")


def pack(corpus, tokenizer, out_dir):
    with BlockEncoder(tokenizer, 1) as encoder:
        return pack_corpus_file(corpus, "c1", tokenizer, encoder, out_dir, "news", "train", 5000, block_bytes=8192)


def test_packing_with_bpe_and_the_hash_refusal_for_either_kind(bpe, held_out, tmp_path):
    corpus = tmp_path / "news.train.txt"
    corpus.write_text("".join(d + "\n" for d in held_out[:100]), encoding="utf-8")
    result = pack(corpus, bpe, tmp_path / "bpe")
    tokens = np.concatenate([load_tokens(p, bpe) for p in result.shards]).tolist()
    assert tokens == [t for d in held_out[:100] for t in bpe.encode(d, bos=True, eos=True)]
    sp = train_tokenizer(tmp_path / "sp")
    sp_result = pack(corpus, sp, tmp_path / "sp_packed")
    with pytest.raises(DataError) as e:
        load_tokens(result.shards[0], sp)
    assert bpe.sha256()[:12] in str(e.value) and sp.sha256()[:12] in str(e.value) and "(bpe)" in str(e.value)
    with pytest.raises(DataError) as e:
        load_tokens(sp_result.shards[0], bpe)
    assert bpe.sha256()[:12] in str(e.value) and sp.sha256()[:12] in str(e.value) and "(sentencepiece)" in str(e.value)


def test_two_workers_pack_the_same_bytes(bpe, held_out, tmp_path):
    corpus = tmp_path / "news.train.txt"
    corpus.write_text("".join(d + "\n" for d in held_out), encoding="utf-8")
    one = pack(corpus, bpe, tmp_path / "one")
    with BlockEncoder(bpe, 2) as encoder:
        two = pack_corpus_file(corpus, "c1", bpe, encoder, tmp_path / "two", "news", "train", 5000, block_bytes=8192)
    assert [p.read_bytes() for p in one.shards] == [p.read_bytes() for p in two.shards]


def test_a_checkpoint_carries_tokenizer_json_and_its_config(bpe, tmp_path):
    directory, _ = make_checkpoint(tmp_path / "ckpt", bpe)
    assert (directory / "tokenizer.json").is_file() and (directory / "tokenizer_config.json").is_file()
    assert not (directory / "tokenizer.model").exists()
    assert read_native(directory).tokenizer == directory / "tokenizer.json"
    _, tokenizer = load_checkpoint(directory)
    assert isinstance(tokenizer, BPETokenizer) and tokenizer.sha256() == bpe.sha256() and tokenizer.eot_id == bpe.eot_id


def test_a_tokenizer_larger_than_the_model_is_refused(bpe, tmp_path):
    directory, _ = make_checkpoint(tmp_path / "ckpt", bpe, vocab_size=3000)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(directory)
    assert "3256" in str(e.value) and "3000" in str(e.value)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"model": {"type": "WordPiece", "vocab": {}}}', "model.type is 'WordPiece'"),
        ('{"model": {"type": "BPE"', "invalid JSON"),
        ('{"version": "1.0"}', "no `model` object"),
        ('{"model": {"type": "BPE", "vocab": {"a": 0}}}', "model.vocab or model.merges is missing"),
    ],
)
def test_a_tokenizer_json_that_is_not_bpe_is_refused_in_one_line(tmp_path, content, message):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(TokenizerError) as e:
        Tokenizer(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_tiktoken_file_and_a_bad_config_are_named(bpe_tokenizer, tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("IQ== 0\nIg== 1\n")
    with pytest.raises(TokenizerError, match="tiktoken rank file"):
        Tokenizer(path)
    (tmp_path / "tokenizer.json").write_bytes(bpe_tokenizer.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>"}))
    with pytest.raises(TokenizerError, match="bos_token '<nope>' is not a token"):
        Tokenizer(tmp_path / "tokenizer.json")


def test_multiple_choice_letters_are_token_ids(bpe):
    from llama_zh.eval.multiple_choice import LETTERS, letter_ids

    prompt = "问题：1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案："
    ids = letter_ids(bpe, prompt, bpe.encode(prompt, bos=True))
    # "：A" is one word of Llama-3's split, so each letter falls back to its own token
    assert ids == [bpe.encode(letter)[0] for letter in LETTERS] and len(set(ids)) == 4


def test_a_missing_tokenizer_is_one_line(tmp_path):
    from llama_zh.tokenizer import tokenizer_kind

    with pytest.raises(TokenizerError, match="tokenizer model not found"):
        tokenizer_kind(tmp_path / "tokenizer.json")
