"""stage=infer: a prompts file (one per line) -> an answers file (one answer per prompt, then a blank line)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from llama_zh.checkpoint import load_checkpoint
from llama_zh.config import ConfigError
from llama_zh.data.corpus import DataError
from llama_zh.data.sft import Template
from llama_zh.errors import LlamaZhError
from llama_zh.generate import SamplingConfig, generate

log = logging.getLogger(__name__)


def read_prompts(path: Path) -> list[str]:
    """Non-empty lines of a UTF-8 file; invalid UTF-8 names the line."""
    if not path.is_file():
        raise DataError(f"stage.prompts: {path} does not exist")
    prompts = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if line.strip():
                prompts.append(line)
    if not prompts:
        raise DataError(f"{path}: no prompts (the file is empty)")
    return prompts


def sampling_config(stage: DictConfig) -> SamplingConfig:
    try:
        return SamplingConfig(temperature=stage.temperature, top_k=stage.top_k, top_p=stage.top_p,
                              repetition_penalty=stage.repetition_penalty, repetition_window=stage.repetition_window,
                              max_new_tokens=stage.max_new_tokens, seed=stage.seed, stop_strings=list(stage.stop),
                              penalty_after_filters=stage.penalty_after_filters)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def run(cfg: DictConfig):
    stage = cfg.stage
    sampling = sampling_config(stage)
    prompts = read_prompts(Path(stage.prompts))
    model, tokenizer = load_checkpoint(stage.checkpoint)
    if tokenizer is None:
        raise LlamaZhError(f"stage.checkpoint: {stage.checkpoint} has no tokenizer.model")
    template = Template.from_config(cfg.template) if stage.apply_template else None

    out = Path(stage.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    new_tokens, start = 0, time.perf_counter()
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for i, prompt in enumerate(prompts):
                text = template.format(prompt) if template else prompt
                ids = generate(model, tokenizer.encode(text, bos=True), sampling, tokenizer=tokenizer)
                new_tokens += len(ids)
                answer = tokenizer.decode(ids)
                f.write(answer + "\n\n")
                log.info("[%d/%d] %s -> %s", i + 1, len(prompts), prompt[:40], answer[:80].replace("\n", " "))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    elapsed = time.perf_counter() - start
    log.info("%d answers, %d new tokens in %.1f s (%.1f tokens/s): %s", len(prompts), new_tokens, elapsed,
             new_tokens / max(elapsed, 1e-9), out)
    return str(out)
