"""Llama-3.x shapes: the named configs, tied embedding and head (transformers parity, native, HF and
GGUF round trips, training and quantized paths), Meta's Llama-3 params.json, GGUF rope scaling keys."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import random_hf_llama, write_meta_llama3
from tiny_checkpoints import make_checkpoint

from llama_zh.checkpoint import load_model, read_native, save_checkpoint
from llama_zh.config import ConfigError, ModelConfig
from llama_zh.convert import convert, load_checkpoint
from llama_zh.errors import LlamaZhError
from llama_zh.infer import load_stream
from llama_zh.model import build_model
from llama_zh.quant import QuantConfig
from llama_zh.train.finetune import FinetuneConfig, apply_finetune

# Published config.json values (hidden, ffn, heads, kv, layers, vocab, theta, tied, max positions, rope factor)
# and parameter counts in billions, as the model cards give them.
PUBLISHED = {
    "llama3_8b": ((4096, 14336, 32, 8, 32, 128256, 500000.0, False, 8192, None), 8.03),
    "llama3_1_8b": ((4096, 14336, 32, 8, 32, 128256, 500000.0, False, 131072, 8.0), 8.03),
    "llama3_2_1b": ((2048, 8192, 32, 8, 16, 128256, 500000.0, True, 131072, 32.0), 1.24),
    "llama3_2_3b": ((3072, 8192, 24, 8, 28, 128256, 500000.0, True, 131072, 32.0), 3.21),
    "llama3_70b": ((8192, 28672, 64, 8, 80, 128256, 500000.0, False, 8192, None), 70.55),
    "chinese_llama2_7b": ((4096, 11008, 32, 32, 32, 55296, 10000.0, False, 4096, None), 6.93),
    "chinese_llama2_13b": ((5120, 13824, 40, 40, 40, 55296, 10000.0, False, 4096, None), 13.25),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_named_configs_have_the_published_shapes(name):
    c = ModelConfig.from_name(name)
    shape, billions = PUBLISHED[name]
    factor = c.rope_scaling["factor"] if c.rope_scaling else None
    assert (
        c.dim,
        c.ffn_dim,
        c.n_heads,
        c.n_kv_heads,
        c.n_layers,
        c.vocab_size,
        c.rope_theta,
        c.tie_word_embeddings,
        c.max_seq_len,
        factor,
    ) == shape
    assert round(c.n_params / 1e9, 2) == billions
    if factor:
        assert c.rope_scaling == {
            "type": "llama3",
            "factor": factor,
            "original_max_position_embeddings": 8192,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        }


# ------------------------------------------------------------------------------ tied embeddings


def tiny_tied(**overrides):
    values = dict(
        vocab_size=300,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=128,
        max_seq_len=256,
        tie_word_embeddings=True,
    )
    return ModelConfig(**(values | overrides))


def test_tied_model_has_one_parameter_and_counts_it_once():
    model = build_model(tiny_tied(), seed=0)
    assert model.head.weight is model.embed.weight
    names = [n for n, _ in model.named_parameters()]
    assert "head.weight" not in names and "embed.weight" in names
    assert sum(p.numel() for p in model.parameters()) == model.config.n_params
    untied = build_model(tiny_tied(tie_word_embeddings=False), seed=0)
    assert sum(p.numel() for p in untied.parameters()) == untied.config.n_params == model.config.n_params + 300 * 64


def test_tied_native_checkpoint_stores_the_matrix_once_and_reloads_tied(tmp_path):
    from safetensors import safe_open

    model = build_model(tiny_tied(), seed=0)
    save_checkpoint(model, tmp_path / "ckpt")
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        assert "head.weight" not in f.keys() and "embed.weight" in f.keys()
    loaded = load_model(read_native(tmp_path / "ckpt"))
    assert loaded.head.weight is loaded.embed.weight
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)


def test_tied_training_step_moves_head_and_embedding_together():
    model = build_model(tiny_tied(), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 300, (2, 16))
    loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    before = model.embed.weight.detach().clone()
    opt.step()
    assert model.head.weight is model.embed.weight and not torch.equal(model.embed.weight, before)


def test_lora_on_a_tied_head_is_refused_and_elsewhere_works():
    model = build_model(tiny_tied(), seed=0)
    with pytest.raises(LlamaZhError, match="finetune.target_modules: head is tied"):
        apply_finetune(model, FinetuneConfig(method="lora", target_modules=["wq", "head"]))
    model = apply_finetune(
        build_model(tiny_tied(), seed=0), FinetuneConfig(method="lora", target_modules=["wq"], modules_to_save=[])
    )
    assert model.head.weight is model.embed.weight and not model.embed.weight.requires_grad


def test_lora_with_a_trained_tied_embedding_exports_one_tied_matrix(tmp_path):
    """LoRA on the projections with modules_to_save=[embed]: the trained embedding is the head too, and
    the merged export is a tied checkpoint that computes what the trained model computes."""
    from llama_zh.checkpoint import write_native
    from llama_zh.train.finetune import export_stream

    model = apply_finetune(
        build_model(tiny_tied(), seed=0),
        FinetuneConfig(method="lora", dropout=0.0, target_modules=["wq", "w_up"], modules_to_save=["embed"]),
    )
    assert model.head.weight.requires_grad
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 300, (2, 16))
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    write_native(export_stream(model), tmp_path / "merged")
    merged = load_model(read_native(tmp_path / "merged"))
    assert merged.head.weight is merged.embed.weight
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), model(ids), atol=1e-5, rtol=0)


def test_unquantized_load_of_a_tied_checkpoint_stays_tied(tmp_path):
    model = build_model(tiny_tied(), seed=0)
    save_checkpoint(model, tmp_path / "ckpt")
    from llama_zh.convert import read_any

    loaded, _ = load_stream(read_any(tmp_path / "ckpt"), quant=QuantConfig())
    ids = torch.randint(0, 300, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=1e-6, rtol=0)
    assert loaded.head.weight.data_ptr() == loaded.embed.weight.data_ptr()


@pytest.mark.parametrize("quantize", ["quantize_head", "quantize_embedding"])
def test_int8_quantized_tied_head_or_embedding_gets_its_own_copy(tmp_path, quantize):
    """A tied model whose head (or embedding) is quantized cannot share one Parameter: the other keeps
    the full-precision matrix, and the logits stay close to the unquantized model's."""
    pytest.importorskip("bitsandbytes")
    from llama_zh.convert import read_any

    model = build_model(tiny_tied(), seed=0)
    save_checkpoint(model, tmp_path / "ckpt")
    quantized, report = load_stream(
        read_any(tmp_path / "ckpt"), quant=QuantConfig(name="int8", **{quantize: True}), backend="torch"
    )  # the backend keeps an unquantized head a torch Linear
    assert ("head" if quantize == "quantize_head" else "embed") in report.quant.quantized
    assert type(quantized.head if quantize == "quantize_embedding" else quantized.embed).__module__.startswith("torch")
    ids = torch.randint(0, 300, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(quantized(ids), model(ids), atol=0.05, rtol=0)


def make_hf_tied(tmp_path, with_lm_head=False):
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    model, path = random_hf_llama(tmp_path / "hf", rope_parameters=rope, max_positions=512, tied=True)
    if with_lm_head:  # as some tied checkpoints are stored: the head written out as a copy
        from safetensors.torch import load_file, save_file

        state = load_file(path / "model.safetensors")
        assert "lm_head.weight" not in state
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return model, path


@pytest.mark.parametrize("with_lm_head", [False, True])
def test_tied_hf_import_parity_and_round_trip(tmp_path, with_lm_head):
    from safetensors import safe_open

    hf_model, hf_dir = make_hf_tied(tmp_path, with_lm_head)
    native = convert(hf_dir, "hf", tmp_path / "native", "native")
    model, _ = load_checkpoint(native)
    assert model.config.tie_word_embeddings and model.head.weight is model.embed.weight
    ids = torch.randint(0, 300, (2, 100), generator=torch.Generator().manual_seed(0))  # past 64 original positions
    with torch.no_grad():
        ref = hf_model(ids).logits
        torch.testing.assert_close(model(ids), ref, atol=1e-5, rtol=0)
    back = convert(native, "native", tmp_path / "back", "hf")
    config = json.loads((back / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["rope_parameters"]["rope_type"] == "llama3"
    with safe_open(back / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ GGUF


def _gguf_fields(path):
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize(
    "rope, expected",
    [
        (
            {"type": "linear", "factor": 4.0, "original_max_position_embeddings": 32},
            {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0},
        ),
        (
            {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
            {
                "llama.rope.scaling.type": "yarn",
                "llama.rope.scaling.factor": 4.0,
                "llama.rope.scaling.original_context_length": 32,
                "llama.rope.scaling.yarn_beta_fast": 32.0,
                "llama.rope.scaling.yarn_beta_slow": 1.0,
            },
        ),
        (None, {}),
    ],
)
def test_gguf_rope_scaling_keys(tok, tmp_path, rope, expected):
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", tok, rope_scaling=rope)
    fields, tensors = _gguf_fields(convert(ckpt, "native", tmp_path / "m", "gguf"))
    assert {k: v for k, v in fields.items() if k.startswith("llama.rope.scaling.")} == pytest.approx(expected)
    assert "rope_freqs.weight" not in tensors


def test_gguf_llama3_writes_rope_freqs_and_tied_has_no_output(tok, tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "type": "llama3",
        "factor": 8.0,
        "original_max_position_embeddings": 64,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    }
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", tok, rope_scaling=rope, rope_theta=500000.0, tie_word_embeddings=True)
    fields, tensors = _gguf_fields(convert(ckpt, "native", tmp_path / "m", "gguf"))
    assert "output.weight" not in tensors and "token_embd.weight" in tensors
    assert not any(k.startswith("llama.rope.scaling.") for k in fields)
    # the divisors llama.cpp applies: transformers' unscaled over its llama3-scaled frequencies
    hf = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=512,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            **{k: v for k, v in rope.items() if k != "type"},
        },
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16))
    got = torch.from_numpy(tensors["rope_freqs.weight"].data.copy())
    assert got.shape == (8,)
    torch.testing.assert_close(got, plain / scaled, rtol=1e-6, atol=0)
    assert got.min() == 1.0 and got.max() == 8.0


@pytest.mark.parametrize(
    "rope, message",
    [
        ({"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 32}, "llama.cpp has no dynamic NTK"),
        (
            {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "attention_factor": 1.3},
            "YaRN with attention_factor/mscale",
        ),
    ],
)
def test_gguf_refuses_scalings_llama_cpp_cannot_run(tok, tmp_path, rope, message):
    from llama_zh.convert.gguf import GGUFError

    ckpt, _ = make_checkpoint(tmp_path / "ckpt", tok, rope_scaling=rope)
    with pytest.raises(GGUFError, match=message):
        convert(ckpt, "native", tmp_path / "m", "gguf")
    assert not (tmp_path / "m.gguf").exists()


# ------------------------------------------------------------------------------ Meta's Llama-3 layout


def test_meta_llama3_1_with_scaled_rope(tmp_path):
    hf_model, _ = make_hf_tied(tmp_path)  # its weights only: params.json carries the scaling
    write_meta_llama3(tmp_path / "meta", hf_model, {"use_scaled_rope": True})
    stream_config = read_meta_config(tmp_path / "meta")
    assert stream_config.rope_scaling == {
        "type": "llama3",
        "factor": 8.0,
        "original_max_position_embeddings": 8192,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    }
    assert stream_config.max_seq_len == 131072 and stream_config.rope_theta == 500000.0
    assert stream_config.n_kv_heads == 2 and stream_config.vocab_size == 300
    assert not stream_config.tie_word_embeddings  # output.weight present


def test_meta_llama3_2_without_output_is_tied_with_factor_32(tmp_path):
    hf_model, _ = make_hf_tied(tmp_path)
    write_meta_llama3(tmp_path / "meta", hf_model, {"use_scaled_rope": True}, drop_output=True)
    config = read_meta_config(tmp_path / "meta")
    assert config.tie_word_embeddings and config.rope_scaling["factor"] == 32.0


def test_meta_params_with_unknown_keys_are_refused(tmp_path):
    hf_model, _ = make_hf_tied(tmp_path)
    write_meta_llama3(tmp_path / "meta", hf_model, {"use_scaled_rope": True, "rope_scalling": 8, "moe": 1})
    with pytest.raises(ConfigError) as e:
        convert(tmp_path / "meta", "meta", tmp_path / "native", "native")
    assert "params.json: unknown keys moe, rope_scalling" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "native").exists()


def read_meta_config(directory):
    from llama_zh.convert import meta

    return meta.read(directory).config


def test_meta_llama3_release_tokenizer_model_becomes_a_working_tokenizer(bpe_tokenizer, tmp_path):
    """Meta's Llama-3 directory: tokenizer.model is a tiktoken rank file; stage=convert turns it into
    a tokenizer.json with Llama-3's special tokens and chat template, beside the weights."""
    from bpe_fixture import MIXED, write_rank_file
    from helpers import llama_zh

    from llama_zh.data.chat_template import ChatTemplate
    from llama_zh.generate import SamplingConfig, generate
    from llama_zh.tokenizer import Tokenizer

    source = Tokenizer(bpe_tokenizer)
    cfg = transformers.LlamaConfig(
        vocab_size=source.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )
    torch.manual_seed(2)
    write_meta_llama3(
        tmp_path / "meta", transformers.LlamaForCausalLM(cfg).eval(), {"use_scaled_rope": True}, drop_output=True
    )
    write_rank_file(bpe_tokenizer, tmp_path / "meta" / "tokenizer.model")
    native = tmp_path / "native"
    llama_zh(
        "stage=convert",
        f"stage.src={tmp_path / 'meta'}",
        "stage.src_format=meta",
        f"stage.dst={native}",
        "stage.dst_format=native",
        run_dir=tmp_path / "run",
    )
    assert (native / "tokenizer.json").is_file() and not (native / "tokenizer.model").exists()
    model, tok = load_checkpoint(native)
    assert tok.kind == "bpe" and model.config.tie_word_embeddings and model.config.rope_scaling["factor"] == 32.0
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.eot_id) == (
        source.vocab_size,
        source.bos_id,
        source.eos_id,
        source.eot_id,
    )
    assert tok.stop_ids == [source.eos_id, source.eot_id]
    assert tok.chat_template == ChatTemplate.named("llama-3").source
    for text in MIXED:
        assert tok.encode(text, bos=True) == source.encode(text, bos=True)
    new = generate(
        model, tok.encode("你好", bos=True), SamplingConfig(temperature=0.0, max_new_tokens=4), tokenizer=tok
    )
    assert 0 < len(new) <= 4 and all(0 <= i < tok.vocab_size for i in new)
