"""The model's shapes, named configs, and numerics that parity tests do not reach."""

import resource

import pytest
import torch

from llama_zh.config import ConfigError, ModelConfig, available_names
from llama_zh.model import KVCache, RMSNorm, build_model

# Parameter counts of the published checkpoints (untied head, no biases).
PUBLISHED = {"llama_7b": 6_738_415_616, "llama_13b": 13_015_864_320, "llama2_70b": 68_976_648_192}


def test_named_configs_cover_anchors():
    assert set(available_names()) >= {"tiny", "llama_7b", "llama_13b", "llama_33b", "llama_65b", "llama2_7b",
                                      "llama2_13b", "llama2_70b", "chinese_llama_7b"}
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
        ModelConfig.from_dict({"dim": 64, "hidden": 3})
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
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_fused_projections_match_separate_ones_and_keep_the_state_dict():
    config = ModelConfig.from_name("tiny").with_vocab(300)
    model = build_model(config, seed=0).eval()
    ids = torch.randint(0, 300, (2, 12))
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        separate = model(ids)
    assert model.fuse_projections() == 2 * config.n_layers
    assert model.state_dict().keys() == keys.keys()
    assert all(torch.equal(v, keys[k]) for k, v in model.state_dict().items())
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in keys.values())
    calls = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda mod, inp, out: calls.append(mod))
    with torch.no_grad():
        fused = model(ids)
    # wq/wk/wv and w_gate/w_up ran as two fused products per block: only wo, w_down and the head are modules
    assert len(calls) == 2 * config.n_layers + 1
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
    # A load into the parameters reaches the fused weights: they share memory.
    with torch.no_grad():
        model.layers[0].attn.wk.weight.mul_(2)
        model.layers[1].ffn.w_up.weight.zero_()
    calls.clear()
    with torch.no_grad():
        loaded_fused = model(ids)
    assert len(calls) == 2 * config.n_layers + 1
    for block in model.layers:
        block.attn.wqkv = block.ffn.w_gate_up = None
    with torch.no_grad():
        torch.testing.assert_close(loaded_fused, model(ids), rtol=1e-5, atol=1e-5)


def test_fused_model_trains_through_the_separate_projections():
    config = ModelConfig.from_name("tiny").with_vocab(300)
    model = build_model(config, seed=0)
    model.fuse_projections()
    model(torch.randint(0, 300, (2, 8))).sum().backward()  # autograd: the fused products are not used
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "attn.w" in n)
    model.double()  # new storage: the stale fused weights must not be used
    with torch.no_grad():
        out = model(torch.randint(0, 300, (1, 4)))
    assert out.dtype == torch.float64


def test_last_only_gives_the_last_position_and_inference_tables_serve_training():
    config = ModelConfig.from_name("tiny").with_vocab(300)
    model = build_model(config, seed=0)
    ids = torch.randint(0, 300, (2, 9))
    with torch.inference_mode():  # the rope tables are first built here ...
        full, last = model(ids), model(ids, last_only=True)
    assert last.shape == (2, 1, 300)
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
    model(ids).sum().backward()  # ... and must still be usable by autograd


def test_column_major_wide_weights_give_the_same_logits_and_save_as_before(tmp_path):
    from llama_zh import load_checkpoint, save_checkpoint

    config = ModelConfig.from_name("tiny").with_vocab(600)  # head 600 x 128 and gate/up 704 x 128 are wide
    model = build_model(config, seed=0).eval()
    ids = torch.randint(0, 600, (3, 7))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(ids)
    model.fuse_projections(column_major_wide=True)
    assert model.head.weight.stride() == (1, 600)  # laid out in-major
    assert model.layers[0].ffn.w_gate.weight.stride()[0] == 1
    assert model.layers[0].attn.wq.weight.stride()[1] == 1  # q/k/v (256 x 128) is not wide: unchanged
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    saved = save_checkpoint(model, tmp_path / "ckpt")
    loaded, _ = load_checkpoint(saved)
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
