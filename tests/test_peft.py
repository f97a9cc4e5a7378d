"""PEFT interop: a finetune=lora checkpoint's adapter exported for peft, a peft adapter merged on import (fp32, CPU)."""

import dataclasses
import json
import random
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from helpers import llama_zh
from tiny_checkpoints import tiny_config

from llama_zh.checkpoint import read_native, save_checkpoint, write_native
from llama_zh.convert import convert, hf, load_checkpoint
from llama_zh.convert import peft as peft_io
from llama_zh.errors import LlamaZhError
from llama_zh.model import build_model
from llama_zh.tokenizer import Tokenizer, train_sentencepiece
from llama_zh.train.finetune import FinetuneConfig, adapter_state, apply_finetune, export_stream, save_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE_VOCAB, EXTENDED_VOCAB = 350, 400  # the tokenizer below has EXTENDED_VOCAB pieces


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small sentencepiece model (ASCII text: few characters, so a vocabulary this small trains)."""
    directory = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choices(words, k=12)) for _ in range(2000)))
    return Tokenizer(train_sentencepiece(corpus, directory / "tokenizer.model", vocab_size=EXTENDED_VOCAB))


def _randomize(params, std=0.05):
    with torch.no_grad():
        for p in params:
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * std)
            else:
                p.copy_(torch.randn_like(p) * std)


def _tensors(stream):
    return {name: t.clone() for name, t in stream.tensors()}


# ---------------------------------------------------------------------------------------------- export


def make_lora_run(tmp_path, tokenizer, modules_to_save=("embed", "head", "norm")):
    """(base dir, LoRA checkpoint dir, the tuned model with its adapters unmerged): GQA, random non-zero
    A and B, embed/head/norm trained in full, as a finetune=lora run writes it."""
    model = build_model(tiny_config(vocab_size=tokenizer.vocab_size), seed=0).eval()
    _randomize(p for p in model.parameters() if p.ndim == 1)  # norms off 1: a misplaced norm shows
    base = save_checkpoint(model, tmp_path / "base", tokenizer=tokenizer.path)
    ft = FinetuneConfig(method="lora", rank=4, alpha=8, dropout=0.0, modules_to_save=list(modules_to_save))
    apply_finetune(model, ft)
    torch.manual_seed(1)
    _randomize((p for n, p in model.named_parameters() if "lora_" in n), std=0.2)
    with torch.no_grad():
        for name in modules_to_save:
            w = getattr(model, name).weight
            w.add_(torch.randn_like(w) * 0.05)
    run = write_native(export_stream(model, tokenizer.path), tmp_path / "run")
    save_adapter(adapter_state(model, ft), run, ft)
    return base, run, model


def test_export_loads_in_peft_with_our_logits(tmp_path, tokenizer):
    base, run, tuned = make_lora_run(tmp_path, tokenizer)
    base_hf = convert(base, "native", tmp_path / "base_hf", "hf")
    llama_zh(
        "stage=convert",
        f"stage.src={run}",
        "stage.src_format=native",
        "stage.dst_format=peft",
        f"stage.dst={tmp_path / 'adapter'}",
        run_dir=tmp_path / "hydra",
    )
    adapter = tmp_path / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["embed_tokens", "lm_head", "model.norm"]
    assert sorted(config["target_modules"]) == sorted(TARGETS)

    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(hf_base, adapter).eval()
    ids = torch.randint(0, tokenizer.vocab_size, (2, 19))
    with torch.no_grad():
        got = model(ids).logits
        ref = tuned(ids)
        base_logits = load_checkpoint(base)[0](ids)
    assert (ref - base_logits).abs().max() > 0.1  # the adapter matters, so a dropped piece of it would show
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_export_of_q_k_adapters_alone_matches(tmp_path, tokenizer):
    """Only q and k adapted: a wrong row order of their B matrices (RoPE layout) cannot hide behind the rest."""
    model = build_model(tiny_config(vocab_size=tokenizer.vocab_size), seed=0).eval()
    base = save_checkpoint(model, tmp_path / "base", tokenizer=tokenizer.path)
    ft = FinetuneConfig(
        method="lora", rank=4, alpha=4, dropout=0.0, target_modules=["q_proj", "k_proj"], modules_to_save=[]
    )
    apply_finetune(model, ft)
    _randomize((p for n, p in model.named_parameters() if "lora_" in n), std=0.5)
    run = write_native(export_stream(model, tokenizer.path), tmp_path / "run")
    save_adapter(adapter_state(model, ft), run, ft)
    out = peft_io.export(run, tmp_path / "adapter")
    hf_model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(convert(base, "native", tmp_path / "hf", "hf")), out
    ).eval()
    ids = torch.randint(0, tokenizer.vocab_size, (1, 23))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, model(ids), atol=1e-5, rtol=0)


def test_export_refuses_a_checkpoint_without_adapter(tmp_path, tokenizer):
    base, _, _ = make_lora_run(tmp_path, tokenizer)
    with pytest.raises(LlamaZhError, match=r"has no adapter\.safetensors"):
        peft_io.export(base, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_export_refuses_a_module_both_adapted_and_saved(tmp_path):
    model = build_model(tiny_config(vocab_size=300), seed=0)
    ft = FinetuneConfig(method="lora", rank=4, alpha=8, target_modules=["wq", "head"], modules_to_save=["head"])
    apply_finetune(model, ft)
    run = write_native(export_stream(model), tmp_path / "run")
    save_adapter(adapter_state(model, ft), run, ft)
    with pytest.raises(LlamaZhError, match="head is both a LoRA target and in modules_to_save"):
        peft_io.export(run, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_cli_export_needs_a_native_source(tmp_path, tokenizer):
    _, run, _ = make_lora_run(tmp_path, tokenizer)
    result = llama_zh(
        "stage=convert",
        f"stage.src={run}",
        "stage.dst_format=peft",
        f"stage.dst={tmp_path / 'adapter'}",
        run_dir=tmp_path / "hydra",
        check=False,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        "llama_zh: error: stage.dst_format=peft exports the adapter of a finetune=lora checkpoint: "
        "set stage.src_format=native (got 'hf')" in result.stderr
    )
    assert not (tmp_path / "adapter").exists()


# ---------------------------------------------------------------------------------------------- import


def make_peft_adapter(tmp_path, tokenizer, rslora=False, safe=True, **lora):
    """(base HF dir, adapter dir, merge_and_unload's HF dir): a random HF LLaMA (GQA) with BASE_VOCAB rows,
    extended to the tokenizer's EXTENDED_VOCAB, LoRA on every projection with random non-zero B, and
    embed_tokens/lm_head in modules_to_save, as Chinese-LLaMA-Alpaca ships its adapters."""
    cfg = transformers.LlamaConfig(
        vocab_size=BASE_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    _randomize(p for p in model.parameters() if p.ndim == 1)
    model.save_pretrained(tmp_path / "base_hf")
    model.resize_token_embeddings(EXTENDED_VOCAB, mean_resizing=False)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=TARGETS,
        modules_to_save=["embed_tokens", "lm_head"],
        use_rslora=rslora,
        task_type="CAUSAL_LM",
        **lora,
    )
    tuned = peft.get_peft_model(model, config)
    _randomize((p for p in tuned.parameters() if p.requires_grad), std=0.1)  # B, A and the saved embed/head
    tuned.save_pretrained(tmp_path / "adapter", safe_serialization=safe)
    shutil.copyfile(tokenizer.path, tmp_path / "adapter" / "tokenizer.model")
    tuned.merge_and_unload().save_pretrained(tmp_path / "merged_hf")
    return tmp_path / "base_hf", tmp_path / "adapter", tmp_path / "merged_hf"


def assert_same_weights(got_stream, ref_stream):
    assert dataclasses.replace(got_stream.config, name="") == dataclasses.replace(ref_stream.config, name="")
    got, ref = _tensors(got_stream), _tensors(ref_stream)
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=0, msg=name)


def test_import_merges_like_peft_merge_and_unload(tmp_path, tokenizer):
    base_hf, adapter, merged_hf = make_peft_adapter(tmp_path, tokenizer)
    llama_zh(
        "stage=convert",
        f"stage.src={base_hf}",
        "stage.src_format=hf",
        f"stage.adapter={adapter}",
        f"stage.dst={tmp_path / 'merged'}",
        run_dir=tmp_path / "hydra",
    )
    got = read_native(tmp_path / "merged")
    assert got.config.vocab_size == EXTENDED_VOCAB
    assert got.tokenizer is not None and got.tokenizer.read_bytes() == tokenizer.path.read_bytes()
    assert_same_weights(got, hf.read(merged_hf))


@pytest.mark.parametrize("safe,rslora", [(False, False), (True, True)])
def test_import_onto_native_base(tmp_path, tokenizer, safe, rslora):
    """A native base; a .bin adapter with the short config of older peft releases (Chinese-LLaMA-Alpaca's),
    and rsLoRA's scaling."""
    base_hf, adapter, merged_hf = make_peft_adapter(tmp_path, tokenizer, rslora=rslora, safe=safe)
    if not safe:
        (adapter / "adapter_config.json").write_text(
            json.dumps(
                {
                    "base_model_name_or_path": "decapoda-research/llama-7b-hf",
                    "bias": "none",
                    "enable_lora": None,
                    "fan_in_fan_out": False,
                    "inference_mode": True,
                    "lora_alpha": 16.0,
                    "lora_dropout": 0.05,
                    "merge_weights": False,
                    "modules_to_save": ["embed_tokens", "lm_head"],
                    "peft_type": "LORA",
                    "r": 4,
                    "target_modules": TARGETS,
                    "task_type": "CAUSAL_LM",
                }
            )
        )
    assert (adapter / ("adapter_model.safetensors" if safe else "adapter_model.bin")).is_file()
    base = convert(base_hf, "hf", tmp_path / "base", "native")
    out = peft_io.convert_merged(base, "native", adapter, tmp_path / "merged", "native")
    assert_same_weights(read_native(out), hf.read(merged_hf))


@pytest.fixture
def peft_adapter(tmp_path, tokenizer):
    return make_peft_adapter(tmp_path, tokenizer)


def _edit_config(adapter, **changes):
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"peft_type": "IA3"}, r"adapter_config\.json: peft_type 'IA3'; only LORA"),
        ({"use_dora": True}, r"adapter_config\.json: use_dora=true"),
        ({"bias": "all"}, r"adapter_config\.json: bias 'all'"),
        ({"fan_in_fan_out": True}, r"adapter_config\.json: fan_in_fan_out=true"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, r"adapter_config\.json: target_modules 'embed_tokens' cannot"),
        ({"rank_pattern": {"q_proj": 8}}, r"adapter_config\.json: rank_pattern"),
        ({"r": 8}, r"q_proj\.lora_A\.weight has shape \(4, 64\); the base's layers\.0\.attn\.wq\.weight"),
    ],
)
def test_import_refusals(tmp_path, peft_adapter, changes, message):
    base_hf, adapter, _ = peft_adapter
    _edit_config(adapter, **changes)
    with pytest.raises(LlamaZhError, match=message) as e:
        peft_io.convert_merged(base_hf, "hf", adapter, tmp_path / "merged", "native")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "merged").exists()


def test_import_refuses_an_adapter_of_another_model(tmp_path, peft_adapter):
    _, adapter, _ = peft_adapter
    other = build_model(tiny_config(vocab_size=BASE_VOCAB, ffn_dim=96), seed=0)
    base = save_checkpoint(other, tmp_path / "other")
    with pytest.raises(
        LlamaZhError,
        match=r"gate_proj\.lora_B\.weight has shape \(128, 4\); the base's "
        r"layers\.0\.ffn\.w_gate\.weight \(96, 64\) with r=4 needs \(96, 4\)",
    ):
        peft_io.convert_merged(base, "native", adapter, tmp_path / "merged", "native")


def test_import_refuses_unknown_tensors_and_lone_vocab_extension(tmp_path, peft_adapter):
    from safetensors.torch import load_file, save_file

    base_hf, adapter, _ = peft_adapter
    weights = adapter / "adapter_model.safetensors"
    state = load_file(weights)
    save_file({**state, "base_model.model.score.weight": torch.zeros(2, 64)}, weights)
    with pytest.raises(LlamaZhError, match=r"'base_model\.model\.score\.weight' is no weight of a LLaMA model"):
        peft_io.read_peft(adapter)
    save_file({k: v for k, v in state.items() if "lm_head" not in k}, weights)
    with pytest.raises(
        LlamaZhError,
        match=r"a vocabulary of 400 rows, the base has 350, and lm_head is not in "
        r"modules_to_save",
    ):
        peft_io.convert_merged(base_hf, "hf", adapter, tmp_path / "merged", "native")
    save_file(state, weights)
    (adapter / "tokenizer.model").unlink()
    with pytest.raises(LlamaZhError, match=r"extends the vocabulary to 400 and has no tokenizer\.model"):
        peft_io.convert_merged(base_hf, "hf", adapter, tmp_path / "merged", "native")
