"""Experiment tracking: W&B (offline unless WANDB_MODE says otherwise) and metrics.csv in the run directory."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger

log = logging.getLogger(__name__)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_config(cfg: DictConfig) -> dict:
    """The resolved config plus provenance, as logged with every run."""
    values = OmegaConf.to_container(cfg, resolve=True)
    values["git_commit"] = git_commit()
    return values


def build_loggers(cfg: DictConfig, output_dir: Path, extra: dict | None = None) -> list[Logger]:
    loggers: list[Logger] = [CSVLogger(save_dir=str(output_dir), name="", version="")]
    wandb_cfg = cfg.logger.get("wandb")
    if wandb_cfg and wandb_cfg.mode != "disabled":
        # Never let a run wait on the network: offline is the default, and W&B's own start timeout is short.
        os.environ.setdefault("WANDB_INIT_TIMEOUT", "30")
        os.environ["WANDB_MODE"] = wandb_cfg.mode
        if wandb_cfg.mode == "offline":
            log.info("W&B offline: sync later with `wandb sync %s/wandb/offline-run-*`", output_dir)
        loggers.append(WandbLogger(
            project=wandb_cfg.project, save_dir=str(output_dir), offline=wandb_cfg.mode == "offline",
            group=wandb_cfg.group, tags=list(wandb_cfg.tags), job_type=cfg.stage.name,
            name=f"{cfg.stage.name}-{output_dir.name}",
        ))
    config = run_config(cfg) | (extra or {})
    for lg in loggers:
        lg.log_hyperparams(config)
    return loggers
