"""finetune=: LoRA on the native model (merge equality, parity with peft), freeze, and end to end."""

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import llama_zh

from llama_zh.checkpoint import write_native
from llama_zh.config import ModelConfig
from llama_zh.convert import load_checkpoint
from llama_zh.errors import LlamaZhError
from llama_zh.model import build_model
from llama_zh.train.callbacks import NativeCheckpoint
from llama_zh.train.finetune import (
    ADAPTER_CONFIG,
    ADAPTER_FILE,
    FinetuneConfig,
    LoRALinear,
    adapter_state,
    apply_finetune,
    count_trainable,
    export_stream,
    load_adapter,
    merge_lora,
    save_adapter,
)

CONFIG = ModelConfig(name="t", vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=64)
LORA = FinetuneConfig(
    method="lora",
    rank=4,
    alpha=8,
    dropout=0.1,
    target_modules=["wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"],
    modules_to_save=["embed", "head"],
)


def lora_model(seed=0):
    model = apply_finetune(build_model(CONFIG, seed=seed), LORA)
    generator = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        if isinstance(module, LoRALinear):  # B starts at zero: give it values so the adapters matter
            module.lora_b.data.normal_(0, 0.05, generator=generator)
    return model.eval()


def tokens():
    return torch.randint(0, CONFIG.vocab_size, (2, 17), generator=torch.Generator().manual_seed(5))


def test_lora_trains_adapters_and_saved_modules_only():
    model = lora_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "embed.weight" in trainable and "head.weight" in trainable
    assert "layers.0.attn.wq.lora_a" in trainable and "layers.1.ffn.w_down.lora_b" in trainable
    assert "layers.0.attn.wq.base.weight" not in trainable and "norm.weight" not in trainable
    n_trainable, total = count_trainable(model)
    assert n_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) < total


def test_merged_native_checkpoint_matches_the_adapter_model(tmp_path):
    model = lora_model()
    with torch.no_grad():
        expected = model(tokens())
    path = write_native(export_stream(model), tmp_path / "merged")
    merged, _ = load_checkpoint(path)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens()), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(merge_lora(model)(tokens()), expected, atol=1e-5, rtol=0)


def test_lora_forward_matches_peft_on_the_same_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from llama_zh.convert import hf

    base = build_model(CONFIG, seed=0).eval()
    hf.write(export_stream(base), tmp_path / "hf")
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    names = {
        "wq": "self_attn.q_proj",
        "wk": "self_attn.k_proj",
        "wv": "self_attn.v_proj",
        "wo": "self_attn.o_proj",
        "w_gate": "mlp.gate_proj",
        "w_up": "mlp.up_proj",
        "w_down": "mlp.down_proj",
    }
    reference = peft.get_peft_model(
        reference,
        peft.LoraConfig(
            r=LORA.rank,
            lora_alpha=LORA.alpha,
            lora_dropout=0.0,
            target_modules=[n.split(".")[1] for n in names.values()],
        ),
    )

    ours = lora_model()  # same base (seed 0), random adapters
    peft_modules = dict(reference.named_modules())
    for i in range(CONFIG.n_layers):
        for our_name, hf_name in names.items():
            part = "attn" if our_name in ("wq", "wk", "wv", "wo") else "ffn"
            mine = ours.get_submodule(f"layers.{i}.{part}.{our_name}")
            theirs = peft_modules[f"base_model.model.model.layers.{i}.{hf_name}"]
            theirs.lora_A["default"].weight.data.copy_(mine.lora_a.data)
            theirs.lora_B["default"].weight.data.copy_(mine.lora_b.data)
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens()), reference(tokens()).logits, atol=1e-5, rtol=0)


def test_freeze_embeddings_and_head_is_stage_one_of_the_vocab_recipe():
    model = apply_finetune(
        build_model(CONFIG, seed=0), FinetuneConfig(method="freeze", train_modules=["embed_tokens", "lm_head"])
    )
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"embed.weight", "head.weight"}


def test_freeze_last_blocks():
    ft = FinetuneConfig(method="freeze", train_modules=[], train_last_n_blocks=1)
    model = apply_finetune(build_model(CONFIG, seed=0), ft)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("layers.1.", "norm.")) for n in trainable) and "layers.1.ffn.w_up.weight" in trainable


def trained(ft: FinetuneConfig, seed=0):
    """A LoRA model as training leaves it: adapters non-zero and every trainable weight moved off the base."""
    model = apply_finetune(build_model(CONFIG, seed=seed), ft)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


def save_as_training_does(model, ft, directory):
    """The end-of-training save of NativeCheckpoint (merged checkpoint + adapter), on one process."""
    trainer = SimpleNamespace(is_global_zero=True, global_step=7, strategy=SimpleNamespace(barrier=lambda: None))
    return NativeCheckpoint(directory, None, finetune=ft).save(trainer, SimpleNamespace(model=model), "final")


@pytest.mark.parametrize(
    "targets,saved",
    [
        (list(LORA.target_modules), ["embed", "head"]),  # the default recipe (llama_zh/conf/finetune/lora.yaml)
        (list(LORA.target_modules), []),
        (["wq", "wv", "head"], ["head", "norm"]),  # head both adapted and trained: its base weight is saved unmerged
    ],
)
def test_base_plus_adapter_equals_the_merged_checkpoint(tmp_path, targets, saved):
    ft = FinetuneConfig(method="lora", rank=4, alpha=8, target_modules=targets, modules_to_save=saved)
    path = save_as_training_does(trained(ft), ft, tmp_path)
    stored = json.loads((path / ADAPTER_CONFIG).read_text())
    assert stored["modules_to_save"] == saved and stored["target_modules"] == targets
    from safetensors.torch import load_file

    tensors = set(load_file(str(path / ADAPTER_FILE)))
    assert {n for n in tensors if not n.endswith((".lora_a", ".lora_b"))} == {f"{m}.weight" for m in saved}

    merged, _ = load_checkpoint(path)
    base = build_model(CONFIG, seed=0)
    with torch.no_grad():
        assert not torch.allclose(base.eval()(tokens()), merged(tokens()), atol=1e-3)  # the tuning matters
        adapted = load_adapter(base, path).eval()
        torch.testing.assert_close(adapted(tokens()), merged(tokens()), atol=1e-5, rtol=0)


def test_full_finetune_writes_no_adapter(tmp_path):
    ft = FinetuneConfig(method="full")
    path = save_as_training_does(build_model(CONFIG, seed=0), ft, tmp_path)
    assert not (path / ADAPTER_FILE).exists() and not (path / ADAPTER_CONFIG).exists()


def test_load_adapter_refuses_an_adapter_that_does_not_fit(tmp_path):
    from safetensors.torch import load_file, save_file

    ft = FinetuneConfig(
        method="lora", rank=4, alpha=8, target_modules=["wq", "w_up"], modules_to_save=["embed", "head"]
    )
    save_adapter(adapter_state(trained(ft), ft), tmp_path, ft)
    other = CONFIG.__class__(**{**CONFIG.to_dict(), "ffn_dim": 96})
    with pytest.raises(
        LlamaZhError,
        match=r"adapter\.safetensors: layers\.0\.ffn\.w_up\.lora_b has shape \(160, 4\), "
        r"the model expects \(96, 4\)",
    ) as caught:
        load_adapter(build_model(other, seed=0), tmp_path)
    assert "\n" not in str(caught.value)
    bigger_vocab = CONFIG.__class__(**{**CONFIG.to_dict(), "vocab_size": 320})
    with pytest.raises(LlamaZhError, match=r"embed\.weight has shape \(300, 64\), the model expects \(320, 64\)"):
        load_adapter(build_model(bigger_vocab, seed=0), tmp_path)

    # An adapter written without its trained modules (as before they were saved) is refused, not half-applied.
    state = load_file(str(tmp_path / ADAPTER_FILE))
    save_file({k: v for k, v in state.items() if k != "head.weight"}, str(tmp_path / ADAPTER_FILE))
    base = build_model(CONFIG, seed=0)
    with pytest.raises(LlamaZhError, match="missing tensor head.weight"):
        load_adapter(base, tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in base.modules())  # checked before the model was touched

    save_file({**state, "layers.1.attn.wk.lora_a": torch.zeros(4, 64)}, str(tmp_path / ADAPTER_FILE))
    with pytest.raises(LlamaZhError, match="unexpected tensor layers.1.attn.wk.lora_a"):
        load_adapter(build_model(CONFIG, seed=0), tmp_path)


@pytest.mark.parametrize(
    "values,message",
    [
        ({"method": "adapter"}, "finetune.method='adapter'"),
        ({"method": "lora", "target_modules": ["qkv"]}, "finetune.target_modules: unknown module 'qkv'"),
        ({"method": "lora", "rank": 0}, "rank > 0"),
        ({"method": "freeze", "train_modules": []}, "leave no weight to train"),
    ],
)
def test_bad_finetune_settings(values, message):
    with pytest.raises(LlamaZhError, match=message):
        apply_finetune(build_model(CONFIG, seed=0), FinetuneConfig(**values))


@pytest.mark.slow
def test_sft_with_lora_end_to_end(tmp_path):
    common = [
        "logger=csv",
        "trainer.enable_progress_bar=false",
        "trainer.limit_val_batches=1",
        "trainer.val_check_interval=2",
        "trainer.max_steps=2",
    ]

    def run_stage(*overrides, run):
        llama_zh(*common, *overrides, run_dir=tmp_path / run, data_dir=tmp_path / "data")

    run_stage("data.seq_len=32", "data.batch_size=2", run="pt")
    base = tmp_path / "pt" / "checkpoints" / "final"
    run_stage(
        "stage=sft",
        f"stage.checkpoint={base}",
        "finetune=lora",
        "stage.seq_len=64",
        "stage.batch_size=2",
        "finetune.rank=4",
        "finetune.dropout=0.0",
        "optim.lr=1e-2",
        "optim.warmup_steps=0",
        run="sft",
    )
    tuned = tmp_path / "sft" / "checkpoints" / "final"
    assert json.loads((tuned / "adapter_config.json").read_text())["rank"] == 4

    merged, tokenizer = load_checkpoint(tuned)
    adapted, _ = load_checkpoint(base)
    load_adapter(adapted, tuned)  # the default recipe: its fully trained embed and head come with the adapter
    ids = torch.tensor([tokenizer.encode("这本书写得很好，推荐。", bos=True)])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), adapted.eval()(ids), atol=1e-5, rtol=0)
        assert not torch.allclose(merged(ids), load_checkpoint(base)[0](ids), atol=1e-3)  # it did train
