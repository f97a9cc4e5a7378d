"""The LightningModule: next-token loss, AdamW with decay on matrices only, warmup + cosine, metrics."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from llama_zh.data.datasets import IGNORE_INDEX
from llama_zh.errors import LlamaZhError
from llama_zh.model import Transformer


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise LlamaZhError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise LlamaZhError("optim.warmup_steps must be >= 0 and optim.min_lr_ratio in [0, 1]")
        self.betas = tuple(self.betas)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine to `min_ratio` at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled positions (B, T, V) x (B, T), in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


class CausalLM(pl.LightningModule):
    def __init__(self, model: Transformer, optim: OptimConfig, total_steps: int, source_names: list[str] | None = None):
        super().__init__()
        self.model, self.optim, self.total_steps = model, optim, total_steps
        self._step_start: float | None = None
        self.tokens_seen = 0
        # Windows drawn per data source, to log the mixture's realised proportions.
        self.source_names = source_names or []
        self.source_counts = torch.zeros(len(self.source_names), dtype=torch.long)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def training_step(self, batch, batch_idx):
        logits = self.model(batch["input_ids"])
        loss = causal_lm_loss(logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        n_tokens = batch["input_ids"].numel() * self.trainer.world_size
        self.tokens_seen += n_tokens
        elapsed = time.perf_counter() - self._step_start
        self.log("train/tokens_per_s", n_tokens / max(elapsed, 1e-9), prog_bar=True)
        self.log("train/tokens", float(self.tokens_seen))
        if self.source_names and "source" in batch:
            self.source_counts += torch.bincount(batch["source"].cpu(), minlength=len(self.source_names))
            total = self.source_counts.sum().clamp(min=1)
            for name, count in zip(self.source_names, self.source_counts):
                self.log(f"data/share_{name}", count / total)

    def on_validation_epoch_start(self) -> None:
        self._val_sum, self._val_tokens = 0.0, 0

    def validation_step(self, batch, batch_idx):
        logits = self.model(batch["input_ids"])
        loss = causal_lm_loss(logits, batch["labels"])
        n = int((batch["labels"] != IGNORE_INDEX).sum())
        self._val_sum += float(loss) * n
        self._val_tokens += n
        return loss

    def on_validation_epoch_end(self) -> None:
        # Token-weighted over the whole split (batches differ in labelled tokens under SFT).
        totals = torch.tensor([self._val_sum, float(self._val_tokens)], dtype=torch.float64, device=self.device)
        totals = self.all_gather(totals).reshape(-1, 2).sum(0) if self.trainer.world_size > 1 else totals
        loss = totals[0] / totals[1].clamp(min=1)
        self.log("val/loss", loss.float(), prog_bar=True, sync_dist=False)
        self.log("val/ppl", torch.exp(loss).float())

    def configure_optimizers(self):
        # Weight decay on matrices only: decaying norm gains pulls them toward zero for no benefit.
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=self.optim.lr, betas=self.optim.betas, eps=self.optim.eps)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, self.optim.warmup_steps, self.total_steps, self.optim.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
