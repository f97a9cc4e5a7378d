"""finetune=prefix (P-Tuning v2): only the prefix trains, the cache path equals a plain attention over
prefix + tokens, folding the MLP changes nothing, save/load checks, and the CLI end to end."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama_zh.config import ConfigError, ModelConfig
from llama_zh.dpo import adapters_only
from llama_zh.errors import LlamaZhError
from llama_zh.model import apply_rope, build_model
from llama_zh.prefix import (
    PREFIX_CONFIG,
    PREFIX_FILE,
    FrozenPrefix,
    allocate_cache,
    attach_prefix,
    fold,
    load_prefix,
    model_fingerprint,
    read_prefix,
    save_prefix,
)
from llama_zh.train.finetune import FinetuneConfig, adapters_disabled, apply_finetune, count_trainable

sys.path.insert(0, str(Path(__file__).parent))
from helpers import REPO, llama_zh
from tiny_checkpoints import make_checkpoint, train_tokenizer

CONFIG = ModelConfig(name="t", vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=64)
P = 5


def prefixed(hidden=0, seed=0, scale=1.0):
    """A random base with a prefix whose keys and values are of the scale of real ones (`scale`), so
    that it visibly changes the output."""
    model = apply_finetune(
        build_model(CONFIG, seed=seed), FinetuneConfig(method="prefix", prefix_len=P, prefix_hidden=hidden)
    )
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.prefix.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return model.eval()


def tokens(B=2, T=11, seed=5):
    return torch.randint(0, CONFIG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def reference_logits(model, keys, values, ids):
    """An uncached forward over prefix + tokens, written out here: every layer's attention sees the
    prefix's keys/values (no rope) then its tokens (rope at positions P, P+1, ...), causally."""
    B, T = ids.shape
    cfg = model.config
    cos, sin = model._rope(P + T, ids.device, torch.float32)
    cos, sin = cos[P : P + T, None], sin[P : P + T, None]
    visible = torch.cat((torch.ones(T, P, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()), dim=1)
    x = model.embed(ids)
    for i, block in enumerate(model.layers):
        attn, h = block.attn, block.attn_norm(x)
        q = apply_rope(attn.wq(h).view(B, T, cfg.n_heads, cfg.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(attn.wk(h).view(B, T, cfg.n_kv_heads, cfg.head_dim), cos, sin).transpose(1, 2)
        v = attn.wv(h).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        k = torch.cat((keys[i].expand(B, -1, -1, -1), k), dim=2).repeat_interleave(cfg.n_heads // cfg.n_kv_heads, 1)
        v = torch.cat((values[i].expand(B, -1, -1, -1), v), dim=2).repeat_interleave(cfg.n_heads // cfg.n_kv_heads, 1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(cfg.head_dim)
        y = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v  # (B, H, T, D)
        x = x + attn.wo(y.transpose(1, 2).reshape(B, T, -1))
        x = x + block.ffn(block.ffn_norm(x))
    return model.head(model.norm(x))


# -------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("hidden", [0, 32])
def test_only_the_prefix_gets_gradients(hidden):
    model = prefixed(hidden).train()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("prefix.")}
    logits = model(tokens())
    F.cross_entropy(logits.flatten(0, 1), tokens(seed=6).flatten()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    prefix_params = {n for n, _ in model.named_parameters() if n.startswith("prefix.")}
    assert with_grad == prefix_params and prefix_params
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in prefix_params)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == prefix_params
    trainable, total = count_trainable(model)
    assert (
        trainable == sum(model.get_parameter(n).numel() for n in prefix_params) and total - trainable == CONFIG.n_params
    )
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)


@pytest.mark.parametrize("hidden", [0, 32])
def test_the_prefixed_forward_is_attention_over_prefix_and_tokens(hidden):
    model = prefixed(hidden)
    ids = tokens()
    with torch.no_grad():
        keys, values = model.prefix()
        expected = reference_logits(model, keys, values, ids)
        torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=0)
        plain = build_model(CONFIG, seed=0).eval()(ids)
    assert (model(ids) - plain).abs().max() > 1e-2  # the prefix matters


def test_incremental_decoding_with_the_prefix_equals_one_forward():
    model = prefixed()
    ids = tokens(T=9)
    with torch.no_grad():
        full = model(ids)  # (B, T, V)
        cache = allocate_cache(model, 2, 9)
        steps = [model(ids[:, :4], cache)]  # a prefill, then one token at a time
        steps += [model(ids[:, t : t + 1], cache) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert cache.pos == P + 9


def test_left_padded_rows_decode_as_they_would_alone():
    model = prefixed()
    long, short = tokens(B=1, T=8)[0], tokens(B=1, T=5, seed=9)[0]
    ids = torch.stack((long, torch.cat((torch.zeros(3, dtype=torch.long), short))))
    with torch.no_grad():
        cache = allocate_cache(model, 2, 10, left_pad=[0, 3])
        first = model(ids, cache, last_only=True)[:, -1]
        nxt = torch.tensor([[7], [11]])
        second = model(nxt, cache, last_only=True)[:, -1]
        alone = [model(long[None])[0, -1], model(short[None])[0, -1]]
        again = [model(torch.cat((long, nxt[0]))[None])[0, -1], model(torch.cat((short, nxt[1]))[None])[0, -1]]
    torch.testing.assert_close(first, torch.stack(alone), atol=1e-5, rtol=0)
    torch.testing.assert_close(second, torch.stack(again), atol=1e-5, rtol=0)


def test_switched_off_the_model_is_the_base_and_dpo_uses_that_as_its_reference():
    model = prefixed()
    assert adapters_only(model)
    with torch.no_grad(), adapters_disabled(model):
        off = model(tokens())
    assert torch.equal(off, build_model(CONFIG, seed=0).eval()(tokens()))
    assert model.prefix.enabled


# ------------------------------------------------------------------------------------- save, load


def test_folding_the_mlp_gives_the_same_logits(tmp_path):
    model = prefixed(hidden=32, scale=0.3)
    save_prefix(tmp_path, model.prefix, CONFIG, model_fingerprint(model))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / PREFIX_FILE))
    assert sorted(saved) == ["layers.0.k", "layers.0.v", "layers.1.k", "layers.1.v"]  # no MLP left
    assert saved["layers.1.v"].shape == (CONFIG.n_kv_heads, P, CONFIG.head_dim)
    meta = json.loads((tmp_path / PREFIX_CONFIG).read_text())
    assert meta["prefix_len"] == P and meta["trained_with_mlp"] and meta["base_fingerprint"] == model_fingerprint(model)

    plain = build_model(CONFIG, seed=0).eval()
    assert load_prefix(plain, tmp_path) is not None
    assert isinstance(plain.prefix, FrozenPrefix)
    with torch.no_grad():
        assert torch.equal(plain(tokens()), model(tokens()))


def test_a_prefix_on_other_base_weights_is_used_with_a_warning(tmp_path, caplog):
    model = prefixed()
    save_prefix(tmp_path, model.prefix, CONFIG, model_fingerprint(model))
    other = build_model(CONFIG, seed=3).eval()
    with caplog.at_level("WARNING"):
        load_prefix(other, tmp_path)
    assert "trained on other base weights" in caplog.text


def test_a_prefix_that_does_not_fit_is_refused_naming_the_tensor(tmp_path):
    from safetensors.torch import save_file

    model = prefixed()
    save_prefix(tmp_path, model.prefix, CONFIG, None)
    state = fold(model.prefix)

    deeper = ModelConfig(**{**CONFIG.to_dict(), "n_layers": 3})
    with pytest.raises(LlamaZhError, match=r"missing tensor layers\.2\.k \(the model has 3 layers\)"):
        read_prefix(tmp_path, deeper)
    shallower = ModelConfig(**{**CONFIG.to_dict(), "n_layers": 1})
    with pytest.raises(LlamaZhError, match=r"unexpected tensor layers\.1\.k"):
        read_prefix(tmp_path, shallower)
    more_heads = ModelConfig(**{**CONFIG.to_dict(), "n_kv_heads": 4})
    with pytest.raises(LlamaZhError, match=r"layers\.0\.k has shape \(2, 5, 16\), the model expects \(4, 5, 16\)"):
        read_prefix(tmp_path, more_heads)

    save_file({**state, "layers.1.v": torch.zeros(2, P, 8)}, str(tmp_path / PREFIX_FILE))
    with pytest.raises(LlamaZhError, match=r"prefix\.safetensors: layers\.1\.v has shape \(2, 5, 8\)"):
        read_prefix(tmp_path, CONFIG)
    plain = build_model(CONFIG, seed=0)
    with pytest.raises(LlamaZhError, match="layers.1.v"):
        load_prefix(plain, tmp_path)
    assert getattr(plain, "prefix", None) is None  # checked before the model was touched

    (tmp_path / PREFIX_CONFIG).write_text(json.dumps({"prefix_len": 0}))
    with pytest.raises(LlamaZhError, match="prefix_len must be an integer > 0"):
        read_prefix(tmp_path, CONFIG)


def test_attaching_a_prefix_of_another_shape_is_refused():
    keys = torch.zeros(3, CONFIG.n_kv_heads, P, CONFIG.head_dim)
    with pytest.raises(LlamaZhError, match=r"keys of shape \(3, 2, 5, 16\), the model expects \(2, 2, 5, 16\)"):
        attach_prefix(build_model(CONFIG, seed=0), FrozenPrefix(keys, keys))


@pytest.mark.parametrize(
    "values,message",
    [
        ({"prefix_len": 0}, "finetune.prefix_len must be an integer > 0, got 0"),
        ({"prefix_len": -3}, "finetune.prefix_len must be an integer > 0, got -3"),
        ({"prefix_hidden": -1}, "finetune.prefix_hidden must be an integer >= 0"),
    ],
)
def test_bad_prefix_settings(values, message):
    with pytest.raises(ConfigError, match=message):
        FinetuneConfig(method="prefix", **values)


def test_memory_plan_counts_the_prefix():
    from llama_zh.prefix import prefix_saved_bytes
    from llama_zh.train.memory_plan import PlanInputs, plan_memory

    per_row, per_step = prefix_saved_bytes(CONFIG, P, 0)
    assert per_row == 2 * CONFIG.n_layers * CONFIG.n_kv_heads * CONFIG.head_dim * P * 4 and per_step == 0
    inputs = dict(
        model=CONFIG,
        trainable_params=100,
        micro_batch=4,
        seq_len=32,
        world_size=1,
        local_processes=1,
        precision="32",
        on_gpu=False,
    )
    without = plan_memory(PlanInputs(**inputs), runtime_bytes=0)
    with_prefix = plan_memory(PlanInputs(**inputs, adapter_params=100, prefix_saved_per_row=per_row), runtime_bytes=0)
    assert with_prefix.device["activations"] - without.device["activations"] == 4 * per_row
    assert with_prefix.device["params"] - without.device["params"] == 400


# ----------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tokenizer):
    """(base checkpoint, its model, prefix-tuned run's final checkpoint): a few SFT steps on the tiny model."""
    root = tmp_path_factory.mktemp("prefix")
    base, model = make_checkpoint(root / "base", tokenizer, sharpen=1.0)
    llama_zh(
        "stage=sft",
        f"stage.checkpoint={base}",
        "finetune=prefix",
        "finetune.prefix_len=4",
        "finetune.prefix_hidden=16",
        "stage.seq_len=64",
        "stage.batch_size=2",
        "trainer.max_steps=3",
        "trainer.limit_val_batches=1",
        "trainer.val_check_interval=3",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        "optim.lr=5e-2",
        "optim.warmup_steps=0",
        run_dir=root / "sft",
        env_extra={"LLAMA_ZH_DATA": str(root / "data")},
    )
    return base, model, root / "sft" / "checkpoints" / "final"


@pytest.mark.slow
def test_prefix_tuning_leaves_the_base_bit_for_bit(tuned):
    from llama_zh.checkpoint import read_native

    base, model, final = tuned
    before, after = dict(read_native(base).tensors()), dict(read_native(final).tensors())
    assert before.keys() == after.keys() and len(before) == len(model.state_dict())
    for name, t in before.items():
        assert torch.equal(t, after[name]) and t.dtype == after[name].dtype, name
    from safetensors.torch import load_file

    saved = load_file(str(final / PREFIX_FILE))
    assert sorted(saved) == ["layers.0.k", "layers.0.v", "layers.1.k", "layers.1.v"]  # the MLP folded away
    assert saved["layers.0.k"].shape == (model.config.n_kv_heads, 4, model.config.head_dim)
    meta = json.loads((final / PREFIX_CONFIG).read_text())
    assert meta["prefix_len"] == 4 and meta["base_fingerprint"] == model_fingerprint(model)


def test_prefix_len_zero_is_one_line_on_the_command_line(tmp_path, tokenizer):
    base, _ = make_checkpoint(tmp_path / "base", tokenizer)
    result = llama_zh(
        "stage=sft",
        f"stage.checkpoint={base}",
        "finetune=prefix",
        "finetune.prefix_len=0",
        "stage.seq_len=64",
        run_dir=tmp_path / "run",
        check=False,
        env_extra={"LLAMA_ZH_DATA": str(tmp_path / "data")},
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("llama_zh: error:")]
    assert result.returncode == 1 and errors == [
        "llama_zh: error: finetune.prefix_len must be an integer > 0, got 0"
    ], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------------- inference


def greedy_uncached(model, prompt, n):
    """Greedy continuation by whole forwards over prefix + everything so far (no decoding cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def greedy(n):
    from llama_zh.generate import SamplingConfig

    return SamplingConfig(temperature=0.0, max_new_tokens=n)


def test_generation_starts_from_a_cache_holding_the_prefix():
    from llama_zh.generate import generate_batch
    from llama_zh.prefix import prefix_disabled

    model = prefixed()
    prompts = [tokens(B=1, T=7)[0].tolist(), tokens(B=1, T=3, seed=8)[0].tolist(), tokens(B=1, T=5, seed=9)[0].tolist()]
    batched = generate_batch(model, prompts, greedy(6))  # left-padded rows
    assert batched == [greedy_uncached(model, p, 6) for p in prompts]
    with prefix_disabled(model):
        assert generate_batch(model, prompts, greedy(6)) != batched  # the prefix changes the answers


def test_scoring_with_the_prefix_equals_whole_forwards():
    from llama_zh.eval.scoring import row_continuation_logprobs

    model = prefixed()
    prompts = [tokens(B=1, T=6)[0].tolist(), tokens(B=1, T=4, seed=8)[0].tolist()]
    conts = [[[5, 6, 7], [9]], [[11, 12], [13, 14, 15]]]
    scores = row_continuation_logprobs(model, prompts, conts)
    with torch.no_grad():
        for b, prompt in enumerate(prompts):
            for n, cont in enumerate(conts[b]):
                logp = model(torch.tensor([prompt + cont]))[0].log_softmax(-1)
                expected = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(cont))
                assert scores[b, n].item() == pytest.approx(expected, abs=1e-4)


def test_the_serving_engine_decodes_after_the_prefix(tokenizer, tmp_path):
    from llama_zh.generate import generate
    from llama_zh.infer.engine import Completion, Engine

    _, model = make_checkpoint(tmp_path / "ckpt", tokenizer, sharpen=1.0)
    generator = torch.Generator().manual_seed(2)
    shape = (model.config.n_layers, model.config.n_kv_heads, 3, model.config.head_dim)
    attach_prefix(model, FrozenPrefix(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)))
    ids = [tokenizer.encode(p, bos=True) for p in ["你好", "这个手机很好用，电池也耐用", "质量不好"]]
    budgets = [6, 4, 5]
    engine = Engine(model, tokenizer, max_concurrent=2, max_queue=4)
    seqs = []
    for p, n in zip(ids, budgets, strict=False):  # staggered: rows at different positions, one waiting for a slot
        seqs.append(engine.submit(p, greedy(n), Completion().add))
        engine.step()
    engine.run_until_idle()
    solo = [generate(model, p, greedy(n), eos_id=tokenizer.eos_id) for p, n in zip(ids, budgets, strict=False)]
    assert [s.row.new_ids for s in seqs] == solo
    assert solo[1] == greedy_uncached(model, ids[1], len(solo[1]))


@pytest.mark.slow
def test_infer_and_eval_use_the_saved_prefix(tuned, tmp_path):
    from llama_zh.convert import load_checkpoint
    from llama_zh.generate import generate

    _, _, final = tuned
    lines = ["这本书写得很好", "房间很脏，服务员的态度也很差", "你好"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def infer(*extra, run):
        result = llama_zh(
            "stage=infer",
            f"stage.checkpoint={final}",
            f"stage.prompts={prompts}",
            f"stage.output={tmp_path / run}.txt",
            "stage.max_new_tokens=8",
            *extra,
            run_dir=tmp_path / run,
        )
        return (tmp_path / f"{run}.txt").read_text(encoding="utf-8"), result.stdout + result.stderr

    answers, log = infer(run="auto")
    assert f"prefix: {final / PREFIX_FILE}" in log
    model, tokenizer = load_checkpoint(final)
    load_prefix(model, final)
    expected = "".join(
        tokenizer.decode(generate(model, tokenizer.encode(line, bos=True), greedy(8), tokenizer=tokenizer)) + "\n\n"
        for line in lines
    )
    assert answers == expected
    assert infer(f"stage.prefix={final / PREFIX_FILE}", run="explicit")[0] == answers
    plain, log = infer("stage.prefix=none", run="none")
    assert plain != answers and "prefix:" not in log

    def evaluate(*extra, run):
        llama_zh(
            "stage=eval",
            f"stage.checkpoint={final}",
            "stage.tasks=[generation]",
            "stage.generation.max_records=4",
            "stage.generation.max_new_tokens=8",
            "stage.speed_probe_tokens=0",
            "logger=csv",
            *extra,
            run_dir=tmp_path / run,
            env_extra={"LLAMA_ZH_DATA": str(tmp_path / "data")},
        )
        return json.loads((tmp_path / run / "eval_results.json").read_text())["generation"]

    from omegaconf import OmegaConf

    from llama_zh.data.chat_template import ChatTemplate
    from llama_zh.eval.instructions import evaluate_generation, read_instruction_records
    from llama_zh.generate import SamplingConfig

    with_prefix, without = evaluate(run="eval_auto"), evaluate("stage.prefix=none", run="eval_none")
    records = read_instruction_records(Path(with_prefix["file"]))
    # eval's default template
    template = ChatTemplate.from_config(OmegaConf.load(REPO / "llama_zh" / "conf" / "template" / "alpaca.yaml"))
    in_memory = evaluate_generation(
        model, tokenizer, records, template, SamplingConfig(temperature=0.0, max_new_tokens=8), 8, 4
    )
    assert with_prefix["examples"] == in_memory["examples"] and with_prefix["rouge_l"] == in_memory["rouge_l"]
    assert [e["answer"] for e in without["examples"]] != [e["answer"] for e in with_prefix["examples"]]


def test_resuming_a_prefix_run_with_another_prefix_shape_is_refused(tmp_path):
    from llama_zh.train.callbacks import STATE_META, check_resumable

    expected = {
        "model": CONFIG.to_dict(),
        "tokenizer_sha256": "abc",
        "stage": "sft",
        "strategy": "auto",
        "deepspeed": False,
        "finetune": "prefix",
        "global_batch": 2,
        "world_size": 1,
        "optimizer": "adamw",
        "base_quant": None,
        "prefix_len": 8,
        "prefix_hidden": 0,
    }
    (tmp_path / STATE_META).write_text(json.dumps({**expected, "prefix_len": 4}))
    with pytest.raises(
        LlamaZhError, match="it trained with finetune.prefix_len=4, this run with finetune.prefix_len=8"
    ):
        check_resumable(tmp_path, expected)
    (tmp_path / STATE_META).write_text(json.dumps(expected))
    assert check_resumable(tmp_path, expected)["prefix_len"] == 8


@pytest.mark.parametrize(
    "stage,strategy,message",
    [
        ({"pack": True}, {"name": "auto"}, "set stage.pack=false"),
        (
            {"pack": False},
            {"name": "auto", "activation_checkpointing": True},
            "set strategy.activation_checkpointing=false",
        ),
        ({"pack": False}, {"name": "zero3", "deepspeed": {"stage": 3}}, "not supported with strategy=zero3"),
    ],
)
def test_runs_that_cannot_carry_a_prefix_are_refused_before_they_start(stage, strategy, message):
    from llama_zh.config import from_mapping
    from llama_zh.train.fit import check_prefix
    from llama_zh.train.strategies import StrategyConfig

    strategy, pack = from_mapping(StrategyConfig, strategy, "strategy"), stage["pack"]
    with pytest.raises(LlamaZhError, match=message):
        check_prefix(FinetuneConfig(method="prefix"), strategy, pack)
    check_prefix(FinetuneConfig(method="lora"), strategy, pack)  # other methods are not concerned


def test_which_prefix_a_decoding_stage_uses(tmp_path):
    from llama_zh.prefix import find_prefix

    model = prefixed()
    (tmp_path / "ckpt").mkdir()
    save_prefix(tmp_path / "ckpt", model.prefix, CONFIG, None)
    assert find_prefix(tmp_path / "ckpt", None) == tmp_path / "ckpt"  # beside the checkpoint: automatic
    assert find_prefix(tmp_path / "ckpt", "none") is None
    assert find_prefix(tmp_path / "other", None) is None
    assert find_prefix(tmp_path / "other", str(tmp_path / "ckpt" / PREFIX_FILE)) == tmp_path / "ckpt" / PREFIX_FILE
    with pytest.raises(LlamaZhError, match=r"stage.prefix=.*missing: no prefix.safetensors there"):
        find_prefix(tmp_path / "ckpt", str(tmp_path / "missing"))


def test_the_memory_plan_inputs_of_a_prefix_run():
    from llama_zh.prefix import prefix_saved_bytes
    from llama_zh.train.memory_check import plan_details
    from llama_zh.train.module import OptimConfig

    ft = FinetuneConfig(method="prefix", prefix_len=P, prefix_hidden=32)
    probe = apply_finetune(build_model(CONFIG, device="meta"), ft)
    details = plan_details(CONFIG, probe, ft, OptimConfig(), on_gpu=False)
    assert details["adapter_params"] == sum(p.numel() for p in probe.prefix.parameters()) > 0
    per_row, per_step = prefix_saved_bytes(CONFIG, P, 32)
    assert (details["prefix_saved_per_row"], details["prefix_saved_per_step"]) == (per_row, per_step) and per_step > 0
