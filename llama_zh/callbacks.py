"""Lightning callbacks of llama_zh."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl

from llama_zh.checkpoint import save_checkpoint


class NativeCheckpoint(pl.Callback):
    """Writes native checkpoints: `step-NNNNNN` every `every_n_steps` (0: never) and `final` at the end."""

    def __init__(self, directory: Path, tokenizer: Path | None, every_n_steps: int = 0, extra: dict | None = None):
        self.directory, self.tokenizer, self.every = Path(directory), tokenizer, every_n_steps
        self.extra = extra or {}
        self.final: Path | None = None
        self._last_saved = -1

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> Path:
        path = self.directory / name
        if trainer.is_global_zero:
            extra = {**self.extra, "global_step": trainer.global_step}
            save_checkpoint(pl_module.model, path, tokenizer=self.tokenizer, extra=extra)
        trainer.strategy.barrier()
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps: unchanged across accumulated micro-batches
        if self.every and step > 0 and step % self.every == 0 and step != self._last_saved:
            self._last_saved = step
            self._save(trainer, pl_module, f"step-{step:06d}")

    def on_train_end(self, trainer, pl_module) -> None:
        self.final = self._save(trainer, pl_module, "final")
