"""`python -m llama_zh [group=option ...] [key=value ...]`: one Hydra entry point for every stage."""

from __future__ import annotations

import logging
import os
import sys

# Before anything imports wandb: never wait on a W&B server unless the user asked for one.
os.environ.setdefault("WANDB_MODE", "offline")

import hydra
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from llama_zh.errors import LlamaZhError

log = logging.getLogger("llama_zh")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig):
    from llama_zh.stages import run_stage

    try:
        return run_stage(cfg)
    except (LlamaZhError, MissingMandatoryValue) as e:
        # Bad input: one line naming the file, line or field; the run directory keeps the log.
        log.error("%s", e)
        print(f"llama_zh: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
