"""Logit parity with transformers through the production converters (fp32, CPU)."""

import json

import pytest
import torch
from helpers import meta_state_dict, random_hf_llama, write_meta_llama3

transformers = pytest.importorskip("transformers")

from llama_zh.convert import convert, load_checkpoint
from llama_zh.model import KVCache

SHAPES = {
    # name: (hidden, layers, heads, kv heads, ffn, vocab, eps, theta)
    "gqa": (64, 2, 4, 2, 176, 49953, 1e-5, 10000.0),
    "mha": (96, 3, 6, 6, 256, 1000, 1e-6, 500000.0),
    "mqa": (64, 2, 4, 1, 128, 777, 1e-6, 10000.0),
}


def make_hf(tmp_path, shape, safe=True, max_shard_size=None):
    hidden, layers, heads, kv, ffn, vocab, eps, theta = SHAPES[shape]
    return random_hf_llama(
        tmp_path / f"hf_{shape}",
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        vocab_size=vocab,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv,
        ffn=ffn,
        eps=eps,
        safe_serialization=safe,
        max_shard_size=max_shard_size,
    )


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("shape", list(SHAPES))
def test_hf_to_native_logits(tmp_path, shape):
    hf_model, hf_dir = make_hf(tmp_path, shape)
    native = convert(hf_dir, "hf", tmp_path / "native", "native")
    model, _ = load_checkpoint(native)
    ids = torch.randint(0, SHAPES[shape][5], (2, 23))
    ref = hf_logits(hf_model, ids)
    with torch.no_grad():
        got = model(ids)
    assert got.shape == ref.shape == (2, 23, SHAPES[shape][5])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_sharded_bin_checkpoint(tmp_path):
    # transformers 5 saves safetensors only; write the older pytorch_model-*.bin layout by hand.
    hf_model, hf_dir = make_hf(tmp_path, "gqa")
    bin_dir = tmp_path / "hf_bin"
    bin_dir.mkdir()
    for f in ("config.json", "generation_config.json"):
        (bin_dir / f).write_bytes((hf_dir / f).read_bytes())
    sd = hf_model.state_dict()
    keys = list(sd)
    weight_map = {}
    for n, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"pytorch_model-0000{n + 1}-of-00002.bin"
        torch.save({k: sd[k].clone() for k in part}, bin_dir / name)
        weight_map |= {k: name for k in part}
    (bin_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model, _ = load_checkpoint(bin_dir)  # an HF directory loads directly too
    ids = torch.randint(0, 49953, (1, 9))
    torch.testing.assert_close(model(ids), hf_logits(hf_model, ids), atol=1e-5, rtol=0)


def test_sharded_safetensors_and_native_shards(tmp_path):
    hf_model, hf_dir = make_hf(tmp_path, "mha", max_shard_size="500KB")
    assert (hf_dir / "model.safetensors.index.json").is_file()
    native = convert(hf_dir, "hf", tmp_path / "native", "native", max_shard_bytes=400_000)
    index = json.loads((native / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, _ = load_checkpoint(native)
    ids = torch.randint(0, 1000, (1, 9))
    torch.testing.assert_close(model(ids), hf_logits(hf_model, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", ["gqa", "mha"])
def test_native_to_hf_loads_in_transformers(tmp_path, shape):
    hf_model, hf_dir = make_hf(tmp_path, shape)
    native = convert(hf_dir, "hf", tmp_path / "native", "native")
    exported = convert(native, "native", tmp_path / "export", "hf")
    config = json.loads((exported / "config.json").read_text())
    assert config["vocab_size"] == SHAPES[shape][5]
    assert (exported / "generation_config.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    ids = torch.randint(0, SHAPES[shape][5], (2, 11))
    torch.testing.assert_close(hf_logits(back, ids), hf_logits(hf_model, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", ["gqa", "mha"])
def test_hf_to_tencentpretrain_to_native(tmp_path, shape):
    from llama_zh.config import ModelConfig

    hf_model, hf_dir = make_hf(tmp_path, shape)
    tp_file = convert(hf_dir, "hf", tmp_path / "tp" / "model.bin", "tencentpretrain")
    state = torch.load(tp_file, weights_only=True)
    assert "encoder.transformer.0.self_attn.linear_layers.0.weight" in state
    assert "target.lm.output_layer.weight" in state
    hidden, layers, heads, kv, ffn, vocab, eps, theta = SHAPES[shape]
    shape_cfg = ModelConfig(
        vocab_size=vocab,
        dim=hidden,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=kv,
        ffn_dim=ffn,
        norm_eps=eps,
        rope_theta=theta,
        max_seq_len=256,
    )
    native = convert(tp_file, "tencentpretrain", tmp_path / "native", "native", model=shape_cfg)
    model, _ = load_checkpoint(native)
    ids = torch.randint(0, vocab, (2, 13))
    torch.testing.assert_close(model(ids), hf_logits(hf_model, ids), atol=1e-5, rtol=0)


def write_meta(hf_model, directory, n_shards):
    """A fake Meta release generated from an HF model: keys, permutation and shard split per
    docs/reference.md#formats."""
    cfg = hf_model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    full = meta_state_dict(hf_model) | {"rope.freqs": torch.zeros(4)}

    def split_dim(k):
        return (
            None
            if k.endswith("norm.weight") or k == "rope.freqs"
            else 1
            if k.endswith(("wo.weight", "w2.weight")) or k.startswith("tok_embeddings")
            else 0
        )

    directory.mkdir(parents=True)
    for r in range(n_shards):
        shard = {
            k: (v.clone() if split_dim(k) is None else v.chunk(n_shards, dim=split_dim(k))[r].clone())
            for k, v in full.items()
        }
        torch.save(shard, directory / f"consolidated.{r:02d}.pth")
    params = {
        "dim": cfg.hidden_size,
        "n_layers": cfg.num_hidden_layers,
        "n_heads": heads,
        "multiple_of": 32,
        "norm_eps": cfg.rms_norm_eps,
        "vocab_size": -1,
        "rope_theta": cfg.rope_parameters["rope_theta"],
    }
    if kv != heads:
        params["n_kv_heads"] = kv
    (directory / "params.json").write_text(json.dumps(params))


@pytest.mark.parametrize(
    "release,shape,n_shards", [("llama2", "mha", 1), ("llama2", "mha", 2), ("llama2", "gqa", 2), ("llama3", None, 1)]
)
def test_meta_to_native(tmp_path, release, shape, n_shards):
    """A Meta release (Llama-2's layout, sharded; Llama-3's params.json with ffn_dim_multiplier, theta
    500000, no use_scaled_rope) converts to weights that give transformers' logits."""
    if release == "llama2":
        hf_model, _ = make_hf(tmp_path, shape)
        write_meta(hf_model, tmp_path / "meta", n_shards)
    else:
        rope = {"rope_type": "default", "rope_theta": 500000.0}
        hf_model, _ = random_hf_llama(tmp_path / "hf", rope_parameters=rope, seed=1)
        write_meta_llama3(tmp_path / "meta", hf_model, {})
    native = convert(tmp_path / "meta", "meta", tmp_path / "native", "native")
    model, _ = load_checkpoint(native)
    if release == "llama3":
        assert model.config.max_seq_len == 8192 and model.config.rope_scaling is None
    ids = torch.randint(0, hf_model.config.vocab_size, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_logits(hf_model, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_cached_decoding_equals_full_forward(tmp_path, shape):
    _, hf_dir = make_hf(tmp_path, shape)
    model, _ = load_checkpoint(hf_dir)
    ids = torch.randint(0, SHAPES[shape][5], (2, 20))
    full = model(ids)
    cache = KVCache.allocate(model.config, batch=2, max_len=32)
    parts = [model(ids[:, :7], cache), model(ids[:, 7:12], cache)]
    parts += [model(ids[:, t : t + 1], cache) for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_the_inference_loader_reads_hf_and_meta_directories(tmp_path, layout):
    """llama_zh.infer.load takes every whole-model layout read_any reads, not only native directories."""
    from llama_zh.infer import load

    hf_model, hf_dir = make_hf(tmp_path, "mha")
    if layout == "meta":
        write_meta(hf_model, tmp_path / "meta", 2)
    model, tokenizer, _ = load(hf_dir if layout == "hf" else tmp_path / "meta", backend="torch")
    ids = torch.randint(0, SHAPES["mha"][5], (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_logits(hf_model, ids), atol=1e-5, rtol=0)
    assert tokenizer is None  # neither directory has one


@pytest.mark.parametrize("what", ["gguf", "peft"])
def test_the_inference_loader_refuses_what_read_any_cannot_read(tmp_path, what):
    from llama_zh.infer import load
    from llama_zh.tensor_io import CheckpointError

    if what == "gguf":
        path = tmp_path / "m.gguf"
        path.write_bytes(b"GGUF" + bytes(20))
    else:
        path = tmp_path / "adapter"
        path.mkdir()
        (path / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="GGUF file|PEFT adapter"):
        load(path)
