"""The chunked head + cross-entropy against the plain logits + F.cross_entropy."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from llama_zh import ModelConfig, build_model
from llama_zh.train.loss import linear_cross_entropy, worthwhile
from llama_zh.train.module import CausalLM, OptimConfig, causal_lm_loss


@pytest.mark.parametrize("ignored", [False, True])
@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_loss_and_gradients_match_the_plain_computation(ignored, chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 50, 32, generator=g, requires_grad=True)
    weight = torch.randn(300, 32, generator=g, requires_grad=True)
    labels = torch.randint(0, 300, (2, 50), generator=g)
    if ignored:
        labels[:, ::3] = -100
    plain = F.cross_entropy((hidden @ weight.T).flatten(0, 1), labels.flatten(), ignore_index=-100)
    plain.backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    chunked = linear_cross_entropy(hidden, weight, labels, -100, chunk=chunk)
    (3 * chunked).backward()  # the incoming gradient scales both
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad / 3, expected[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad / 3, expected[1], rtol=1e-5, atol=1e-7)


def test_frozen_head_gets_no_gradient_and_hidden_still_does():
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(20, 8)  # frozen
    linear_cross_entropy(hidden, weight, torch.randint(0, 20, (10,))).backward()
    assert hidden.grad is not None and weight.grad is None


def test_module_uses_it_where_worthwhile_and_the_loss_is_the_plain_one(monkeypatch):
    import llama_zh.train.module

    calls = []
    chunked = llama_zh.train.module.linear_cross_entropy
    monkeypatch.setattr(llama_zh.train.module, "linear_cross_entropy", lambda *a: calls.append(1) or chunked(*a))
    config = ModelConfig.from_name("tiny").with_vocab(300)
    module = CausalLM(build_model(config, seed=0), OptimConfig(), total_steps=1)
    assert worthwhile(module.model.head.weight)  # fp32, CPU, width 128
    assert not worthwhile(torch.empty(300, 512))  # too wide: the plain loss is faster there
    assert not worthwhile(torch.empty(300, 128, dtype=torch.bfloat16))
    batch = {"input_ids": torch.randint(0, 300, (2, 16))}
    batch["labels"] = torch.roll(batch["input_ids"], -1, 1)
    batch["labels"][:, -1] = -100
    plain = causal_lm_loss(module.model(batch["input_ids"]), batch["labels"])
    torch.testing.assert_close(module.loss(batch), plain, rtol=1e-6, atol=1e-6)
    assert calls == [1]
    module.loss_kind = "plain"
    torch.testing.assert_close(module.loss(batch), plain, rtol=0, atol=0)
    assert calls == [1]


def tiny_module(loss_kind: str, **shape) -> tuple[CausalLM, dict]:
    config = ModelConfig.from_name("tiny").with_vocab(300)
    if shape:
        config = dataclasses.replace(config, **shape)
    module = CausalLM(build_model(config, seed=0), OptimConfig(), total_steps=1, loss_kind=loss_kind)
    batch = {"input_ids": torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))}
    batch["labels"] = torch.roll(batch["input_ids"], -1, 1)
    return module, batch


@pytest.mark.parametrize(
    ("kind", "width", "chunked"),
    [("auto", 128, True), ("auto", 512, False), ("plain", 128, False), ("chunked", 128, True), ("chunked", 512, True)],
)
def test_the_loss_kind_picks_the_computation(monkeypatch, kind, width, chunked):
    import llama_zh.train.module

    calls = []
    real = llama_zh.train.module.linear_cross_entropy
    monkeypatch.setattr(llama_zh.train.module, "linear_cross_entropy", lambda *a: calls.append(1) or real(*a))
    module, batch = tiny_module(kind, dim=width, n_heads=4, n_kv_heads=2)
    plain = causal_lm_loss(module.model(batch["input_ids"]), batch["labels"])
    torch.testing.assert_close(module.loss(batch), plain, rtol=1e-5, atol=1e-5)
    assert calls == ([1] if chunked else [])


def test_a_loss_kind_the_run_cannot_use_is_refused():
    from llama_zh.errors import LlamaZhError
    from llama_zh.train.module import check_loss

    with pytest.raises(LlamaZhError, match=r"loss='fused'; expected one of auto, plain, chunked"):
        tiny_module("fused")
    with pytest.raises(LlamaZhError, match="loss=chunked .* ZeRO-3"):
        check_loss("chunked", zero3=True)
    with pytest.raises(LlamaZhError, match="loss=chunked computes in fp32 and trainer.precision=bf16-mixed"):
        check_loss("chunked", zero3=False, precision="bf16-mixed")
    assert check_loss("auto", zero3=True, precision="bf16-mixed") == "auto"
    module, batch = tiny_module("chunked")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(LlamaZhError, match="fp32, without autocast"):
        module.loss(batch)
    module.model.head = torch.nn.Linear(128, 300, bias=True)  # not a plain product: the chunked loss cannot apply
    with pytest.raises(LlamaZhError, match="loss=chunked needs the output head as a plain nn.Linear"):
        module.loss(batch)


def test_the_loss_option_is_in_the_root_config_and_defaults_to_auto():
    from omegaconf import OmegaConf

    from llama_zh.config import CONF_DIR
    from llama_zh.train.module import LOSS_KINDS

    assert OmegaConf.load(CONF_DIR / "config.yaml").loss == "auto" == LOSS_KINDS[0]


def test_the_measurements_live_in_experiments_and_the_code_links_existing_files():
    """Figures are kept in experiments/*.md; a docstring or comment names the file, which must exist."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    package = root / "llama_zh"
    sources = [
        package / "train" / "loss.py",
        package / "infer" / "loader.py",
        package / "infer" / "swaps.py",
        *sorted((package / "kernels").iterdir()),
    ]
    links = set()
    for path in sources:
        if path.suffix not in (".py", ".c"):
            continue
        text = path.read_text()
        assert not re.search(r"\d ms\b|\d us\b|\d{4}-\d\d-\d\d", text), f"{path.name} records a measurement"
        links |= set(re.findall(r"experiments/[\w./-]+\.md", text))
    assert links, "the code links no experiments file"
    assert [link for link in sorted(links) if not (root / link).is_file()] == []
