"""RoPE scaling (linear, dynamic, yarn, llama3) against transformers, and its configuration errors.

Random transformers models of each scaling type go through the production converters; the logits must
agree in fp32 to 1e-5 at lengths inside and beyond the original context."""

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import random_hf_llama

from llama_zh.checkpoint import read_native
from llama_zh.config import ConfigError, ModelConfig
from llama_zh.convert import convert, load_checkpoint
from llama_zh.model import KVCache, build_model

ORIGINAL = 64  # the "pretraining" context of the fixtures
VOCAB = 300
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn_mscale": {
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": ORIGINAL,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
        "beta_fast": 16.0,
        "beta_slow": 2.0,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": ORIGINAL,
    },
}
LENGTHS = (40, 150)  # inside and beyond ORIGINAL


def make_hf(tmp_path, scaling, tied=False, theta=10000.0, name="hf"):
    max_positions = ORIGINAL if scaling["rope_type"] == "dynamic" else 4 * ORIGINAL
    rope = {**scaling, "rope_theta": theta}
    return random_hf_llama(
        tmp_path / name, rope_parameters=rope, max_positions=max_positions, tied=tied, vocab_size=VOCAB
    )


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_hf_scaled_rope_logits(tmp_path, kind):
    hf_model, hf_dir = make_hf(tmp_path, SCALINGS[kind])
    model, _ = load_checkpoint(convert(hf_dir, "hf", tmp_path / "native", "native"))
    assert model.config.rope_type == SCALINGS[kind]["rope_type"]
    if kind in ("linear", "dynamic"):  # no original length in config.json: max_position_embeddings is it
        scaling = model.config.rope_scaling
        assert model.config.max_seq_len == scaling["original_max_position_embeddings"] * scaling["factor"]
    for length in LENGTHS:
        ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            ref = hf_model(ids).logits
            got = model(ids)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0, msg=f"{kind} at length {length}")


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3"])
def test_scaling_changes_long_logits(tmp_path, kind):
    """The parity above must come from the scaling: the same weights without it disagree past the
    original context (and dynamic scaling agrees inside it, where it does nothing)."""
    _, hf_dir = make_hf(tmp_path, SCALINGS[kind])
    scaled, _ = load_checkpoint(convert(hf_dir, "hf", tmp_path / "native", "native"))
    plain = build_model(ModelConfig(**{**scaled.config.to_dict(), "rope_scaling": None}))
    plain.load_state_dict(scaled.state_dict())
    ids = torch.randint(0, VOCAB, (1, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (scaled(ids) - plain(ids)).abs().max() > 1e-3
        short = ids[:, :40]
        same = torch.equal(scaled(short), plain(short))
    assert same == (kind == "dynamic")


@pytest.mark.parametrize("kind", ["dynamic", "yarn"])
def test_cached_decoding_matches_full_forward(tmp_path, kind):
    """Token-by-token decoding across the original context (60 -> 80 > 64): the cached keys stay
    rotated as they were written and each step's tables are those of its length, as in transformers'
    own cached decoding."""
    hf_model, hf_dir = make_hf(tmp_path, SCALINGS[kind])
    model, _ = load_checkpoint(convert(hf_dir, "hf", tmp_path / "native", "native"))
    ids = torch.randint(0, VOCAB, (1, 80), generator=torch.Generator().manual_seed(2))
    cache = KVCache.allocate(model.config, 1, 80)
    hf_cache = transformers.DynamicCache(config=hf_model.config)
    with torch.no_grad():
        model(ids[:, :60], cache)
        hf_model(ids[:, :60], cache=hf_cache, use_cache=True)
        for t in range(60, 80):
            got = model(ids[:, t : t + 1], cache)[:, -1]
            ref = hf_model(ids[:, t : t + 1], cache=hf_cache, use_cache=True).logits[:, -1]
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0, msg=f"{kind} step {t}")


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_hf_round_trip_keeps_scaling(tmp_path, kind):
    hf_model, hf_dir = make_hf(tmp_path, SCALINGS[kind])
    native = convert(hf_dir, "hf", tmp_path / "native", "native")
    back = convert(native, "native", tmp_path / "back", "hf")
    exported = json.loads((back / "config.json").read_text())
    assert exported["rope_parameters"]["rope_type"] == SCALINGS[kind]["rope_type"]
    again = read_native(convert(back, "hf", tmp_path / "again", "native")).config
    assert dataclasses.replace(again, name="x") == dataclasses.replace(read_native(native).config, name="x")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    ids = torch.randint(0, VOCAB, (1, 150), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, hf_model(ids).logits, atol=1e-5, rtol=0)


def _config(**rope):
    return dict(vocab_size=10, dim=32, n_layers=1, n_heads=2, ffn_dim=64, rope_scaling=rope)


@pytest.mark.parametrize(
    "rope, field",
    [
        ({"type": "ntk", "factor": 2.0, "original_max_position_embeddings": 64}, "model.rope_scaling.type"),
        ({"type": "linear", "factor": 0.0, "original_max_position_embeddings": 64}, "model.rope_scaling.factor"),
        ({"type": "linear", "factor": -2, "original_max_position_embeddings": 64}, "model.rope_scaling.factor"),
        ({"type": "yarn", "factor": 4.0}, "model.rope_scaling.original_max_position_embeddings"),
        (
            {"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64, "low_freq_factor": 1.0},
            "model.rope_scaling.high_freq_factor",
        ),
        (
            {"type": "linear", "factor": 2.0, "original_max_position_embeddings": 64, "fator": 2},
            "model.rope_scaling.fator",
        ),
        (
            {"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 64.5},
            "model.rope_scaling.original_max_position_embeddings",
        ),
    ],
)
def test_bad_rope_scaling_names_the_field(rope, field):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**_config(**rope))
    message = str(e.value)
    assert "\n" not in message and message.startswith(field), message


def test_hf_unknown_rope_type_refused(tmp_path):
    _, hf_dir = make_hf(tmp_path, SCALINGS["linear"])
    config = json.loads((hf_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 2.0}
    config.pop("rope_scaling", None)
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="config.json: rope scaling 'longrope' is not supported"):
        convert(hf_dir, "hf", tmp_path / "native", "native")
    assert not (tmp_path / "native").exists()


# ------------------------------------------------------------------------------ long-context runs


def test_continued_pretraining_with_scaling_then_perplexity_at_lengths(tmp_path):
    """A checkpoint of 128 positions continued at 256 with linear scaling (stage.init_from), then
    perplexity at 64 and 512 tokens: the scaling and the longer limit are in the new checkpoint,
    and the 512-token windows (past its limit) are measured, not refused."""
    from helpers import llama_zh
    from tiny_checkpoints import make_checkpoint, train_tokenizer

    ckpt, _ = make_checkpoint(tmp_path / "ckpt", train_tokenizer(tmp_path / "tok"))  # max_seq_len 128
    env = {"LLAMA_ZH_DATA": str(tmp_path / "data")}
    rope = "model.rope_scaling={type:linear,factor:2.0,original_max_position_embeddings:128}"
    llama_zh(
        f"stage.init_from={ckpt}",
        rope,
        "data.seq_len=256",
        "data.batch_size=2",
        "debug=fast",
        "trainer.max_steps=2",
        "logger=csv",
        run_dir=tmp_path / "run",
        env_extra=env,
    )
    final = tmp_path / "run" / "checkpoints" / "final"
    config = read_native(final).config
    assert config.max_seq_len == 256 and config.rope_scaling == {
        "type": "linear",
        "factor": 2.0,
        "original_max_position_embeddings": 128,
    }
    out = tmp_path / "eval.json"
    llama_zh(
        "stage=eval",
        f"stage.checkpoint={final}",
        "stage.lengths=[64,512]",
        "stage.max_batches=1",
        "stage.batch_size=2",
        "stage.speed_probe_tokens=0",
        f"stage.output={out}",
        "logger=csv",
        run_dir=tmp_path / "eval",
        env_extra=env,
    )
    report = json.loads(out.read_text())
    # one batch of 2 windows of 512 from each of 2 sources, and the same tokens in windows of 64
    assert {k: v["tokens"] for k, v in report["perplexity"].items() if k.startswith("all@")} == {
        "all@64": 2 * 2 * 512,
        "all@512": 2 * 2 * 512,
    }
    assert report["protocol"]["perplexity"]["window"] == [64, 512]


def test_bad_eval_lengths_are_refused_before_loading(tmp_path):
    from helpers import llama_zh

    result = llama_zh(
        "stage=eval",
        f"stage.checkpoint={tmp_path / 'missing'}",
        "stage.lengths=[256,0]",
        "logger=csv",
        run_dir=tmp_path / "eval",
        check=False,
        env_extra={"LLAMA_ZH_DATA": str(tmp_path / "data")},
    )
    assert result.returncode == 1
    assert "llama_zh: error: stage.lengths: [256, 0]; expected a list of window lengths" in result.stderr


def test_init_from_applies_context_overrides_and_checks_the_rest(tmp_path):
    from omegaconf import OmegaConf
    from tiny_checkpoints import make_checkpoint, train_tokenizer

    from llama_zh.stages.pretrain import check_init_shape, split_context, with_context

    ckpt, _ = make_checkpoint(tmp_path / "ckpt", train_tokenizer(tmp_path / "tok"))  # max_seq_len 128
    stream = read_native(ckpt)
    rope = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    model = {**stream.config.to_dict(), "rope_scaling": rope}
    cfg = OmegaConf.create({"stage": {"init_from": str(ckpt)}, "model": model})
    given = ["model=tiny", "model.rope_scaling={type:yarn,factor:4.0,original_max_position_embeddings:128}"]
    context, shape = split_context(given)
    assert (context, shape) == (given[1:], given[:1])
    check_init_shape(cfg, stream, shape, context)  # same shape: the scaling alone differs, and is asked for
    config = with_context(cfg, stream, context).config
    assert config.rope_scaling["type"] == "yarn" and config.max_seq_len == 512  # 128 x 4
    assert (
        with_context(
            OmegaConf.merge(cfg, {"model": {"max_seq_len": 300}}), stream, context + ["model.max_seq_len=300"]
        ).config.max_seq_len
        == 300
    )
    with pytest.raises(ConfigError, match=r"max_seq_len 300 \(checkpoint 128\)"):  # not asked for as context
        check_init_shape(OmegaConf.merge(cfg, {"model": {"max_seq_len": 300}}), stream, shape, context)
