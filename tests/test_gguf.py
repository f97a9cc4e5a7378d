"""GGUF export: read back with gguf's own reader (tensor names, shapes, dtypes, values, metadata, tokenizer)."""

import numpy as np
import pytest
import torch
from helpers import llama_zh
from tiny_checkpoints import make_checkpoint

from llama_zh.checkpoint import read_native, save_checkpoint
from llama_zh.convert import FormatError, convert
from llama_zh.convert.gguf import GGUFError, write
from llama_zh.convert.keys import halves_to_interleaved
from llama_zh.tensor_io import CheckpointError

gguf = pytest.importorskip("gguf")

# llama.cpp's names for the llama architecture, written out by hand: what its loader looks up.
EXPECTED_NAMES = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
    f"blk.{i}.{n}.weight"
    for i in range(2)
    for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
}


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
    for _name, t in tensors.items():
        assert t.tensor_type == (gguf.GGMLQuantizationType.F16 if t.data.ndim == 2 else gguf.GGMLQuantizationType.F32)
    pairs = {
        "token_embd.weight": "embed.weight",
        "output.weight": "head.weight",
        "output_norm.weight": "norm.weight",
        "blk.1.attn_v.weight": "layers.1.attn.wv.weight",
        "blk.0.ffn_down.weight": "layers.0.ffn.w_down.weight",
        "blk.0.attn_norm.weight": "layers.0.attn_norm.weight",
    }
    for g, n in pairs.items():
        assert tuple(tensors[g].data.shape) == tuple(native[n].shape)
        np.testing.assert_allclose(tensors[g].data.astype(np.float32), native[n].numpy(), rtol=1e-3, atol=1e-4)
    # q and k in llama.cpp's interleaved RoPE layout (k with the kv heads of GQA).
    q = torch.from_numpy(tensors["blk.0.attn_q.weight"].data.astype(np.float32))
    k = torch.from_numpy(tensors["blk.1.attn_k.weight"].data.astype(np.float32))
    assert tuple(k.shape) == (c.n_kv_heads * c.head_dim, c.dim)
    torch.testing.assert_close(
        q, halves_to_interleaved(native["layers.0.attn.wq.weight"], c.n_heads), rtol=1e-3, atol=1e-4
    )
    torch.testing.assert_close(
        k, halves_to_interleaved(native["layers.1.attn.wk.weight"], c.n_kv_heads), rtol=1e-3, atol=1e-4
    )

    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.file_type") == 1  # MOSTLY_F16
    assert (
        field(reader, "llama.block_count"),
        field(reader, "llama.embedding_length"),
        field(reader, "llama.feed_forward_length"),
        field(reader, "llama.attention.head_count"),
        field(reader, "llama.attention.head_count_kv"),
        field(reader, "llama.rope.dimension_count"),
        field(reader, "llama.context_length"),
    ) == (2, 64, 128, 4, 2, 16, 128)
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
    assert (
        field(reader, "tokenizer.ggml.bos_token_id"),
        field(reader, "tokenizer.ggml.eos_token_id"),
        field(reader, "tokenizer.ggml.unknown_token_id"),
    ) == (1, 2, 0)
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    if extra_vocab:
        assert pieces[-1] == f"[PAD{tok.vocab_size + extra_vocab - 1}]" and types[-extra_vocab:] == [5] * extra_vocab


def test_transformers_gguf_loader_gives_the_same_logits_and_tokens(tok, tmp_path):
    # An independent reader: transformers de-quantizes GGUF into a LlamaForCausalLM, undoing llama.cpp's
    # q/k permutation and rebuilding the tokenizer from the file's pieces.
    transformers = pytest.importorskip("transformers")
    ckpt, model = make_checkpoint(tmp_path / "ckpt", tok, sharpen=1.0)
    convert(ckpt, "native", tmp_path / "m.gguf", "gguf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="m.gguf", dtype=torch.float32
    ).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    text = "这本书写得很好，推荐。质量太差了"
    ids = tok.encode(text, bos=True)
    assert hf_tok(text)["input_ids"] == ids
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([ids])).logits, model(torch.tensor([ids])), atol=2e-3, rtol=0)


def test_export_refuses_bad_input(tok, tmp_path):
    ckpt, model = make_checkpoint(tmp_path / "ckpt", tok)
    save_checkpoint(model, tmp_path / "bare")  # no tokenizer
    with pytest.raises(GGUFError, match="no tokenizer.model or tokenizer.json to embed"):
        write(read_native(tmp_path / "bare"), tmp_path / "x.gguf")
    out = write(read_native(ckpt), tmp_path / "x.gguf")
    with pytest.raises(CheckpointError, match="already exists"):
        write(read_native(ckpt), out)
    assert write(read_native(ckpt), out, overwrite=True) == out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


@pytest.mark.slow
def test_convert_stage_writes_gguf(tok, tmp_path):
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", tok)
    llama_zh(
        "stage=convert",
        f"stage.src={ckpt}",
        "stage.src_format=native",
        f"stage.dst={tmp_path / 'm.gguf'}",
        "stage.dst_format=gguf",
        "logger=csv",
        run_dir=tmp_path / "run",
    )
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert {t.name for t in reader.tensors} == EXPECTED_NAMES


# stage.gguf_type -> (matrix type, general.file_type), written out from gguf's LlamaFileType by hand.
TYPES = {
    "f32": ("F32", 0),
    "f16": ("F16", 1),
    "bf16": ("BF16", 32),
    "q8_0": ("Q8_0", 7),
    "q5_1": ("Q5_1", 9),
    "q5_0": ("Q5_0", 8),
    "q4_1": ("Q4_1", 3),
    "q4_0": ("Q4_0", 2),
}
# Worst error of a value as a fraction of its block's largest |value| a: half a step d, or a whole one where the
# format clamps the side opposite a (q4_0: -8..7, q5_0: -16..15), plus the f16 rounding of the scale over
# the largest level (and of the minimum, for the _1 types); relative rounding for floats.
F16_EPS = 2**-11
BLOCK_ERROR = {
    "F32": 0.0,
    "F16": F16_EPS,
    "BF16": 2**-8,
    "Q8_0": (0.5 + 127 * F16_EPS) / 127,
    "Q5_0": (1 + 16 * F16_EPS) / 16,
    "Q4_0": (1 + 8 * F16_EPS) / 8,
    "Q5_1": 2 / 31 * (0.5 + 31 * F16_EPS) + F16_EPS,
    "Q4_1": 2 / 15 * (0.5 + 15 * F16_EPS) + F16_EPS,
}


def expected_type(name, shape, gguf_type):
    """The documented rule: norms f32; output.weight q8_0 below 8 bits; rows off the block of 32 in f16."""
    matrix = TYPES[gguf_type][0]
    if len(shape) == 1:
        return "F32"
    if name == "output.weight" and gguf_type in ("q5_1", "q5_0", "q4_1", "q4_0"):
        matrix = "Q8_0"
    if matrix.startswith("Q") and shape[-1] % 32:
        return "F16"
    return matrix


def source_tensors(model):
    """llama.cpp's name -> the native tensor as the file should hold it (q and k in interleaved pairs)."""
    native, c = model.state_dict(), model.config
    out = {
        "token_embd.weight": native["embed.weight"],
        "output.weight": native["head.weight"],
        "output_norm.weight": native["norm.weight"],
    }
    parts = {
        "attn_norm": "attn_norm",
        "attn_q": "attn.wq",
        "attn_k": "attn.wk",
        "attn_v": "attn.wv",
        "attn_output": "attn.wo",
        "ffn_norm": "ffn_norm",
        "ffn_gate": "ffn.w_gate",
        "ffn_up": "ffn.w_up",
        "ffn_down": "ffn.w_down",
    }
    for i in range(c.n_layers):
        for g, n in parts.items():
            t = native[f"layers.{i}.{n}.weight"]
            if g in ("attn_q", "attn_k"):
                t = halves_to_interleaved(t, c.n_heads if g == "attn_q" else c.n_kv_heads)
            out[f"blk.{i}.{g}.weight"] = t
    return out


@pytest.mark.parametrize("gguf_type", list(TYPES))
def test_gguf_types_follow_the_rule_and_dequantize_close(tok, tmp_path, gguf_type, caplog):
    # ffn_dim 120: ffn_down's rows (120) are not a multiple of the 32-value blocks.
    ckpt, model = make_checkpoint(tmp_path / "ckpt", tok, ffn_dim=120, sharpen=1.0)
    with caplog.at_level("INFO", logger="llama_zh.convert.gguf"):
        out = convert(ckpt, "native", tmp_path / "m", "gguf", gguf_type=gguf_type)
    reader = gguf.GGUFReader(out)
    assert field(reader, "general.file_type") == TYPES[gguf_type][1]
    source = source_tensors(model)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == EXPECTED_NAMES
    fallbacks = 0
    for name, t in tensors.items():
        want = source[name].numpy()
        kind = expected_type(name, want.shape, gguf_type)
        assert t.tensor_type.name == kind, name
        fallbacks += kind == "F16" and TYPES[gguf_type][0] != "F16"
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        blocks = want.reshape(-1, 32) if want.shape[-1] % 32 == 0 else want.reshape(-1, want.shape[-1])
        bound = np.repeat(np.abs(blocks).max(axis=1), blocks.shape[1]).reshape(want.shape) * BLOCK_ERROR[kind]
        if kind in ("F16", "BF16"):  # relative to each value, not to its block
            bound = np.abs(want) * BLOCK_ERROR[kind]
        assert np.all(np.abs(got - want) <= bound * 1.01 + 1e-7), name
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == fallbacks == (2 if gguf_type not in ("f32", "f16", "bf16") else 0)
    assert all("ffn_down" in w and "not a multiple" in w for w in warnings)
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"gguf {gguf_type}:")]
    assert len(summary) == 1 and (fallbacks == 0 or f"{fallbacks} F16 (fallback)" in summary[0])


def test_quantizing_by_slabs_gives_the_whole_matrix_bytes(monkeypatch):
    from llama_zh.convert import gguf as gguf_export

    t = torch.randn(40, 64)
    whole = gguf_export.encode(t, gguf.GGMLQuantizationType.Q4_0)
    monkeypatch.setattr(gguf_export, "QUANTIZE_SLAB", 3 * 64)  # 3 rows at a time: 14 slabs, the last short
    sliced = gguf_export.encode(t, gguf.GGMLQuantizationType.Q4_0)
    assert whole.shape == (40, 64 // 32 * 18) and np.array_equal(whole, sliced)
    assert np.array_equal(whole, gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType.Q4_0))


def test_gguf_type_refused_with_one_line(tok, tmp_path):
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", tok)
    with pytest.raises(GGUFError, match=r"^stage.gguf_type: 'q3_k'; expected one of f32, f16, bf16, q8_0"):
        convert(ckpt, "native", tmp_path / "m.gguf", "gguf", gguf_type="q3_k")
    with pytest.raises(FormatError, match=r"^stage.gguf_type=q4_0 applies to stage.dst_format=gguf, not hf$"):
        convert(ckpt, "native", tmp_path / "hf", "hf", gguf_type="q4_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.slow
def test_convert_stage_writes_gguf_type(tok, tmp_path):
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", tok)
    common = (
        "stage=convert",
        f"stage.src={ckpt}",
        "stage.src_format=native",
        f"stage.dst={tmp_path / 'm.gguf'}",
        "stage.dst_format=gguf",
        "logger=csv",
    )
    bad = llama_zh(*common, "stage.gguf_type=q4", run_dir=tmp_path / "bad", check=False)
    assert bad.returncode != 0 and "stage.gguf_type: 'q4'; expected one of" in bad.stderr
    llama_zh(*common, "stage.gguf_type=q4_0", run_dir=tmp_path / "run")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert field(reader, "general.file_type") == 2
    assert {t.name: t.tensor_type.name for t in reader.tensors}["blk.0.attn_q.weight"] == "Q4_0"
