"""Experiment tracking: W&B (offline unless WANDB_MODE says otherwise) and metrics.csv in the run directory.

- Never wait on the network: `online` is tried only when the W&B host answers within a few seconds,
  and any failure to start falls back to offline, saying so.
- A resumed run continues its W&B run (the id is kept in the run directory) and its metrics.csv,
  from which the rows logged after the state it resumes from are dropped: the file then reads as
  the uninterrupted run's would.
- The jobs of one multirun share a W&B group (`<experiment_name>-<sweep dir name>` unless
  `logger.wandb.group` is set), so the sweep is compared there as in `python -m llama_zh.report`.
"""

from __future__ import annotations

import csv
import logging
import os
import socket
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"
WANDB_ID_FILE = "wandb_run_id"
PACKAGE_DIR = Path(__file__).resolve().parent


def git_commit(package_dir: Path = PACKAGE_DIR) -> str | None:
    """The commit of the checkout this package runs from, with "-dirty" when its tracked files have
    changes; None when the package is not a checkout's own llama_zh/ (an installed copy, even one in
    site-packages under some other project's repository, whose commit would say nothing of this code)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=package_dir)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if not top or Path(top).resolve() / package_dir.name != package_dir.resolve():
        return None
    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    return commit + ("-dirty" if dirty else "")


@dataclass
class WandbConfig:
    """`logger.wandb`, every key given by llama_zh/conf/logger/wandb.yaml."""

    project: str
    mode: str  # online | offline | disabled
    group: str | None  # None: experiment_name; in a multirun, <experiment_name>-<sweep dir name>
    tags: list[str]


@dataclass
class TrackingConfig:
    """What the loggers need of a run: the stage, W&B's settings (None: metrics.csv only), the resolved
    config to log with the run (plain data), and the sweep directory of a multirun (None: a single run)."""

    stage: str
    experiment_name: str | None
    wandb: WandbConfig | None
    config: dict[str, Any]
    sweep_dir: Path | None = None


# The option each config group's choice is recorded by: its name, or the finetune method.
CHOICE_KEYS = {
    "stage": "name",
    "model": "name",
    "trainer": "name",
    "hardware": "name",
    "strategy": "name",
    "finetune": "method",
    "quant": "name",
    "data": "name",
}


def run_config(values: dict[str, Any]) -> dict:
    """The resolved config (plain data) plus provenance and the choices of each config group, as logged
    with every run."""
    values = dict(values)
    values["git_commit"] = git_commit()
    choices = {group: (values.get(group) or {}).get(key) for group, key in CHOICE_KEYS.items()}
    values["choices"] = {k: v for k, v in choices.items() if v is not None}
    sources = (values.get("data") or {}).get("sources")
    if sources:
        values["data_mix"] = {name: s.get("weight") for name, s in sources.items()}  # null: natural sizes
    return values


class _KeepingWriter(ExperimentWriter):
    """Appends to an existing metrics.csv (Lightning's writer deletes it), keeping its columns."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])


class _FreshWriter(ExperimentWriter):
    """Starts metrics.csv afresh. Lightning's writer warns that "previous log files in this directory
    will be deleted" whenever the directory holds anything, and the run directory always does (.hydra/,
    the log), though only an earlier metrics.csv is ever replaced: that alone is said, when it happens."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            log.info("metrics: starting %s afresh (no training state to continue from)", self.metrics_file_path)
            self._fs.rm_file(self.metrics_file_path)


class ResumingCSVLogger(CSVLogger):
    """metrics.csv in the run directory, continued (a resumed run) or started afresh."""

    def __init__(self, *args, resuming: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self._writer = _KeepingWriter if resuming else _FreshWriter

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = self._writer(log_dir=self.log_dir)
        return self._experiment


def truncate_metrics(path: Path, from_step: int) -> None:
    """Drop the rows logged at optimizer step >= `from_step` (a killed run's progress past its last state)."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames or [], list(reader)
    kept = [r for r in rows if not r.get("step") or int(float(r["step"])) < from_step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
    os.replace(tmp, path)


def wandb_reachable(timeout: float = 3.0) -> bool:
    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_group(tracking: TrackingConfig) -> str | None:
    """`logger.wandb.group` if set; else, in a multirun, one group per sweep (the experiment name alone
    would pool every sweep of that experiment ever run); else the experiment name."""
    if tracking.wandb is not None and tracking.wandb.group:
        return str(tracking.wandb.group)
    name, sweep = tracking.experiment_name, tracking.sweep_dir
    if sweep is None:
        return name
    return f"{name}-{sweep.name}" if name else sweep.name


def _wandb_logger(tracking: TrackingConfig, output_dir: Path, mode: str, run_id: str) -> WandbLogger:
    os.environ["WANDB_MODE"] = mode
    return WandbLogger(
        project=tracking.wandb.project,
        save_dir=str(output_dir),
        offline=mode == "offline",
        group=wandb_group(tracking),
        tags=list(tracking.wandb.tags),
        job_type=tracking.stage,
        name=f"{tracking.stage}-{output_dir.name}",
        id=run_id,
        resume="allow",
    )


def _finish_previous_wandb_run() -> None:
    """A multirun's jobs run one after another in one process, and Lightning's WandbLogger adopts any
    W&B run still open: without this, every job after the first would log into the first job's run."""
    import wandb

    if wandb.run is not None:
        log.info("W&B: finishing the previous job's run %s", wandb.run.id)
        wandb.run.finish()


def build_loggers(
    tracking: TrackingConfig, output_dir: Path, extra: dict | None = None, resume_step: int | None = None
) -> list[Logger]:
    if resume_step is not None:
        truncate_metrics(output_dir / METRICS_FILE, resume_step)
    csv_logger = ResumingCSVLogger(save_dir=str(output_dir), name="", version="", resuming=resume_step is not None)
    loggers: list[Logger] = [csv_logger]
    config = run_config(tracking.config) | (extra or {})
    csv_logger.log_hyperparams(config)

    wandb_cfg = tracking.wandb
    if wandb_cfg is not None and wandb_cfg.mode != "disabled":
        _finish_previous_wandb_run()
        # One W&B run per run directory: a resumed run continues it.
        id_file = output_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        mode = wandb_cfg.mode
        os.environ.setdefault("WANDB_INIT_TIMEOUT", "20")
        if mode == "online" and not wandb_reachable():
            log.warning(
                "W&B: %s is unreachable; logging offline instead (sync later with `wandb sync %s/wandb/offline-run-*`)",
                os.environ.get("WANDB_BASE_URL", "api.wandb.ai"),
                output_dir,
            )
            mode = "offline"
        if mode == "offline":
            log.info("W&B offline: sync later with `wandb sync %s/wandb/offline-run-*`", output_dir)
        wandb_logger = _wandb_logger(tracking, output_dir, mode, run_id)
        try:
            wandb_logger.log_hyperparams(config)
        except Exception as e:  # noqa: BLE001 - any failure to start W&B must not stop training
            if mode == "offline":
                raise
            log.warning("W&B failed to start online (%s: %s); logging offline instead", type(e).__name__, e)
            wandb_logger = _wandb_logger(tracking, output_dir, "offline", run_id)
            wandb_logger.log_hyperparams(config)
        loggers.append(wandb_logger)
    return loggers
