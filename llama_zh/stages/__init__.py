"""One module per stage, each with `run(cfg)`: a thin composition of the library's parts."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from llama_zh.config import CONF_DIR, ConfigError, ModelConfig, check_keys, group_defaults

STAGES = ("prepare", "tokenizer", "convert", "pretrain", "sft", "dpo", "eval", "infer", "serve")

# The config groups each stage reads besides `stage`. Hydra's `+group.key=value` adds any key, and a
# reader that looks keys up by name never sees a misspelt one: these are checked before the stage runs.
READS = {
    "prepare": ("data",),
    "tokenizer": ("data",),
    "convert": ("model",),
    "pretrain": ("model", "data", "optim", "finetune"),
    "sft": ("optim", "finetune"),
    "eval": ("data", "quant"),
    "infer": ("quant",),
    "serve": ("quant",),
}


def _fields(module: str, name: str) -> Callable[[DictConfig], list[str]]:
    # Imported when asked: the training dataclasses pull in Lightning, which convert does not need.
    return lambda _: [f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name))]


# What a group's reader accepts: the fields of the dataclass it builds, or (data, whose readers take
# keys one by one) the keys of the chosen llama_zh/conf/data/<name>.yaml.
KNOWN: dict[str, Callable[[DictConfig], Any]] = {
    "model": lambda _: [f.name for f in dataclasses.fields(ModelConfig)],
    "optim": _fields("llama_zh.train.module", "OptimConfig"),
    "finetune": _fields("llama_zh.train.finetune", "FinetuneConfig"),
    "quant": _fields("llama_zh.quant", "QuantConfig"),
    "data": lambda node: group_defaults("data", str(node.get("name"))),
}
FREE = {"data.sources"}  # the user names the sources


def default_choice(group: str) -> str | None:
    """The option llama_zh/conf/config.yaml's defaults list picks for `group`."""
    for entry in yaml.safe_load((CONF_DIR / "config.yaml").read_text()).get("defaults", []):
        if isinstance(entry, dict) and group in entry:
            return entry[group]
    return None


def chosen(group: str) -> list[str]:
    """How the user chose `group` explicitly: the command-line overrides that set it or one of its keys
    (`model=llama_7b`, `model.dim=256`, `+model.x=1`), or `group=<option>` when an experiment's defaults
    changed it. [] outside a Hydra run or when the group is the root config's default, untouched."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    hydra_cfg = HydraConfig.get()
    found = []
    for override in hydra_cfg.overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == group or key.startswith(f"{group}."):
            found.append(override)
    choice = hydra_cfg.runtime.choices.get(group)
    if not found and choice is not None and choice != default_choice(group):
        found.append(f"{group}={choice}")
    return found


def check_options(cfg: DictConfig) -> None:
    """Refuse keys that `stage` (against llama_zh/conf/stage/<name>.yaml) or a group the stage reads does not know,
    and an explicit model= for a stage that never reads it."""
    name = cfg.stage.name
    if "model" not in READS.get(name, ("model",)):
        given = chosen("model")
        if given:
            raise ConfigError(
                f"{' '.join(given)}: stage={name} does not read model= (a checkpoint brings its own "
                "shape), so it would be ignored; drop it"
            )
    defaults = group_defaults("stage", name)
    if defaults is not None:
        check_keys(OmegaConf.to_container(cfg.stage, resolve=False), defaults, "stage")
    for group in READS.get(name, ()):
        node = cfg.get(group)
        known = KNOWN[group](node) if node is not None else None
        if known is not None:
            check_keys(
                OmegaConf.to_container(node, resolve=False),
                known,
                group,
                what="field" if group == "model" else "key",
                free=FREE,
            )


def run_stage(cfg):
    check_options(cfg)
    return importlib.import_module(f"llama_zh.stages.{cfg.stage.name}").run(cfg)
