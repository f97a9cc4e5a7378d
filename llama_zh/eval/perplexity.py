"""Token-weighted perplexity of a model on packed held-out tokens."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset

from llama_zh.model import Transformer
from llama_zh.module import causal_lm_loss


@torch.inference_mode()
def perplexity(model: Transformer, dataset: Dataset, batch_size: int, max_batches: int | None = None) -> dict:
    """{'loss', 'ppl', 'tokens'} over the dataset's windows (every window fully labelled)."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for i, batch in enumerate(DataLoader(dataset, batch_size=batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        labels = batch["labels"].to(device)
        loss = causal_lm_loss(model(batch["input_ids"].to(device)), labels)
        n = labels.numel()
        total += float(loss) * n
        tokens += n
    loss = total / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(loss), "tokens": tokens}
