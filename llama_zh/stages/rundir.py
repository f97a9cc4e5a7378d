"""The run directory: where a stage writes, the `latest` link beside run directories, and the
checkpoint a run reports as its last line.

Run directories are named by their start time, so a later command cannot spell the one it needs;
`outputs/<stage>/latest` always names the newest run of a stage (`outputs/multirun/<stage>/latest`
the newest sweep), and a run that writes a checkpoint prints its path last, for `$(... | tail -n 1)`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

LATEST = "latest"


def output_dir(cfg) -> Path:
    """This run's directory (`paths.output_dir` of a config, or the path itself), created if missing."""
    path = Path(cfg) if isinstance(cfg, str | os.PathLike) else Path(cfg.paths.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def link_latest(run_dir: Path) -> Path | None:
    """Point `<parent of run_dir>/latest` at `run_dir`; returns the link, or None where it cannot be made.

    The link is relative (the outputs tree can be moved or copied whole) and swapped in with one
    rename, so a reader meanwhile sees the previous run or this one, never a missing link. A failure
    only warns: the run itself does not depend on the link.
    """
    run_dir = Path(run_dir)
    if run_dir.name in ("", ".", "..", LATEST):
        return None  # a run in the working directory itself (hydra.run.dir=.) has no sibling to name
    link = run_dir.parent / LATEST
    if link.exists() and not link.is_symlink():
        log.warning("%s exists and is not a link: not replaced, so it does not name this run", link)
        return None
    # One temporary name per process: concurrent runs (or DDP ranks) never collide on it.
    tmp = run_dir.parent / f".{LATEST}.{os.getpid()}.tmp"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(run_dir.name, tmp, target_is_directory=True)
        os.replace(tmp, link)
    except OSError as e:
        log.warning("could not point %s at %s: %s", link, run_dir, e)
        tmp.unlink(missing_ok=True)
        return None
    return link


def hydra_run_root() -> Path | None:
    """This job's run directory, or under --multirun the sweep directory that holds every job's.

    None where that directory's name is not made from the start time (`hydra.run.dir=...`, an
    experiment's directories named by arm): it is found by its name, and a `latest` beside it would
    only be a second name for it, counted twice by globs such as `outputs/zh_sentiment/*/*`.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    pattern = str(OmegaConf.to_container(hc.sweep if multirun else hc.run, resolve=False)["dir"])
    if "${now:" not in pattern.rstrip("/").rsplit("/", 1)[-1]:
        return None
    if multirun:
        # Relative to where the command was started (with hydra.job.chdir the job runs elsewhere).
        return Path(hc.runtime.cwd, hc.sweep.dir)
    return Path(hc.runtime.output_dir)


def written_checkpoint(result) -> str | None:
    """The checkpoint a stage's result names: a training result's `.checkpoint`, or a report's
    "checkpoint" (convert's output, tokenizer's resized copy); None for stages that write none."""
    path = result.get("checkpoint") if isinstance(result, dict) else getattr(result, "checkpoint", None)
    return os.path.abspath(path) if path else None
