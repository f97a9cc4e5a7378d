"""Meta's tiktoken rank file -> tokenizer.json: merges from ranks, the same ids as the BPE the ranks came from."""

import json

import pytest
from bpe_fixture import assert_same_ids, write_rank_file

from llama_zh.convert.tiktoken import convert_rank_file, last_merge
from llama_zh.tokenizer import Tokenizer, TokenizerError


@pytest.fixture(scope="module")
def converted(bpe_tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiktoken")
    return convert_rank_file(write_rank_file(bpe_tokenizer, d / "tokenizer.model"), d / "out")


def test_ids_equal_the_bpe_the_ranks_came_from(bpe_tokenizer, converted):
    source, ours = Tokenizer(bpe_tokenizer), Tokenizer(converted)
    assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.eot_id) == (3256, 3000, 3001, 3009)
    assert_same_ids(ours, lambda text: source.encode(text, bos=True))

    # the derived merges are the trained ones, rank for rank
    def merges(path):
        return json.loads(path.read_text(encoding="utf-8"))["model"]["merges"]

    assert merges(converted) == merges(bpe_tokenizer)


def test_last_merge_follows_ranks():
    ranks = {bytes([b]): b for b in range(256)}
    ranks |= {b"ab": 256, b"bc": 257, b"abc": 258, b"cab": 259}
    assert last_merge(b"abc", ranks) == (b"ab", b"c")  # "ab" outranks "bc"
    assert last_merge(b"cab", ranks) == (b"c", b"ab")


@pytest.mark.parametrize(
    "content, message",
    [
        ("YQ== 0\nYg== x\n", "line 2: not a tiktoken rank entry"),
        ("YQ== 0\nYQ== 1\n", "line 2: token b'a' repeated"),
        ("YQ== 0\n", "byte 0x00 has no token"),
        ("YQ== 5\n", "ranks are not 0..0"),
    ],
)
def test_a_bad_rank_file_is_one_line(tmp_path, content, message):
    path = tmp_path / "tokenizer.model"
    path.write_text(content)
    with pytest.raises(TokenizerError, match=message.replace("(", r"\(").replace(")", r"\)")):
        convert_rank_file(path, tmp_path / "out")
    assert not (tmp_path / "out" / "tokenizer.json").exists()
