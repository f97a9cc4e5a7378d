"""`python -m llama_zh [group=option ...] [key=value ...]`: one Hydra entry point for every stage."""

from __future__ import annotations

import logging
import os
import shlex
import sys

# Before anything imports wandb: never wait on a W&B server unless the user asked for one.
os.environ.setdefault("WANDB_MODE", "offline")

import hydra
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from llama_zh.errors import LlamaZhError
from llama_zh.stages import EXTRA_OVERRIDES_ENV

log = logging.getLogger("llama_zh")

# EXTRA_OVERRIDES_ENV: overrides added to every command line, after the user's (so they win): a smoke test runs
# documented commands exactly as written, only shorter, e.g. "trainer.max_steps=6". A stage that does
# not read a group they set ignores them (llama_zh.stages.check_unread), where it refuses the user's own.


def extra_overrides(argv: list[str], value: str | None) -> list[str]:
    """`argv` with the overrides of `value` after its own, each once: processes that re-run this
    command line (Lightning's DDP ranks) inherit both the variable and the already added overrides.

    They go right after the last override rather than at the end: Hydra's parser takes overrides as
    one run of arguments, so `stage=eval --multirun` followed by more overrides would be refused.
    """
    if not value:
        return argv
    try:
        extra = [o for o in shlex.split(value) if o not in argv[1:]]
    except ValueError as e:
        raise LlamaZhError(f"{EXTRA_OVERRIDES_ENV}: {e}") from None
    overrides = [i for i, a in enumerate(argv) if i > 0 and "=" in a and not a.startswith("-")]
    at = overrides[-1] + 1 if overrides else len(argv)
    return argv[:at] + extra + argv[at:]


def finish_tracking() -> None:
    """End the W&B run now: at interpreter exit its closing lines would follow the checkpoint line."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def sweep_objective(result):
    """What the job returns to Hydra: a training stage's last val/loss as a float (what a sweeper such
    as Optuna minimises; it takes nothing else), any other stage's result as it is."""
    objective = getattr(result, "objective", None)
    return result if objective is None else objective


def is_rank_zero() -> bool:
    from pytorch_lightning.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from llama_zh.stages import run_stage
    from llama_zh.stages.rundir import hydra_run_root, link_latest, written_checkpoint

    run_root = hydra_run_root()
    if run_root is not None:
        link_latest(run_root)
    try:
        result = run_stage(cfg)
    except (LlamaZhError, MissingMandatoryValue) as e:
        # Bad input: one line naming the file, line or field; the run directory keeps the log.
        log.error("%s", e)
        print(f"llama_zh: error: {e}", file=sys.stderr)
        sys.exit(1)
    checkpoint = written_checkpoint(result)
    if checkpoint and is_rank_zero():
        finish_tracking()
        # Last, so that CKPT=$(python -m llama_zh ... | tail -n 1) names exactly this run's checkpoint.
        print(checkpoint, flush=True)
    return sweep_objective(result)


if __name__ == "__main__":
    try:
        argv = extra_overrides(sys.argv, os.environ.get(EXTRA_OVERRIDES_ENV))
    except LlamaZhError as e:
        print(f"llama_zh: error: {e}", file=sys.stderr)
        sys.exit(2)
    if argv != sys.argv:
        # Said on every run: a variable left set in a shell would otherwise change runs silently.
        added = [a for a in argv[1:] if a not in sys.argv[1:]]
        print(f"llama_zh: {EXTRA_OVERRIDES_ENV} adds: {shlex.join(added)}", file=sys.stderr)
        sys.argv = argv
    main()
