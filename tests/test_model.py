"""The model's shapes, named configs, and numerics that parity tests do not reach."""

import resource

import pytest
import torch

from llama_zh.config import ConfigError, ModelConfig, available_names, from_mapping
from llama_zh.model import KVCache, RMSNorm, build_model

# Parameter counts of the published checkpoints (untied head, no biases).
PUBLISHED = {"llama_7b": 6_738_415_616, "llama_13b": 13_015_864_320, "llama2_70b": 68_976_648_192}


def test_named_configs_cover_the_published_models():
    assert set(available_names()) >= {
        "tiny",
        "llama_7b",
        "llama_13b",
        "llama_33b",
        "llama_65b",
        "llama2_7b",
        "llama2_13b",
        "llama2_70b",
        "chinese_llama_7b",
    }
    assert ModelConfig.from_name("chinese_llama_7b").vocab_size == 49953
    assert ModelConfig.from_name("llama2_70b").n_kv_heads == 8
    assert ModelConfig.from_name("llama_65b").norm_eps == 1e-5
    tiny = ModelConfig.from_name("tiny")
    assert tiny.n_kv_heads < tiny.n_heads and tiny.vocab_size is None


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_meta_device_build_takes_no_memory(name):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build_model(ModelConfig.from_name(name), device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert n == PUBLISHED[name] == model.config.n_params
    assert all(p.is_meta for p in model.parameters())
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200  # a materialised 7B model would be 27 GB


def test_bad_configs_name_the_field():
    with pytest.raises(ConfigError, match="model.n_heads=6 is not divisible by model.n_kv_heads=4"):
        ModelConfig(dim=96, n_heads=6, n_kv_heads=4)
    with pytest.raises(ConfigError, match="model.dim=100 is not divisible"):
        ModelConfig(dim=100, n_heads=8)
    with pytest.raises(ConfigError, match="unknown field"):
        from_mapping(ModelConfig, {"dim": 64, "hidden": 3}, "model", what="field")
    with pytest.raises(ConfigError, match="unknown model name"):
        ModelConfig.from_name("llama_8b")


def test_rmsnorm_computes_in_fp32():
    norm = RMSNorm(64, 1e-6)
    x = (torch.randn(2, 3, 64) * 300).bfloat16()
    x32 = x.float()
    ref = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    torch.testing.assert_close(norm(x).float(), ref.float(), atol=0, rtol=0)
    # Summing squares in bf16 instead would not match: the fp32 path is what is being tested.
    naive = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert not torch.equal(naive.float(), ref.float())


def test_logits_shape_and_causality():
    config = ModelConfig.from_name("tiny").with_vocab(300)
    model = build_model(config, seed=0)
    ids = torch.randint(0, 300, (2, 10))
    logits = model(ids)
    assert logits.shape == (2, 10, 300)
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 300
    torch.testing.assert_close(model(changed)[:, :7], logits[:, :7])  # the future never leaks back


def test_too_long_input_is_refused():
    config = ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=16)
    model = build_model(config, seed=0)
    with pytest.raises(ValueError, match="exceeds the limit of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = KVCache.allocate(config, 1, 8)
    model(torch.zeros(1, 8, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="exceeds the limit of 8"):
        model(torch.zeros(1, 1, dtype=torch.long), cache)


def test_seeded_init_is_reproducible():
    config = ModelConfig.from_name("tiny").with_vocab(100)
    a, b = build_model(config, seed=3), build_model(config, seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=False):
        assert torch.equal(p, q), n


def test_last_only_gives_the_last_position_and_inference_tables_serve_training():
    config = ModelConfig.from_name("tiny").with_vocab(300)
    model = build_model(config, seed=0)
    ids = torch.randint(0, 300, (2, 9))
    with torch.inference_mode():  # the rope tables are first built here ...
        full, last = model(ids), model(ids, last_only=True)
    assert last.shape == (2, 1, 300)
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
    model(ids).sum().backward()  # ... and must still be usable by autograd
