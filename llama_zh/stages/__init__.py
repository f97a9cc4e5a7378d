"""One module per stage, each with `run(cfg)`: a thin composition of the library's parts.

The Hydra config stops here. A stage turns each group it reads into its typed object once, with the
functions below (`trainer_slice(cfg)`, `data_slice(cfg)`, ...), and passes those down: the library
below takes dataclasses, never a DictConfig, and reads no key with a default of its own, so that
llama_zh/conf/ is the one place a default lives. The groups that are a constructor's arguments (a
`_target_`) are instantiated through stages/targets.py.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from omegaconf import DictConfig, OmegaConf

from llama_zh.config import CONF_DIR, ConfigError, ModelConfig, check_keys, from_mapping, group_defaults

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from llama_zh.data.prepare import DataConfig, TokenizerConfig
    from llama_zh.eval.report import SweepJob
    from llama_zh.quant import QuantConfig
    from llama_zh.tracking import TrackingConfig
    from llama_zh.train.finetune import FinetuneConfig
    from llama_zh.train.fit import TrainSettings
    from llama_zh.train.hardware import HardwareConfig, TrainerConfig
    from llama_zh.train.module import OptimConfig
    from llama_zh.train.strategies import StrategyConfig


log = logging.getLogger(__name__)


# Each stage's run function, imported when that stage runs: a stage's imports (Lightning for training,
# the server for serve) are not paid by the others.
def _prepare(cfg: DictConfig):
    from llama_zh.stages.prepare import run

    return run(cfg)


def _tokenizer(cfg: DictConfig):
    from llama_zh.stages.tokenizer import run

    return run(cfg)


def _convert(cfg: DictConfig):
    from llama_zh.stages.convert import run

    return run(cfg)


def _pretrain(cfg: DictConfig):
    from llama_zh.stages.pretrain import run

    return run(cfg)


def _sft(cfg: DictConfig):
    from llama_zh.stages.sft import run

    return run(cfg)


def _dpo(cfg: DictConfig):
    from llama_zh.stages.dpo import run

    return run(cfg)


def _eval(cfg: DictConfig):
    from llama_zh.stages.eval import run

    return run(cfg)


def _infer(cfg: DictConfig):
    from llama_zh.stages.infer import run

    return run(cfg)


def _serve(cfg: DictConfig):
    from llama_zh.stages.serve import run

    return run(cfg)


RUNS: dict[str, Callable[[DictConfig], Any]] = {
    "prepare": _prepare,
    "tokenizer": _tokenizer,
    "convert": _convert,
    "pretrain": _pretrain,
    "sft": _sft,
    "dpo": _dpo,
    "eval": _eval,
    "infer": _infer,
    "serve": _serve,
}
STAGES = tuple(RUNS)

# The root config's keys a training stage hands llama_zh.train.fit as they are.
RUN_KEYS = (
    "seed",
    "global_batch_size",
    "resume",
    "state_every_n_steps",
    "state_keep_last",
    "log_progress_every_s",
    "log_progress_every_n_steps",
    "memory_check",
    "loss",
)
# What tracking_slice reads, and what train_settings reads besides the stage's own groups.
TRACKING_KEYS = ("logger", "experiment_name")
TRAINING_KEYS = ("trainer", "hardware", "strategy", "optim", "finetune", "callbacks", *TRACKING_KEYS, *RUN_KEYS)
# Every stage reads its own `stage` group and writes into the run directory (paths).
COMMON_KEYS = ("stage", "paths")

# The root config's groups and keys each stage reads besides COMMON_KEYS, walked from stages/<name>.py
# and the slices it builds. A stage is handed only these (and what their interpolations name): a group
# it never reads is neither resolved (an unset ${oc.env:...} or ??? there cannot fail it) nor logged
# with the run. Hydra's `+group.key=value` adds any key, and a reader that looks keys up by name never
# sees a misspelt one: the groups listed here are checked before the stage runs.
READS: dict[str, tuple[str, ...]] = {
    "prepare": ("data", "tokenizer"),
    "tokenizer": ("data", "seed", *TRACKING_KEYS),
    "convert": ("model",),
    "pretrain": ("model", "tokenizer", "data", *TRAINING_KEYS),
    "sft": ("template", *TRAINING_KEYS),
    "dpo": ("template", *TRAINING_KEYS),
    "eval": ("data", "template", "trainer", "quant", "seed", *TRACKING_KEYS),
    "infer": ("template", "trainer", "quant"),
    "serve": ("template", "trainer", "quant"),
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


def _task_overrides() -> list[str]:
    """The command line's overrides as typed: an override's value may hold an interpolation
    (`+optim.x=${oc.env:...}`) that must not be resolved merely to read the override's key."""
    from hydra.core.hydra_config import HydraConfig

    task = HydraConfig.get().overrides.task
    return list(OmegaConf.to_container(task, resolve=False) if OmegaConf.is_config(task) else task)


def chosen(group: str) -> list[str]:
    """How the user chose `group` explicitly: the command-line overrides that set it or one of its keys
    (`model=llama_7b`, `model.dim=256`, `+model.x=1`), or `group=<option>` when an experiment's defaults
    changed it. [] outside a Hydra run or when the group is the root config's default, untouched."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    hydra_cfg = HydraConfig.get()
    found = []
    for override in _task_overrides():
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
        if group not in KNOWN:
            continue
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


# Overrides added to every command line by llama_zh/__main__.py (a smoke test's shortening).
EXTRA_OVERRIDES_ENV = "LLAMA_ZH_EXTRA_OVERRIDES"

# `${key...}` naming a root key, not a resolver call such as ${oc.env:...} or ${hydra:...} (whose
# arguments may hold references of their own, found on their own).
_REFERENCE = re.compile(r"\$\{([A-Za-z_]\w*)(?=[.}\[$])")


def _references(cfg: DictConfig, key: str) -> set[str]:
    """The root keys the interpolations under `key` name, read from the unresolved text."""
    text = OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, [key]))
    return set(_REFERENCE.findall(text))


def kept_keys(cfg: DictConfig) -> list[str]:
    """The root keys stage=<name> reads (READS and COMMON_KEYS), plus those their interpolations name
    (an experiment's `arm`, `${data.name}` in logger.wandb.tags), in the config's own order."""
    keep, pending = set(), [*COMMON_KEYS, *READS.get(cfg.stage.name, ())]
    while pending:
        key = pending.pop()
        if key in keep or key not in cfg:
            continue
        keep.add(key)
        pending.extend(_references(cfg, key))
    return [key for key in cfg if key in keep]


def _extra_overrides() -> set[str]:
    try:
        return set(shlex.split(os.environ.get(EXTRA_OVERRIDES_ENV, "")))
    except ValueError:
        return set()


def check_unread(cfg: DictConfig, keep: list[str]) -> None:
    """Refuse a command-line override of a root key or group the stage does not read.

    It would be dropped without effect (`stage=convert optim.lr=1`), and a user who typed it expects it
    to matter: one line naming it is better than a silent no-op. Exempt: the overrides added by
    LLAMA_ZH_EXTRA_OVERRIDES, which a smoke test puts after every documented command alike
    (`trainer.max_steps=6` after a convert too), group choices that have no node of their own
    (experiment=, debug=, hydra.*), which set keys of several groups at once, and the choice of an
    option for an unread group (`logger=csv`, `trainer=cpu`): it names a setup, often kept in a shell
    alias for every stage, and asks for no particular value (logged; `model=` is refused by
    check_options, since a user naming a shape expects it to be used).
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    exempt = _extra_overrides()
    name = cfg.stage.name
    for override in _task_overrides():
        key = override.split("=", 1)[0].lstrip("+~").split(".", 1)[0].split("@", 1)[0]
        if key in keep or key not in cfg:
            continue
        choice = "." not in override.split("=", 1)[0] and not override.startswith(("+", "~"))
        if override in exempt or choice:
            log.info("%s: stage=%s does not read %s; ignored", override, name, key)
            continue
        raise ConfigError(f"{override}: stage={name} does not read {key}, so it would be ignored; drop it")


def narrow(cfg: DictConfig) -> DictConfig:
    """The composed config cut to the root keys `kept_keys` names, unresolved. A stage and its logs see
    only this: the recorded config (hparams.yaml, W&B) holds what the run read, and nothing in an
    unread group is ever resolved."""
    narrowed = OmegaConf.masked_copy(cfg, kept_keys(cfg))
    OmegaConf.set_struct(narrowed, OmegaConf.is_struct(cfg))
    return narrowed


def run_stage(cfg: DictConfig):
    name = cfg.stage.name
    if name not in RUNS:
        raise ConfigError(f"stage={name}: unknown stage; expected one of {', '.join(RUNS)}")
    keep = kept_keys(cfg)
    check_options(cfg)
    check_unread(cfg, keep)
    return RUNS[name](narrow(cfg))


# ------------------------------------------------------------------------ config slices -> typed objects


def plain(node: Any) -> Any:
    """A config node as plain data, interpolations resolved (a plain value is returned as it is)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def model_slice(cfg: DictConfig) -> ModelConfig:
    return from_mapping(ModelConfig, plain(cfg.model), "model", what="field")


def trainer_slice(cfg: DictConfig) -> TrainerConfig:
    """trainer=: the Lightning arguments llama_zh itself reads, typed (the Trainer is `trainer_factory`'s)."""
    from llama_zh.train.hardware import TrainerConfig

    read = {f.name for f in dataclasses.fields(TrainerConfig)}
    return from_mapping(TrainerConfig, {k: v for k, v in plain(cfg.trainer).items() if k in read}, "trainer")


def trainer_factory(cfg: DictConfig) -> Callable[..., pl.Trainer]:
    """trainer=: the pytorch_lightning.Trainer partial its `_target_` and arguments make, checked now
    (an unknown argument is refused by name before anything runs); llama_zh.train.fit completes it with
    the strategy, loggers and callbacks it builds."""
    from llama_zh.stages.targets import instantiate_node
    from llama_zh.train.fit import TRAINER_SUPPLIED
    from llama_zh.train.hardware import LLAMA_ZH_KEYS

    return instantiate_node(cfg.trainer, "trainer", own=LLAMA_ZH_KEYS, supplied=TRAINER_SUPPLIED)


def hardware_slice(cfg: DictConfig) -> HardwareConfig:
    from llama_zh.train.hardware import HardwareConfig

    return from_mapping(HardwareConfig, plain(cfg.hardware), "hardware")


def strategy_slice(cfg: DictConfig) -> StrategyConfig:
    """strategy=: its `_target_` (llama_zh.train.strategies.StrategyConfig) built from its arguments."""
    from llama_zh.stages.targets import instantiate_node

    return instantiate_node(cfg.strategy, "strategy")


def callbacks_slice(cfg: DictConfig) -> dict[str, Callable[..., Any]]:
    """callbacks: each entry's `_target_` as a partial, in the node's order; the training run completes
    each with the facts it measures that the target names (llama_zh.train.fit.RUN_FACTS)."""
    from llama_zh.stages.targets import instantiate_node
    from llama_zh.train.fit import RUN_FACTS

    return {
        str(name): instantiate_node(node, f"callbacks.{name}", offered=RUN_FACTS, _partial_=True)
        for name, node in (cfg.callbacks or {}).items()
        if node is not None  # `callbacks.x=null` drops x as `~callbacks.x` does
    }


def optim_slice(cfg: DictConfig) -> OptimConfig:
    from llama_zh.train.module import OptimConfig

    return from_mapping(OptimConfig, plain(cfg.optim), "optim")


def finetune_slice(cfg: DictConfig) -> FinetuneConfig:
    from llama_zh.train.finetune import FinetuneConfig

    return from_mapping(FinetuneConfig, plain(cfg.finetune), "finetune")


def quant_slice(cfg: DictConfig) -> QuantConfig:
    from llama_zh.quant import QuantConfig

    return from_mapping(QuantConfig, plain(cfg.quant), "quant")


def data_slice(cfg: DictConfig) -> DataConfig:
    from llama_zh.data.corpus import DataError
    from llama_zh.data.prepare import DataConfig

    return from_mapping(DataConfig, plain(cfg.data), "data", DataError)


def tokenizer_slice(cfg: DictConfig) -> TokenizerConfig:
    from llama_zh.data.prepare import TokenizerConfig

    return from_mapping(TokenizerConfig, plain(cfg.tokenizer), "tokenizer")


def _multirun():
    """Hydra's config of this job when it is one of a multirun; None for a single run or outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return hc if hc.mode == RunMode.MULTIRUN else None


def sweep_dir() -> Path | None:
    """The sweep directory of a Hydra multirun; None for a single run or outside Hydra."""
    hc = _multirun()
    return Path(hc.sweep.dir) if hc is not None else None


def sweep_job() -> SweepJob | None:
    """This job of a Hydra multirun (its sweep directory, number and overrides); None otherwise."""
    from llama_zh.eval.report import SweepJob

    hc = _multirun()
    return SweepJob(Path(hc.sweep.dir), int(hc.job.num), list(hc.overrides.task)) if hc is not None else None


def tracking_slice(cfg: DictConfig) -> TrackingConfig:
    """What the loggers need: the stage, logger.wandb (null: metrics.csv only) and the resolved config."""
    from llama_zh.stages.targets import instantiate_node
    from llama_zh.tracking import TrackingConfig

    wandb = cfg.logger.wandb
    return TrackingConfig(
        stage=cfg.stage.name,
        experiment_name=cfg.experiment_name,
        wandb=instantiate_node(wandb, "logger.wandb") if wandb is not None else None,
        config=plain(cfg),
        sweep_dir=sweep_dir(),
    )


def train_settings(cfg: DictConfig) -> TrainSettings:
    """What a training stage hands llama_zh.train.fit: the groups it reads typed, the run keys as they are."""
    from llama_zh.train.fit import TrainSettings

    return TrainSettings(
        output_dir=Path(cfg.paths.output_dir),
        trainer=trainer_slice(cfg),
        make_trainer=trainer_factory(cfg),
        hardware=hardware_slice(cfg),
        strategy=strategy_slice(cfg),
        callbacks=callbacks_slice(cfg),
        optim=optim_slice(cfg),
        finetune=finetune_slice(cfg),
        tracking=tracking_slice(cfg),
        save_every_n_steps=int(cfg.stage.save_every_n_steps),
        **{key: plain(cfg[key]) for key in RUN_KEYS},
    )
