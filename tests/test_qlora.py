"""QLoRA: LoRA adapters on a bitsandbytes-quantized frozen base (finetune.base_quant), 8-bit AdamW
(optim=adamw8bit / paged_adamw8bit), their memory plan, and the merge into the source weights.

Stated tolerance for the logit gap between the trained QLoRA model and its merged checkpoint, on the
random model below (dim 128, 2 blocks, vocab 300, adapters given values of 0.05 scale), on CPU:
nf4 max |diff| <= 0.5 (measured 0.16-0.2, mean 0.03 against a mean |logit| of 1.4), int8 <= 0.1
(measured 0.03, mean 0.005). The gap is the base's quantization error: the merge itself is exact.
"""

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import llama_zh
from tiny_checkpoints import make_checkpoint, train_tokenizer

from llama_zh.checkpoint import read_native, save_checkpoint
from llama_zh.config import ModelConfig
from llama_zh.errors import LlamaZhError
from llama_zh.model import build_model
from llama_zh.quant import weight_bytes
from llama_zh.train.build import ModelSource
from llama_zh.train.callbacks import STATE_META, NativeCheckpoint, check_resumable
from llama_zh.train.finetune import (
    ADAPTER_FILE,
    PROJECTIONS,
    FinetuneConfig,
    LoRALinear,
    apply_finetune,
    count_trainable,
    load_quantized_base,
    merge_lora,
)
from llama_zh.train.fit import check_base_quant
from llama_zh.train.memory_check import plan_details
from llama_zh.train.memory_plan import PlanInputs, plan_memory
from llama_zh.train.module import CausalLM, OptimConfig, check_optimizer

bnb = pytest.importorskip("bitsandbytes")

CONFIG = ModelConfig(
    name="t", vocab_size=300, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, max_seq_len=64
)
LAYER = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}
GAP_TOLERANCE = {"nf4": 0.5, "int8": 0.1}


def qlora_ft(base_quant, **overrides):
    values = dict(
        method="lora",
        rank=4,
        alpha=8,
        dropout=0.0,
        target_modules=list(PROJECTIONS),
        modules_to_save=["embed", "head"],
        base_quant=base_quant,
    )
    return FinetuneConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A full-precision native checkpoint on disk (the stream re-reads it: nothing shared with a model)."""
    path = tmp_path_factory.mktemp("qlora") / "base"
    save_checkpoint(build_model(CONFIG, seed=0), path)
    return path


def qlora_model(source, ft):
    model, report = load_quantized_base(read_native(source), ft)
    return apply_finetune(model, ft), report


def tokens(n=2, length=33, seed=5):
    return torch.randint(0, CONFIG.vocab_size, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_only_adapters_and_saved_modules_train_on_a_quantized_base(source, method):
    model, report = qlora_model(source, qlora_ft(method))
    assert len(report.quantized) == 14 and not report.skipped
    full = build_model(CONFIG, seed=0)
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert len(wrapped) == 14
    for name, module in wrapped.items():
        assert type(module.base).__name__ == LAYER[method], name
        assert not module.base.weight.is_floating_point() and not module.base.weight.requires_grad
        assert module.lora_a.dtype == module.lora_b.dtype == torch.float32
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{ab}" for n in wrapped for ab in ("lora_a", "lora_b")} | {"embed.weight", "head.weight"}

    # The projections' bytes: a quarter (int8) or an eighth (nf4) of fp32, plus scales.
    def projection_bytes(m):
        return sum(weight_bytes(m.get_submodule(n if m is full else f"{n}.base")) for n in wrapped)

    assert projection_bytes(model) < projection_bytes(full) * (0.3 if method == "int8" else 0.16)


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_lora_on_a_quantized_layer_is_base_plus_scaled_adapter(source, method):
    model, _ = qlora_model(source, qlora_ft(method, dropout=0.1))
    layer = model.layers[0].ffn.w_up
    torch.nn.init.normal_(layer.lora_b, std=0.05)
    x = torch.randn(2, 5, CONFIG.dim)
    layer.eval()
    with torch.no_grad():
        expected = layer.base(x) + layer.scale * (x @ layer.lora_a.T @ layer.lora_b.T)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(LlamaZhError, match="quantized base: merge into the source checkpoint's weights"):
        merge_lora(model)


def causal_lm(model, name="adamw8bit"):
    return CausalLM(model, OptimConfig(name=name, lr=1e-2, weight_decay=0.1, warmup_steps=0), total_steps=100)


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_eight_bit_adamw_trains_qlora_on_cpu(source, method):
    model, _ = qlora_model(source, qlora_ft(method))
    optimizer = causal_lm(model).configure_optimizers()["optimizer"]
    assert type(optimizer) is bnb.optim.AdamW8bit
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1]  # every trained tensor is a matrix here
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = tokens(4, 33)
    losses = []
    for _ in range(5):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != p.requires_grad, name  # trained ones moved, the base did not
    big = model.head.weight
    assert optimizer.state[big]["state1"].dtype == torch.uint8  # 8-bit moments, not fp32


def test_weight_decay_groups_as_adamw():
    model = apply_finetune(build_model(CONFIG, seed=0), FinetuneConfig(method="freeze", train_modules=["norm", "head"]))
    eight = causal_lm(model).configure_optimizers()["optimizer"]
    plain = causal_lm(model, "adamw").configure_optimizers()["optimizer"]

    def shapes(opt):
        return [(g["weight_decay"], [tuple(p.shape) for p in g["params"]]) for g in opt.param_groups]

    assert shapes(eight) == shapes(plain) == [(0.1, [(300, 128)]), (0.0, [(128,)])]


def save_as_training_does(model, ft, source, directory):
    trainer = SimpleNamespace(is_global_zero=True, global_step=4, strategy=SimpleNamespace(barrier=lambda: None))
    native = NativeCheckpoint(directory, None, finetune=ft, source=read_native(source))
    return native.save(trainer, SimpleNamespace(model=model), "final"), native


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_merge_uses_the_source_full_precision_weights(source, method, tmp_path):
    ft = qlora_ft(method)
    model, _ = qlora_model(source, ft)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    path, native = save_as_training_does(model, ft, source, tmp_path)
    assert (path / ADAPTER_FILE).is_file()
    merged = dict(read_native(path).tensors())
    original = dict(read_native(source).tensors())
    layer = model.layers[1].attn.wk
    delta = (layer.lora_b.float() @ layer.lora_a.float()) * layer.scale
    assert torch.equal(merged["layers.1.attn.wk.weight"], original["layers.1.attn.wk.weight"] + delta)
    if method == "nf4":  # and not the dequantized base + delta
        dequantized = bnb.functional.dequantize_4bit(layer.base.weight.data, layer.base.weight.quant_state).float()
        assert not torch.allclose(merged["layers.1.attn.wk.weight"], dequantized + delta, atol=1e-4)
    assert torch.equal(merged["head.weight"], model.head.weight) and torch.equal(
        merged["norm.weight"], original["norm.weight"]
    )

    gap = native.logit_gap
    assert gap["batch"] == "random" and gap["tokens"] == 2 * 64
    assert 0 < gap["mean_abs"] <= gap["max_abs"] <= GAP_TOLERANCE[method], gap


def test_memory_plan_counts_the_quantized_base_and_eight_bit_state(source):
    ft = qlora_ft("nf4")
    model, _ = qlora_model(source, ft)
    optim = OptimConfig(name="adamw8bit", lr=1e-2)
    probe = apply_finetune(build_model(CONFIG, device="meta"), ft)
    trainable, _ = count_trainable(probe)
    details = plan_details(CONFIG, probe, ft, optim, on_gpu=False)
    common = dict(
        model=CONFIG,
        trainable_params=trainable,
        micro_batch=1,
        seq_len=16,
        world_size=1,
        local_processes=1,
        precision="32-true",
        on_gpu=False,
    )
    plan = plan_memory(PlanInputs(**common, **details), runtime_bytes=0)
    assert plan.device["params"] == weight_bytes(model)  # packed nf4 + absmax + code, fp32 rest and adapters

    optimizer = causal_lm(model).configure_optimizers()["optimizer"]
    model(tokens(1, 16)).sum().backward()
    optimizer.step()
    state = sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t) and t.dim() > 0
    )
    assert plan.device["optimizer"] == state
    fp32 = plan_memory(PlanInputs(**common, adapter_params=details["adapter_params"]), runtime_bytes=0)
    assert fp32.device["optimizer"] == 8 * trainable
    # Adapters of this tiny model are under bitsandbytes' min_8bit_size: they keep 32-bit moments.
    assert (
        plan.device["params"] < 0.5 * fp32.device["params"]
        and plan.device["optimizer"] < 0.45 * fp32.device["optimizer"]
    )


@pytest.mark.parametrize(
    "values,message",
    [
        (
            {"method": "full", "base_quant": "nf4"},
            r"finetune.base_quant=nf4 quantizes the frozen base under LoRA adapters, "
            r"but finetune.method=full",
        ),
        ({"method": "freeze", "train_modules": ["head"], "base_quant": "int8"}, "finetune.method=freeze"),
        ({"method": "lora", "base_quant": "nf8"}, r"finetune.base_quant='nf8'; expected one of nf4, int8 or null"),
    ],
)
def test_bad_base_quant(values, message):
    with pytest.raises(LlamaZhError, match=message) as caught:
        FinetuneConfig(**values)
    assert "\n" not in str(caught.value)


def test_refusals_before_the_run():
    with pytest.raises(LlamaZhError, match="optim=paged_adamw8bit .* needs a CUDA device; on CPU use optim=adamw8bit"):
        check_optimizer(OptimConfig(name="paged_adamw8bit"), on_gpu=False, deepspeed=False)
    check_optimizer(OptimConfig(name="paged_adamw8bit"), on_gpu=True, deepspeed=False)
    with pytest.raises(LlamaZhError, match="optim=adamw8bit is not supported with DeepSpeed"):
        check_optimizer(OptimConfig(name="adamw8bit"), on_gpu=False, deepspeed=True)
    with pytest.raises(LlamaZhError, match="optim.name='adam8'"):
        OptimConfig(name="adam8")
    with pytest.raises(LlamaZhError, match="finetune.base_quant=nf4 quantizes a checkpoint's weights .* give one"):
        check_base_quant(qlora_ft("nf4"), ModelSource(CONFIG), deepspeed=False)
    with pytest.raises(LlamaZhError, match="not supported with DeepSpeed strategies"):
        check_base_quant(qlora_ft("nf4"), ModelSource(CONFIG, stream=object()), deepspeed=True)


def test_resume_refuses_another_optimizer_or_base(tmp_path):
    meta = {
        "model": {},
        "tokenizer_sha256": "x",
        "deepspeed": False,
        "finetune": "lora",
        "global_batch": 1,
        "world_size": 1,
    }
    (tmp_path / STATE_META).write_text(json.dumps(meta))  # a state written before the keys existed
    check_resumable(tmp_path, {**meta, "strategy": "auto", "optimizer": "adamw", "base_quant": None})
    with pytest.raises(
        LlamaZhError,
        match="optim=adamw, this run with optim=adamw8bit.*finetune.base_quant=None, "
        "this run with finetune.base_quant=nf4",
    ):
        check_resumable(tmp_path, {**meta, "strategy": "auto", "optimizer": "adamw8bit", "base_quant": "nf4"})


@pytest.mark.slow
def test_cli_sft_qlora_nf4_with_eight_bit_adamw_then_eval(tmp_path):
    tokenizer = train_tokenizer(tmp_path / "tok")
    base, _ = make_checkpoint(tmp_path / "base", tokenizer, sharpen=1.0)  # dim 64, ffn 128: nf4 takes every projection
    env = {"LLAMA_ZH_DATA": str(tmp_path / "data")}
    common = [
        "logger=csv",
        "trainer.enable_progress_bar=false",
        "trainer.limit_val_batches=1",
        "stage.seq_len=64",
        "stage.batch_size=2",
    ]
    result = llama_zh(
        "stage=sft",
        f"stage.checkpoint={base}",
        "finetune=lora",
        "finetune.base_quant=nf4",
        "finetune.rank=4",
        "optim=adamw8bit",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        *common,
        run_dir=tmp_path / "sft",
        env_extra=env,
    )
    log = result.stdout + result.stderr
    assert "finetune.base_quant: quant=nf4 on cpu" in log and "14 layers quantized" in log  # 2 blocks x 7
    assert "left unquantized" not in log
    assert "optim=adamw8bit" in log and "logits of the trained model (quantized base + adapters)" in log
    final = tmp_path / "sft" / "checkpoints" / "final"
    assert (final / ADAPTER_FILE).is_file()
    metrics = (tmp_path / "sft" / "metrics.csv").read_text()
    assert "qlora/logit_gap_max" in metrics and "qlora/logit_gap_mean" in metrics

    evaluated = llama_zh(
        "stage=eval",
        f"stage.checkpoint={final}",
        "data.seq_len=32",
        "stage.max_batches=1",
        "stage.speed_probe_tokens=0",
        run_dir=tmp_path / "eval",
        env_extra=env,
    )
    assert evaluated.returncode == 0
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert results  # the merged checkpoint is an ordinary native one

    refused = llama_zh(
        "stage=sft",
        f"stage.checkpoint={base}",
        "finetune=full",
        "finetune.base_quant=nf4",
        *common,
        run_dir=tmp_path / "bad",
        env_extra=env,
        check=False,
    )
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines()[-1].count("finetune.base_quant=nf4 quantizes the frozen base") == 1
    paged = llama_zh(
        "stage=sft",
        f"stage.checkpoint={base}",
        "finetune=lora",
        "optim=paged_adamw8bit",
        *common,
        run_dir=tmp_path / "paged",
        env_extra=env,
        check=False,
    )
    assert paged.returncode != 0 and "optim=paged_adamw8bit" in paged.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_memory_plan_counts_what_lora_adapters_save_for_backward(dropout):
    from llama_zh.train.memory_check import adapter_saved_per_token
    from llama_zh.train.memory_plan import saved_bytes_per_token
    from llama_zh.train.module import causal_lm_loss

    config = ModelConfig(vocab_size=2000, max_seq_len=256, dim=128, ffn_dim=352, n_heads=4, n_kv_heads=2, n_layers=3)
    ft = FinetuneConfig(method="lora", rank=8, alpha=16, dropout=dropout)
    model = apply_finetune(build_model(config, seed=0), ft).train()
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, config.vocab_size, (3, 50), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss(model(x), x)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = sum(n for ptr, n in storages.items() if ptr not in params)
    probe = apply_finetune(build_model(config, device="meta"), ft)
    planned = (saved_bytes_per_token(config, False, False) + adapter_saved_per_token(probe, ft)) * 3 * 50
    assert 0.9 < planned / measured < 1.15, (planned, measured)
