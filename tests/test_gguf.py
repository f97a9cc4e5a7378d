"""GGUF export: read back with gguf's own reader (tensor names, shapes, dtypes, values, metadata, tokenizer)."""

import numpy as np
import pytest
import torch

from llama_zh.checkpoint import read_native, save_checkpoint
from llama_zh.convert import convert
from llama_zh.convert.gguf import GGUFError, write
from llama_zh.convert.keys import halves_to_interleaved
from llama_zh.tensor_io import CheckpointError
from tiny_checkpoints import llama_zh, make_checkpoint, train_tokenizer

gguf = pytest.importorskip("gguf")

# llama.cpp's names for the llama architecture, written out by hand: what its loader looks up.
EXPECTED_NAMES = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
    f"blk.{i}.{n}.weight" for i in range(2) for n in
    ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


def field(reader, key):
    return reader.fields[key].contents()


def test_rope_rows_go_back_to_interleaved_pairs():
    # One head of size 4 in the halves layout pairs rows (0, 2) and (1, 3); interleaved pairs (0, 1), (2, 3).
    q = torch.arange(4.0)[:, None].expand(4, 3)
    assert halves_to_interleaved(q, 1)[:, 0].tolist() == [0.0, 2.0, 1.0, 3.0]


@pytest.mark.parametrize("extra_vocab", [0, 3])
def test_export_reads_back(tok, tmp_path, extra_vocab):
    ckpt, model = make_checkpoint(tmp_path / "ckpt", tok, vocab_size=tok.vocab_size + extra_vocab)
    out = convert(ckpt, "native", tmp_path / "model", "gguf")
    assert out == tmp_path / "model.gguf" and out.is_file()
    reader = gguf.GGUFReader(out)

    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == EXPECTED_NAMES
    native = model.state_dict()
    c = model.config
    for name, t in tensors.items():
        assert t.tensor_type == (gguf.GGMLQuantizationType.F16 if t.data.ndim == 2 else gguf.GGMLQuantizationType.F32)
    pairs = {"token_embd.weight": "embed.weight", "output.weight": "head.weight", "output_norm.weight": "norm.weight",
             "blk.1.attn_v.weight": "layers.1.attn.wv.weight", "blk.0.ffn_down.weight": "layers.0.ffn.w_down.weight",
             "blk.0.attn_norm.weight": "layers.0.attn_norm.weight"}
    for g, n in pairs.items():
        assert tuple(tensors[g].data.shape) == tuple(native[n].shape)
        np.testing.assert_allclose(tensors[g].data.astype(np.float32), native[n].numpy(), rtol=1e-3, atol=1e-4)
    # q and k in llama.cpp's interleaved RoPE layout (k with the kv heads of GQA).
    q = torch.from_numpy(tensors["blk.0.attn_q.weight"].data.astype(np.float32))
    k = torch.from_numpy(tensors["blk.1.attn_k.weight"].data.astype(np.float32))
    assert tuple(k.shape) == (c.n_kv_heads * c.head_dim, c.dim)
    torch.testing.assert_close(q, halves_to_interleaved(native["layers.0.attn.wq.weight"], c.n_heads), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(k, halves_to_interleaved(native["layers.1.attn.wk.weight"], c.n_kv_heads), rtol=1e-3,
                               atol=1e-4)

    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.file_type") == 1  # MOSTLY_F16
    assert (field(reader, "llama.block_count"), field(reader, "llama.embedding_length"),
            field(reader, "llama.feed_forward_length"), field(reader, "llama.attention.head_count"),
            field(reader, "llama.attention.head_count_kv"), field(reader, "llama.rope.dimension_count"),
            field(reader, "llama.context_length")) == (2, 64, 128, 4, 2, 16, 128)
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert field(reader, "llama.rope.freq_base") == 10000.0

    pieces = field(reader, "tokenizer.ggml.tokens")
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert len(pieces) == tok.vocab_size + extra_vocab
    assert pieces[: tok.vocab_size] == [tok.sp.IdToPiece(i) for i in range(tok.vocab_size)]
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[:4] == [2, 3, 3, 6]  # <unk> unknown, <s> </s> control, <0x00> byte
    assert types[tok.sp.PieceToId("答")] == 1
    assert field(reader, "tokenizer.ggml.scores")[300] == pytest.approx(tok.sp.GetScore(300))
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id"),
            field(reader, "tokenizer.ggml.unknown_token_id")) == (1, 2, 0)
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    if extra_vocab:
        assert pieces[-1] == f"[PAD{tok.vocab_size + extra_vocab - 1}]" and types[-extra_vocab:] == [5] * extra_vocab


def test_transformers_gguf_loader_gives_the_same_logits_and_tokens(tok, tmp_path):
    # An independent reader: transformers de-quantizes GGUF into a LlamaForCausalLM, undoing llama.cpp's
    # q/k permutation and rebuilding the tokenizer from the file's pieces.
    transformers = pytest.importorskip("transformers")
    ckpt, model = make_checkpoint(tmp_path / "ckpt", tok, sharpen=1.0)
    convert(ckpt, "native", tmp_path / "m.gguf", "gguf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    text = "这本书写得很好，推荐。质量太差了"
    ids = tok.encode(text, bos=True)
    assert hf_tok(text)["input_ids"] == ids
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([ids])).logits, model(torch.tensor([ids])), atol=2e-3, rtol=0)


def test_export_refuses_bad_input(tok, tmp_path):
    ckpt, model = make_checkpoint(tmp_path / "ckpt", tok)
    save_checkpoint(model, tmp_path / "bare")  # no tokenizer
    with pytest.raises(GGUFError, match="no tokenizer.model to embed"):
        write(read_native(tmp_path / "bare"), tmp_path / "x.gguf")
    out = write(read_native(ckpt), tmp_path / "x.gguf")
    with pytest.raises(CheckpointError, match="already exists"):
        write(read_native(ckpt), out)
    assert write(read_native(ckpt), out, overwrite=True) == out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


@pytest.mark.slow
def test_convert_stage_writes_gguf(tok, tmp_path):
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", tok)
    llama_zh("stage=convert", f"stage.src={ckpt}", "stage.src_format=native", f"stage.dst={tmp_path / 'm.gguf'}",
             "stage.dst_format=gguf", "logger=csv", run_dir=tmp_path / "run")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert {t.name for t in reader.tensors} == EXPECTED_NAMES
