"""The training room's seams: the model's initial weights through the plain and the ZeRO-3 paths,
activation checkpointing as a wrapper around the block calls, and the metrics callbacks."""

import dataclasses
import hashlib
from types import SimpleNamespace

import pytest
import torch

from llama_zh.config import ModelConfig
from llama_zh.model import build_model
from llama_zh.train.build import ModelSource, gathered_one_at_a_time, model_builder
from llama_zh.train.callbacks import MixtureShares, Throughput
from llama_zh.train.finetune import FinetuneConfig
from llama_zh.train.module import causal_lm_loss, enable_activation_checkpointing

# sha256 of the state dict (names, then fp32 bytes, in name order) of the tiny model with 300 pieces
# built with seed 7, as `Transformer.init_weights` produced it when it still took a stand-in `self`.
INITIAL = {
    False: "416a259d9fda7c6e1198a2901b6923d7a27ebb83847b88db77cad35f8dc858a5",
    True: "a48306c0df99d05b8f35d93d9c9dc27805b1407e42daddadc1bd876b84d74808",
}


def tiny(tie: bool = False) -> ModelConfig:
    return dataclasses.replace(ModelConfig.from_name("tiny").with_vocab(300), tie_word_embeddings=tie)


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_initial_weights_are_unchanged_through_both_init_paths(tie):
    assert digest(build_model(tiny(tie), seed=7)) == INITIAL[tie]
    # The ZeRO-3 path (outside zero.Init each gather is a no-op): the same numbers, parameter by parameter.
    zero3 = model_builder(ModelSource(tiny(tie), None, seed=7), FinetuneConfig(), zero3=True, checkpointing=False)()
    assert digest(zero3) == INITIAL[tie]


def test_init_weights_fills_the_parameters_it_is_given_in_order():
    model = build_model(tiny(), seed=1)
    names = [name for name, _ in gathered_one_at_a_time(model)]
    assert names == [name for name, _ in model.named_parameters()]
    model.init_weights(7, parameters=gathered_one_at_a_time(model))
    assert digest(model) == INITIAL[False]


def test_activation_checkpointing_wraps_the_block_calls_and_keeps_names_and_gradients():
    config = dataclasses.replace(tiny(), n_layers=2)
    plain, checkpointed = build_model(config, seed=0), build_model(config, seed=0)
    enable_activation_checkpointing(checkpointed)
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    assert all("forward" not in vars(block) for block in checkpointed.layers)  # no patched forward
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))

    def run(model):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = causal_lm_loss(model(ids), ids)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, sum(saved)

    loss, grads, saved = run(plain)
    loss_ckpt, grads_ckpt, saved_ckpt = run(checkpointed)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    assert saved_ckpt < saved / 2  # the blocks' activations were recomputed, not kept
    with torch.no_grad():  # inference through the same model: the blocks run plainly
        torch.testing.assert_close(checkpointed(ids), plain(ids), rtol=0, atol=0)


class Logged:
    def __init__(self):
        self.metrics = {}

    def log(self, name, value, **_):
        self.metrics[name] = float(value)


def test_throughput_logs_once_per_optimizer_step_over_its_micro_batches(monkeypatch):
    clock = iter([10.0, 12.5])
    monkeypatch.setattr("llama_zh.train.callbacks.time.perf_counter", lambda: next(clock))
    trainer = SimpleNamespace(global_step=3, world_size=2)
    module, callback = Logged(), Throughput(flops_per_token=100.0, peak_flops=1e3)
    callback.on_train_start(trainer, module)
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long)}
    for i in range(2):  # two micro-batches of one step: the second ends it
        callback.on_train_batch_start(trainer, module, batch, i)
        trainer.global_step += i
        callback.on_train_batch_end(trainer, module, None, batch, i)
    tokens_per_s = 2 * 10 * 2 / 2.5
    assert module.metrics == {
        "train/step_time_s": 2.5,
        "train/tokens_per_s": tokens_per_s,
        "train/mfu": tokens_per_s * 100.0 / (1e3 * 2),
    }


def test_mixture_shares_are_logged_and_continue_from_a_saved_state():
    module, shares = Logged(), MixtureShares(["news", "reviews"])
    shares.on_train_batch_start(None, module, {"source": torch.tensor([0, 0, 1])}, 0)
    assert module.metrics == {"data/share_news": pytest.approx(2 / 3), "data/share_reviews": pytest.approx(1 / 3)}
    checkpoint = {"llama_zh_counters": {"tokens_seen": 48}}
    shares.on_save_checkpoint(None, module, checkpoint)
    assert checkpoint["llama_zh_counters"]["tokens_seen"] == 48  # the module's counter is kept beside it
    resumed = MixtureShares(["news", "reviews"])
    resumed.on_load_checkpoint(None, module, checkpoint)
    resumed.on_train_batch_start(None, module, {"source": torch.tensor([1])}, 0)
    assert module.metrics["data/share_news"] == pytest.approx(2 / 4)
