"""Chinese vocabulary extension of a byte-level BPE base: base ids and merge ranks kept, non-CJK text unchanged."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from bpe_fixture import CODE, ENGLISH, news_split
from tiny_checkpoints import make_checkpoint

from llama_zh.bpe import check_bpe_extension, holds_only_cjk, is_cjk
from llama_zh.convert import load_checkpoint
from llama_zh.tokenizer import Tokenizer, TokenizerError
from llama_zh.vocab import extend_bpe_tokenizer, resize_checkpoint, tokenizer_report


@pytest.fixture(scope="module")
def extended(bpe_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("ext")
    extension = extend_bpe_tokenizer(bpe_tokenizer, news_split(False, 6000), 8000, out)
    return extension, out / "tokenizer.json"


@pytest.fixture(scope="module")
def held_out():
    return news_split(True, 500)


def spec(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_every_base_id_merge_and_special_token_is_kept(bpe_tokenizer, extended):
    extension, path = extended
    base, ext = spec(bpe_tokenizer), spec(path)
    assert extension.added > 1000 and extension.vocab_size == 3256 + extension.added
    assert all(ext["model"]["vocab"][t] == i for t, i in base["model"]["vocab"].items())
    assert ext["model"]["merges"][: len(base["model"]["merges"])] == base["model"]["merges"]
    assert ext["added_tokens"] == base["added_tokens"]
    specials = {t["content"]: t["id"] for t in base["added_tokens"]}
    assert all(ext["model"]["vocab"][t] == i for t, i in specials.items())  # where the library looks for their ids
    new = {t: i for t, i in ext["model"]["vocab"].items() if t not in base["model"]["vocab"] and t not in specials}
    assert sorted(new.values()) == list(range(3256, 3256 + extension.added))
    tok = Tokenizer(path)
    assert (tok.bos_id, tok.eos_id, tok.eot_id) == (3000, 3001, 3009)
    # every new token's bytes are CJK (a merged character or the start of one)
    assert all(all(map(is_cjk, tok.decode([i]).strip("\ufffd"))) for i in new.values())


def test_text_without_cjk_encodes_as_with_the_base(bpe_tokenizer, extended, held_out):
    base, ext = Tokenizer(bpe_tokenizer), Tokenizer(extended[1])
    # held-out code: the tests (the fixture trained on llama_zh/), and the news with its CJK taken out
    tests = [p.read_text(encoding="utf-8") for p in sorted(Path(__file__).parent.glob("test_*.py"))]
    stripped = ["".join(c for c in d if not is_cjk(c)) for d in held_out + tests]
    texts = (
        ENGLISH + CODE + [s for s in stripped if s.strip()] + ["ßΩ€ é à ü ñ ç 😀👍🏽 Привет мир ١٢٣ こんにちは 안녕"]
    )
    assert len(texts) > 200
    for text in texts:
        assert ext.encode(text) == base.encode(text), text


def test_modern_chinese_takes_at_least_a_fifth_fewer_tokens(bpe_tokenizer, extended, held_out):
    base, ext = tokenizer_report(bpe_tokenizer, held_out), tokenizer_report(extended[1], held_out)
    assert ext["tokens_per_char"] <= 0.8 * base["tokens_per_char"]
    assert ext["byte_char_share"] < base["byte_char_share"]
    tok = Tokenizer(extended[1])
    assert all(tok.decode(tok.encode(d)) == d for d in held_out)


def test_the_extension_loads_in_transformers_with_the_same_ids(extended, held_out):
    hf = transformers.AutoTokenizer.from_pretrained(extended[1].parent)
    tok = Tokenizer(extended[1])
    for text in held_out[:100] + ENGLISH + CODE:
        assert hf(text)["input_ids"] == tok.encode(text, bos=True)


def test_a_changed_base_merge_or_id_is_refused(bpe_tokenizer, extended):
    base, ext = spec(bpe_tokenizer), spec(extended[1])
    swapped = json.loads(json.dumps(ext))
    merges = swapped["model"]["merges"]
    merges[5], merges[6] = merges[6], merges[5]
    with pytest.raises(TokenizerError, match="merge rank 5"):
        check_bpe_extension(base, swapped, "base.json", "ext.json")
    moved = json.loads(json.dumps(ext))
    token = next(iter(base["model"]["vocab"]))
    moved["model"]["vocab"][token] = 99999
    with pytest.raises(TokenizerError, match="does not extend base.json"):
        check_bpe_extension(base, moved, "base.json", "ext.json")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("中国".encode(), True),
        ("。中".encode(), True),
        ("中".encode()[:2], True),  # E4 B8: U+4E00..4E3F, all CJK
        ("中a".encode(), False),
        (" 中".encode(), False),
        ("中".encode()[1:], False),  # starts inside a character
        ("é".encode(), False),
        ("€".encode()[:2], False),
        (bytes([0xE4, 0xB7]), False),  # U+4DC0..: hexagrams
    ],
)
def test_holds_only_cjk(text, expected):
    assert holds_only_cjk(text) is expected


def test_resize_keeps_old_rows_and_inits_new_ones_from_subtokens(bpe_tokenizer, extended, tmp_path):
    base = Tokenizer(bpe_tokenizer)
    src, model = make_checkpoint(tmp_path / "src", base)
    dst = resize_checkpoint(src, extended[1], tmp_path / "dst")
    resized, tok = load_checkpoint(dst)
    assert tok.vocab_size == resized.config.vocab_size == extended[0].vocab_size
    assert (dst / "tokenizer.json").read_bytes() == extended[1].read_bytes() and (
        dst / "tokenizer_config.json"
    ).is_file()
    assert torch.equal(resized.embed.weight[:3256], model.embed.weight)
    assert torch.equal(resized.head.weight[:3256], model.head.weight)
    new_id = 3256 + 10
    sub = base.encode(tok.decode([new_id]))
    assert len(sub) > 1
    torch.testing.assert_close(resized.embed.weight[new_id], model.embed.weight[sub].mean(0))


def test_resizing_to_a_sentencepiece_tokenizer_is_refused(bpe_tokenizer, tmp_path):
    from tiny_checkpoints import train_tokenizer

    src, _ = make_checkpoint(tmp_path / "src", Tokenizer(bpe_tokenizer))
    sp = train_tokenizer(tmp_path / "sp")
    with pytest.raises(TokenizerError, match=r"\(sentencepiece\) does not extend .*\(bpe\)"):
        resize_checkpoint(src, sp.path, tmp_path / "dst")


@pytest.mark.slow
def test_stage_extends_a_bpe_base_reports_and_resizes(bpe_tokenizer, tmp_path):
    src, model = make_checkpoint(tmp_path / "src", Tokenizer(bpe_tokenizer))
    out = tmp_path / "tok"
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", LLAMA_ZH_DATA=str(tmp_path / "data"))
    args = [
        sys.executable,
        "-m",
        "llama_zh",
        "stage=tokenizer",
        "logger=csv",
        "data=sample_zh",
        "stage.vocab_size=6000",
        f"stage.output={out}",
        f"stage.resize_checkpoint={src}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["base"] == str(src / "tokenizer.json") and report["extension"]["added"] > 500
    for r in report["sources"].values():
        assert r["tokenizer"]["tokens_per_char"] < r["base"]["tokens_per_char"]
    resized, tok = load_checkpoint(out / "checkpoint")
    assert tok.kind == "bpe" and resized.config.vocab_size == tok.vocab_size == report["vocab_size"]
    assert torch.equal(resized.head.weight[:3256], model.head.weight)
