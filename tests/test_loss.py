"""The chunked head + cross-entropy against the plain logits + F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

from llama_zh import ModelConfig, build_model
from llama_zh.loss import linear_cross_entropy, worthwhile
from llama_zh.module import CausalLM, OptimConfig, causal_lm_loss


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
    import llama_zh.module

    calls = []
    chunked = llama_zh.module.linear_cross_entropy
    monkeypatch.setattr(llama_zh.module, "linear_cross_entropy", lambda *a: calls.append(1) or chunked(*a))
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
    module.chunked_loss = False
    torch.testing.assert_close(module.loss(batch), plain, rtol=0, atol=0)
    assert calls == [1]
