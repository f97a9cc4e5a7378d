"""Helpers shared by test files: the entry point in a subprocess, random transformers models.

Plain functions rather than conftest fixtures because module-scoped fixtures and other helper modules
(tiny_checkpoints.py) call them too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def cli_env(data_dir: Path | str | None = None, env_extra: dict | None = None, env: dict | None = None) -> dict:
    """The environment of an entry-point run: `env` (default: this process's) offline and unbuffered, with
    built data under `data_dir` (LLAMA_ZH_DATA) where given, then `env_extra`."""
    out = dict(os.environ if env is None else env, WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if data_dir is not None:
        out["LLAMA_ZH_DATA"] = str(data_dir)
    out.update(env_extra or {})
    return out


def cli_command(*overrides: str, run_dir: Path | str | None = None) -> list[str]:
    """`python -m llama_zh OVERRIDES [hydra.run.dir=RUN_DIR]` with this interpreter."""
    args = [sys.executable, "-m", "llama_zh", *overrides]
    if run_dir is not None:
        args.append(f"hydra.run.dir={run_dir}")
    return args


def llama_zh(
    *overrides: str,
    run_dir: Path | str | None = None,
    data_dir: Path | str | None = None,
    env_extra: dict | None = None,
    env: dict | None = None,
    check: bool = True,
    stdin: str | None = None,
    timeout: float = 900,
    cwd: Path | str = REPO,
) -> subprocess.CompletedProcess:
    """`python -m llama_zh` in a subprocess (from the repository root unless `cwd`, so that the package
    under test is the one imported). With `check`, a non-zero exit fails the test with the command and the
    end of its stderr; without, the caller asserts on the returned process."""
    args = cli_command(*overrides, run_dir=run_dir)
    result = subprocess.run(
        args,
        capture_output=True,
        text=True,
        env=cli_env(data_dir, env_extra, env),
        timeout=timeout,
        cwd=cwd,
        input=stdin,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result


def random_hf_llama(
    path: Path, *, rope_parameters: dict, max_positions: int, tied: bool = False, vocab_size: int = 300
) -> tuple:
    """A seeded random transformers LlamaForCausalLM (64 wide, 2 layers, 4 heads over 2 KV heads) saved to
    `path`; returns (model, path). The norm weights are drawn from [0.5, 1.5] rather than left at 1, so
    that a dropped or misplaced norm changes the logits a parity test compares."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        rms_norm_eps=1e-5,
        max_position_embeddings=max_positions,
        rope_parameters=rope_parameters,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model, path
