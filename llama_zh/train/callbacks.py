"""Lightning callbacks of llama_zh: native checkpoints, the resumable training state, memory, progress,
throughput and the data mixture's shares.

The training state of a run lives in `<run dir>/checkpoints/state/step-NNNNNN/`:
    state.ckpt          Lightning's checkpoint (weights, optimizer, LR schedule, loops, data position)
    state/              ... or DeepSpeed's directory of shards under a ZeRO strategy
    tokenizer.model     the run's tokenizer
    llama_zh.json       what a resume checks: model shape, tokenizer hash, strategy, finetune method
    manifest.json       size and sha256 of every other file, written last
Each is written under a temporary name and renamed into place once complete, so a run killed at
any moment leaves only whole states (and perhaps a `.step-*.tmp` that the next run removes). A state
damaged later (a full disk, a bad copy, a truncated file) is caught by its manifest before Lightning
reads it: `resume=auto` falls back to the newest state that checks out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar
from pytorch_lightning.utilities.imports import _RICH_AVAILABLE

from llama_zh.checkpoint import WeightStream, write_native
from llama_zh.convert import load_checkpoint
from llama_zh.errors import LlamaZhError
from llama_zh.prefix import fingerprinted, save_prefix
from llama_zh.tokenizer import copy_tokenizer
from llama_zh.train.finetune import (
    FinetuneConfig,
    adapter_state,
    export_stream,
    logit_gap,
    save_adapter,
    source_merged_stream,
)
from llama_zh.train.memory_plan import GiB, MemoryPlan, current_rss, peak_rss, reset_peak_rss

log = logging.getLogger(__name__)

STATE_META = "llama_zh.json"
STATE_MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step-(\d{6,})$")


class NativeCheckpoint(pl.Callback):
    """Writes native checkpoints: `step-NNNNNN` every `every_n_steps` (0: never) and `final` at the end.

    Adapters are merged into the weights as they stream out (the adapters alone go beside them in
    adapter.safetensors + adapter_config.json; a prefix, finetune=prefix, in prefix.safetensors +
    prefix.json, the weights being the untouched base); under ZeRO-3 each tensor is gathered in turn, never the
    whole model.
    On a quantized base (finetune.base_quant) they are merged into the `source` checkpoint's original
    weights, streamed again, and the final save logs the logit gap between the trained model and
    the merged checkpoint (`logit_gap`, also kept in `self.logit_gap` and sent to the loggers).
    """

    def __init__(
        self,
        directory: Path,
        tokenizer: Path | None,
        every_n_steps: int = 0,
        extra: dict | None = None,
        finetune: FinetuneConfig | None = None,
        source: WeightStream | None = None,
    ):
        self.directory, self.tokenizer, self.every = Path(directory), tokenizer, every_n_steps
        self.extra, self.finetune, self.source = extra or {}, finetune, source
        self.final: Path | None = None
        self.logit_gap: dict[str, float] | None = None
        self._last_saved = -1

    def _quantized_base(self) -> bool:
        return self.finetune is not None and self.finetune.base_quant is not None

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> Path:
        path = self.directory / name
        model = pl_module.model
        if self._quantized_base():
            if self.source is None:
                raise LlamaZhError("finetune.base_quant: no source checkpoint to merge the adapters into")
            stream = source_merged_stream(model, self.source, self.tokenizer)
        else:
            stream = export_stream(model, self.tokenizer)
        adapters = adapter_state(model, self.finetune)  # collective under ZeRO-3: every process takes part
        prefix = getattr(model, "prefix", None)
        if prefix is not None:  # the base weights it trained on, fingerprinted as they are written
            stream, fingerprint = fingerprinted(stream)
        if trainer.is_global_zero:
            extra = {**self.extra, "global_step": trainer.global_step}
            write_native(stream, path, overwrite=True, extra=extra)
            if adapters:
                save_adapter(adapters, path, self.finetune)
            if prefix is not None:
                save_prefix(path, prefix, model.config, fingerprint.hexdigest())
            if name == "final" and self._quantized_base() and self.finetune.logit_gap:
                self._report_gap(trainer, model, path)
        elif not self._quantized_base():
            for _ in stream.tensors():  # take part in each gather
                pass
        trainer.strategy.barrier()
        return path

    def _report_gap(self, trainer: pl.Trainer, model, path: Path) -> None:
        """The QLoRA model against the checkpoint just written (loaded on the CPU), on a held batch."""
        merged, _ = load_checkpoint(path)
        ids, where = held_batch(trainer, merged.config.vocab_size, merged.config.max_seq_len)
        self.logit_gap = {**logit_gap(model, merged, ids), "batch": where}
        del merged
        gap = self.logit_gap
        log.info(
            "finetune.base_quant=%s: logits of the trained model (quantized base + adapters) vs the merged "
            "checkpoint %s on %d %s tokens: max |diff| %.4g, mean |diff| %.4g (mean |logit| %.4g)",
            self.finetune.base_quant,
            path,
            gap["tokens"],
            where,
            gap["max_abs"],
            gap["mean_abs"],
            gap["mean_abs_logit"],
        )
        for logger in getattr(trainer, "loggers", []):
            logger.log_metrics(
                {"qlora/logit_gap_max": gap["max_abs"], "qlora/logit_gap_mean": gap["mean_abs"]},
                step=max(trainer.global_step - 1, 0),
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps: unchanged across accumulated micro-batches
        if self.every and step > 0 and step % self.every == 0 and step != self._last_saved:
            self._last_saved = step
            self.save(trainer, pl_module, f"step-{step:06d}")

    def on_train_end(self, trainer, pl_module) -> None:
        self.final = self.save(trainer, pl_module, "final")


HELD_ROWS, HELD_TOKENS = 2, 64


def held_batch(trainer, vocab_size: int, max_len: int) -> tuple[torch.Tensor, str]:
    """(input ids, "validation" | "random"): up to HELD_ROWS x HELD_TOKENS ids of the run's first
    validation batch, or seeded random ids where the run has no validation data."""
    loaders = getattr(trainer, "val_dataloaders", None)
    loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
    if loader is not None:
        batch = next(iter(loader), None)
        if isinstance(batch, dict) and "input_ids" in batch:
            return batch["input_ids"][:HELD_ROWS, : min(HELD_TOKENS, max_len)].cpu(), "validation"
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (HELD_ROWS, min(HELD_TOKENS, max_len)), generator=generator), "random"


class MemoryReport(pl.Callback):
    """Compares the memory plan with what the run used: peak RSS on CPU (the device and the host
    are the same RAM), peak allocated CUDA memory on GPU. Logged per process at the end of training."""

    def __init__(self, memory_plan: MemoryPlan):
        self.plan = memory_plan

    def on_fit_start(self, trainer, pl_module) -> None:
        if torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)
        # The model is built by now: the peak from here on covers the training steps.
        reset_peak_rss()
        log.info("memory: rank %d RSS at fit start %.3f GiB", trainer.global_rank, current_rss() / GiB)

    def on_train_end(self, trainer, pl_module) -> None:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            measured, planned = (
                torch.cuda.max_memory_reserved(device),
                self.plan.device_total - self.plan.device["runtime"],
            )
            what = "peak reserved CUDA memory"
        else:
            measured, planned = peak_rss(), self.plan.device_total + self.plan.host_total
            what = "peak RSS"
        log.info(
            "memory: rank %d %s %.3f GiB, planned %.3f GiB (ratio %.2f)",
            trainer.global_rank,
            what,
            measured / GiB,
            planned / GiB,
            measured / max(planned, 1),
        )
        for logger in trainer.loggers:
            # At the last step trained (the step a rerun would not redo).
            logger.log_metrics(
                {"memory/measured_gib": measured / GiB, "memory/planned_gib": planned / GiB},
                step=max(trainer.global_step - 1, 0),
            )


class Throughput(pl.Callback):
    """Logs each optimizer step's wall time (`train/step_time_s`, from its first micro-batch to its
    last, the callbacks before this one included), the tokens per second of all processes
    (`train/tokens_per_s`), and the model FLOPs utilisation (`train/mfu`) where `flops_per_token`
    and the device's `peak_flops` are known."""

    def __init__(self, flops_per_token: float | None = None, peak_flops: float | None = None):
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self._start: float | None = None
        self._tokens = 0
        self._last_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step  # a resumed run starts mid-way

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:  # the first micro-batch of an optimizer step
            self._start, self._tokens = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tokens += batch["input_ids"].numel() * trainer.world_size
        if trainer.global_step == self._last_step:
            return  # mid-accumulation: the optimizer has not stepped yet
        self._last_step = trainer.global_step
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        tokens_per_s = self._tokens / elapsed
        pl_module.log("train/step_time_s", elapsed)
        pl_module.log("train/tokens_per_s", tokens_per_s, prog_bar=True)
        if self.flops_per_token and self.peak_flops:
            pl_module.log("train/mfu", tokens_per_s * self.flops_per_token / (self.peak_flops * trainer.world_size))
        self._start = None


class MixtureShares(pl.Callback):
    """Logs the data mixture's realised proportions, `data/share_<source>`: the windows drawn from each
    source so far (batches carry each window's `source` index) over all drawn. The counts are kept
    in the training state, so a resumed run continues them."""

    def __init__(self, source_names: list[str] | None):
        self.names = list(source_names or [])
        self.counts = torch.zeros(len(self.names), dtype=torch.long)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # At the start: a state saved at this batch's end includes it.
        if not self.names or "source" not in batch:
            return
        self.counts += torch.bincount(batch["source"].cpu(), minlength=len(self.names))
        total = self.counts.sum().clamp(min=1)
        for name, count in zip(self.names, self.counts, strict=True):
            pl_module.log(f"data/share_{name}", count / total)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint.setdefault("llama_zh_counters", {})["source_counts"] = self.counts.clone()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        counts = checkpoint.get("llama_zh_counters", {}).get("source_counts")
        if counts is not None and len(counts) == len(self.counts):
            self.counts = counts.clone()


def _clock_text(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLog(pl.Callback):
    """A log line (step, loss, learning rate, tokens/s, ETA) every `every_s` seconds and/or every
    `every_n_steps` optimizer steps (0: not by that measure), and at the first and the last step.

    For runs whose output is not a terminal (nohup, tee, a batch job): no progress bar is seen there,
    and nothing else is printed between training states, which may be hours apart."""

    def __init__(self, every_s: float = 30.0, every_n_steps: int = 0, clock: Callable[[], float] = time.monotonic):
        if every_s < 0 or every_n_steps < 0:
            raise LlamaZhError(
                f"log_progress_every_s ({every_s}) and log_progress_every_n_steps ({every_n_steps}) "
                "must be >= 0 (0: off)"
            )
        self.every_s, self.every_n, self.clock = every_s, every_n_steps, clock
        self._start = self._last = 0.0
        self._start_step = self._seen_step = 0
        self._last_tokens = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = self._last = self.clock()
        self._start_step = self._seen_step = trainer.global_step  # a resumed run starts mid-way
        self._last_tokens = getattr(pl_module, "tokens_seen", 0)

    def _due(self, step: int, max_steps: int, now: float) -> bool:
        return (
            step == self._start_step + 1
            or step == max_steps
            or bool(self.every_n and step % self.every_n == 0)
            or bool(self.every_s and now - self._last >= self.every_s)
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._seen_step or not trainer.is_global_zero:
            return  # mid-accumulation: the optimizer has not stepped since the last look
        self._seen_step = step
        now = self.clock()
        if (self.every_s or self.every_n) and self._due(step, trainer.max_steps, now):
            log.info("%s", self.line(trainer, pl_module, step, now))
            self._last = now
            self._last_tokens = getattr(pl_module, "tokens_seen", 0)

    def line(self, trainer, pl_module, step: int, now: float) -> str:
        max_steps = trainer.max_steps
        parts = [f"step {step}/{max_steps} ({100 * step / max_steps:.0f}%)" if max_steps > 0 else f"step {step}"]
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        tokens = getattr(pl_module, "tokens_seen", None)
        if tokens is not None and now > self._last:
            parts.append(f"{(tokens - self._last_tokens) / (now - self._last):,.0f} tokens/s")
        done = step - self._start_step
        parts.append(f"elapsed {_clock_text(now - self._start)}")
        if max_steps > 0 and done > 0:
            parts.append(f"ETA {_clock_text((max_steps - step) * (now - self._start) / done)}")
        return " | ".join(parts)


def step_description(trainer: pl.Trainer) -> str:
    """The progress bar's label. Training here is counted in optimizer steps (max_epochs=-1), where
    Lightning's label reads "Epoch 0/-2"; the epoch is shown only once the data has wrapped around."""
    if trainer.max_steps > 0:
        epoch = f", epoch {trainer.current_epoch}" if trainer.current_epoch else ""
        return f"step {trainer.global_step}/{trainer.max_steps}{epoch}"
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        return f"epoch {trainer.current_epoch}/{trainer.max_epochs - 1}"
    return f"epoch {trainer.current_epoch}"


class StepRichProgressBar(RichProgressBar):
    """Lightning's rich progress bar, labelled with the optimizer step (see `step_description`)."""

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{step_description(self.trainer):{len(self.validation_description)}}"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, description=self._get_train_description(0))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class StepTQDMProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar, labelled with the optimizer step (see `step_description`)."""

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(step_description(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.train_progress_bar is not None:
            self.train_progress_bar.set_description(step_description(trainer), refresh=False)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def step_progress_bar() -> pl.Callback:
    """The bar Lightning would pick by default (rich where it is installed), labelled in steps."""
    return StepRichProgressBar() if _RICH_AVAILABLE else StepTQDMProgressBar()


def progress_callbacks(progress_bar: bool, every_s: float = 30.0, every_n_steps: int = 0) -> list[pl.Callback]:
    """The progress bar (labelled in optimizer steps) where the Trainer shows one (`progress_bar`) and,
    where no bar is seen (stdout not a terminal, or the bar turned off), progress lines in the log every
    `every_s` seconds and/or `every_n_steps` optimizer steps."""
    callbacks: list[pl.Callback] = [step_progress_bar()] if progress_bar else []
    if not progress_bar or not sys.stdout.isatty():
        callbacks.append(ProgressLog(float(every_s), int(every_n_steps)))
    return callbacks


def _fsync_tree(root: Path) -> None:
    """Flush a finished state to disk before it is renamed into place (a crash of the machine, not
    just of the process, must not leave a complete-looking state with missing bytes)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class TrainingState(pl.Callback):
    """Saves the full training state every `every_n_steps` optimizer steps and at the end, atomically,
    keeping the newest `keep_last`."""

    def __init__(
        self,
        directory: Path,
        every_n_steps: int,
        keep_last: int,
        meta: dict,
        deepspeed: bool,
        tokenizer: Path | None = None,
    ):
        if every_n_steps < 0 or keep_last < 1:
            raise LlamaZhError("state_every_n_steps must be >= 0 and state_keep_last >= 1")
        self.directory, self.every, self.keep_last = Path(directory), every_n_steps, keep_last
        self.meta, self.deepspeed, self.tokenizer = meta, deepspeed, tokenizer
        self._last_saved = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_saved = trainer.global_step  # a resumed run does not rewrite the state it started from
        if trainer.is_global_zero:
            for stale in self.directory.glob(".step-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)  # left by a run killed while saving

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every and step > 0 and step % self.every == 0 and step != self._last_saved:
            self.save(trainer, step)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_saved:
            self.save(trainer, trainer.global_step)

    def save(self, trainer: pl.Trainer, step: int) -> Path:
        self._last_saved = step
        final = self.directory / f"step-{step:06d}"
        tmp = self.directory / f".step-{step:06d}.tmp"
        if trainer.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        trainer.strategy.barrier()
        for logger in trainer.loggers:
            logger.save()  # metrics.csv up to this state: a resumed run continues it from here
        # weights_only=False: the whole state (optimizer, loops, callbacks), what resuming needs; said
        # explicitly, else Lightning logs that it defaulted to it at every save. (Loading is separate:
        # fit() reads it back with weights_only=True, llama_zh/train/fit.py.)
        trainer.save_checkpoint(
            tmp / ("state" if self.deepspeed else "state.ckpt"), weights_only=False
        )  # every rank: ZeRO shards
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            meta = {**self.meta, "global_step": step}
            if self.tokenizer is not None:  # a state is self-contained: consolidation needs no other file
                copy_tokenizer(self.tokenizer, tmp)
            (tmp / STATE_META).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
            write_manifest(tmp)
            _fsync_tree(tmp)
            if final.exists():  # a rerun that reached the same step again
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in list_states(self.directory)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("training state: %s", final)
        trainer.strategy.barrier()
        return final


def list_states(directory: Path) -> list[Path]:
    """Complete states in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    states = [p for p in directory.iterdir() if STEP_DIR.match(p.name) and (p / STATE_META).is_file()]
    return sorted(states, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def state_checkpoint(step_dir: Path) -> Path:
    """What to hand Lightning's `fit(ckpt_path=...)` for a state directory."""
    for name in ("state.ckpt", "state"):
        if (step_dir / name).exists():
            return step_dir / name
    raise LlamaZhError(f"resume: {step_dir} holds no state.ckpt or state/ (not a llama_zh training state)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(step_dir: Path) -> None:
    """Record the size and sha256 of every file of a finished state (all ranks' shards included).
    Written last, inside the directory that is then renamed into place: a resume can tell a state
    damaged after it was written from a whole one before torch tries to read it."""
    files = {
        p.relative_to(step_dir).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(step_dir.rglob("*"))
        if p.is_file() and p.name != STATE_MANIFEST
    }
    (step_dir / STATE_MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def _unmanifested_problem(step_dir: Path) -> str | None:
    """A state written before manifests existed: each torch file (a zip archive) must at least have
    its central directory, which is what a truncated file loses."""
    for path in sorted(step_dir.rglob("*")):
        if path.is_file() and path.suffix in (".ckpt", ".pt"):
            try:
                with zipfile.ZipFile(path):
                    pass
            except (zipfile.BadZipFile, OSError) as e:
                return f"{path.relative_to(step_dir)} is not a whole torch file ({e})"
    return None


def state_problem(step_dir: Path) -> str | None:
    """What is wrong with a state directory (None: it is as it was written): a file missing, of
    another size or another checksum than its manifest records. Sizes are all compared before any
    file is hashed, so the common damage (truncation) is found without reading the state."""
    manifest = step_dir / STATE_MANIFEST
    if not manifest.is_file():
        return _unmanifested_problem(step_dir)
    try:
        files = json.loads(manifest.read_text())["files"]
        expected = {name: (int(v["size"]), str(v["sha256"])) for name, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"its {STATE_MANIFEST} is unreadable ({type(e).__name__}: {e})"
    for name, (size, _) in expected.items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, {size} when written"
    for name, (_, sha256) in expected.items():
        if _sha256(step_dir / name) != sha256:
            return f"{name} does not match the checksum recorded when it was written"
    return None


def _newest_valid(state_dir: Path) -> Path | None:
    """`resume=auto`: the newest state that checks out, warning about the newer damaged ones it
    passes over; refuses if there are states but none is whole (starting afresh would silently
    throw the run's progress away)."""
    states = list_states(state_dir)
    damaged: list[tuple[Path, str]] = []
    for step_dir in reversed(states):
        problem = state_problem(step_dir)
        if problem is None:
            if damaged:
                log.warning(
                    "resume: %s; resuming from %s instead (the newest intact state)",
                    "; ".join(f"training state {d} is damaged: {p}" for d, p in damaged),
                    step_dir,
                )
            return step_dir
        damaged.append((step_dir, problem))
    if damaged:
        raise LlamaZhError(
            f"resume=auto: no intact training state in {state_dir}: "
            + "; ".join(f"{d.name}: {p}" for d, p in damaged)
            + ". Move them away to start afresh, or pass resume=null"
        )
    return None


def resolve_resume(resume, state_dir: Path) -> Path | None:
    """The state directory to resume from: `auto` the newest intact one in `state_dir` (None if there
    is none), a path that state (or the state.ckpt / state inside it), null or `never` none."""
    if resume is None or resume is False or str(resume).lower() in ("null", "none", "never", "false", ""):
        return None
    if str(resume) == "auto":
        return _newest_valid(state_dir)
    path = Path(str(resume))
    if path.name in ("state.ckpt", "state"):
        path = path.parent
    if not (path / STATE_META).is_file():
        raise LlamaZhError(
            f"resume={resume}: not a llama_zh training state (no {STATE_META}); "
            f"states are the step-NNNNNN directories under <run dir>/checkpoints/state/"
        )
    problem = state_problem(path)
    if problem is not None:
        raise LlamaZhError(f"resume={resume}: the training state {path} is damaged: {problem}")
    return path


def check_resumable(step_dir: Path, expected: dict) -> dict:
    """Refuse a state whose model shape, tokenizer, strategy family or finetune method differ from this run's."""
    meta = json.loads((step_dir / STATE_META).read_text())
    problems = []
    if meta.get("model") != expected["model"]:
        diff = [
            f"{k} {meta.get('model', {}).get(k)} -> {v}"
            for k, v in expected["model"].items()
            if meta.get("model", {}).get(k) != v
        ]
        problems.append(f"the model shape differs ({', '.join(diff)})")
    if meta.get("tokenizer_sha256") != expected["tokenizer_sha256"]:
        problems.append(
            f"the tokenizer differs (sha256 {str(meta.get('tokenizer_sha256'))[:12]}... in the state, "
            f"{expected['tokenizer_sha256'][:12]}... now)"
        )
    if meta.get("deepspeed") != expected["deepspeed"]:
        problems.append(
            f"it was written by strategy={meta.get('strategy')}, which cannot be read by "
            f"strategy={expected['strategy']} (resume with strategy={meta.get('strategy')})"
        )
    if meta.get("finetune") != expected["finetune"]:
        problems.append(
            f"it trained with finetune={meta.get('finetune')}, this run with finetune={expected['finetune']}"
        )
    for key, option, default in (
        ("optimizer", "optim", "adamw"),
        ("base_quant", "finetune.base_quant", None),
        ("prefix_len", "finetune.prefix_len", None),
        ("prefix_hidden", "finetune.prefix_hidden", None),
    ):
        then, now = meta.get(key, default), expected.get(key, default)  # states written before the key: the default
        if then != now:
            problems.append(f"it trained with {option}={then}, this run with {option}={now}")
    if problems:
        raise LlamaZhError(
            f"resume: cannot continue from {step_dir}: {'; '.join(problems)}. Start a new run directory "
            "(hydra.run.dir=...) or pass resume=null to start from scratch"
        )
    if meta.get("global_batch") != expected["global_batch"] or meta.get("world_size") != expected["world_size"]:
        log.warning(
            "resume: %s was trained with global batch %s on %s processes, this run uses %s on %s: the data "
            "position carries over but the run will not match an uninterrupted one",
            step_dir,
            meta.get("global_batch"),
            meta.get("world_size"),
            expected["global_batch"],
            expected["world_size"],
        )
    return meta
