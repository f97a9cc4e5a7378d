"""The losses of three seeded optimizer steps of the tiny model, pinned.

Any change to initialisation, the forward pass, the loss or the optimizer set-up (parameter groups,
weight decay, betas, eps, the LR schedule) moves at least one of these numbers. When a change is meant
to move them, re-pin with the values the failing assertion prints and say why in the commit message.
Measured with the torch of the README's install command, fp32 on CPU (the same at 1 and 2 threads)."""

import pytest
import torch

from llama_zh.config import ModelConfig
from llama_zh.model import build_model
from llama_zh.train.module import CausalLM, OptimConfig

# The loss before each of the three steps, then after the third.
PINNED = [5.744958400726318, 5.1732378005981445, 5.85602331161499, 4.173519611358643]
RELATIVE = 1e-5


def seeded_losses(**optim) -> list[float]:
    """tiny (model=tiny, 300-token vocabulary) built with seed 0, trained 3 steps on one fixed batch
    through the training module's own loss, optimizer and schedule, as the Trainer would call them."""
    config = ModelConfig.from_name("tiny").with_vocab(300)
    optim = OptimConfig(**{"lr": 1e-2, "warmup_steps": 1, **optim})  # a large lr: every term of a step shows
    module = CausalLM(build_model(config, seed=0), optim, total_steps=3)
    tokens = torch.randint(0, config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    configured = module.configure_optimizers()
    optimizer, schedule = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    losses = []
    for _ in range(3):
        loss = module.loss(batch)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    with torch.no_grad():
        losses.append(module.loss(batch).item())
    return losses


def test_first_losses_equal_the_pinned_values():
    losses = seeded_losses()
    assert losses == pytest.approx(PINNED, rel=RELATIVE), f"losses now {losses}"


def test_the_tolerance_sees_the_smallest_part_of_a_step():
    """Weight decay is the smallest term of an AdamW step here: dropping it must still move a loss by
    more than the tolerance, or the pin could not catch an optimizer change."""
    losses = seeded_losses(weight_decay=0.0)
    assert losses[0] == pytest.approx(PINNED[0], rel=RELATIVE)
    assert losses[1:] != pytest.approx(PINNED[1:], rel=RELATIVE)
