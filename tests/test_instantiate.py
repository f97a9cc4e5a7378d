"""The groups that are a constructor's arguments (`_target_` + its arguments: trainer=, strategy=,
logger.wandb, callbacks) and the hardware= node: what each shipped file builds, what the command line can
add or drop, and the one-line errors of a wrong target or argument."""

import csv
import inspect
import logging
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
from helpers import llama_zh
from hydra import compose, initialize_config_dir

from llama_zh.config import CONF_DIR, ConfigError, ModelConfig
from llama_zh.errors import LlamaZhError
from llama_zh.stages import callbacks_slice, strategy_slice, tracking_slice, train_settings, trainer_factory
from llama_zh.train.callbacks import MemoryReport, MixtureShares, ProgressLog, Throughput
from llama_zh.train.fit import RUN_FACTS, configured_callbacks
from llama_zh.train.hardware import batch_plan, device_memory_bytes, peak_flops
from llama_zh.train.strategies import StrategyConfig, is_deepspeed


def config(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["paths.output_dir=/tmp/x", "paths.root_dir=/tmp", *overrides])


def options(group: str) -> list[str]:
    found = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    assert found, group  # a glob that finds nothing must not pass
    return found


@pytest.mark.parametrize("trainer", options("trainer"))
def test_each_trainer_file_is_a_lightning_trainer_partial(trainer):
    factory = trainer_factory(config(f"trainer={trainer}"))
    assert factory.func is pl.Trainer
    inspect.signature(pl.Trainer).bind_partial(**factory.keywords)  # every key an argument
    if factory.keywords["accelerator"] == "cpu":  # a GPU trainer is only built where there are GPUs
        built = factory(logger=False, enable_checkpointing=False)
        assert isinstance(built, pl.Trainer) and built.max_steps == factory.keywords["max_steps"]


@pytest.mark.parametrize("strategy", options("strategy"))
def test_each_strategy_file_builds_its_config(strategy):
    built = strategy_slice(config(f"strategy={strategy}"))
    assert type(built) is StrategyConfig and built.name == strategy
    assert is_deepspeed(built) == strategy.startswith("zero")


@pytest.mark.parametrize("logger, wandb", [("wandb", "WandbConfig"), ("csv", None)])
def test_each_logger_file_builds_its_settings(logger, wandb):
    assert logger in options("logger")
    built = tracking_slice(config(f"logger={logger}")).wandb
    assert (type(built).__name__ if built is not None else None) == wandb
    if built is not None:
        assert (built.mode, built.tags) == ("offline", ["pretrain", "sample_zh"])


def made(factories, **facts):
    facts = {
        "flops_per_token": 6.0,
        "peak_flops": None,
        "source_names": ["news"],
        "memory_plan": None,
        "progress_bar": False,
    } | facts
    assert set(facts) == set(RUN_FACTS)
    return configured_callbacks(factories, facts)


def test_the_callbacks_node_builds_each_callback_with_the_run_facts_it_names():
    built = made(callbacks_slice(config()), peak_flops=3e12)
    assert [type(c) for c in built] == [MixtureShares, MemoryReport, Throughput, ProgressLog]
    assert built[0].names == ["news"]
    assert (built[2].flops_per_token, built[2].peak_flops) == (6.0, 3e12)
    assert (built[3].every_s, built[3].every_n) == (30.0, 0)  # log_progress_every_s / _n_steps


def test_callbacks_are_dropped_added_and_set_from_the_command_line():
    cfg = config(
        "~callbacks.throughput",
        "callbacks.mixture_shares=null",
        "+callbacks.lr._target_=pytorch_lightning.callbacks.LearningRateMonitor",
        "+callbacks.lr.logging_interval=step",
        "log_progress_every_n_steps=5",
    )
    built = made(callbacks_slice(cfg))
    assert [type(c).__name__ for c in built] == ["MemoryReport", "ProgressLog", "LearningRateMonitor"]
    assert built[1].every_n == 5 and built[2].logging_interval == "step"
    # A fact the node sets itself is the node's.
    mine = made(callbacks_slice(config("+callbacks.throughput.peak_flops=5.0")), peak_flops=3e12)
    assert next(c for c in mine if isinstance(c, Throughput)).peak_flops == 5.0


def test_a_callback_target_that_makes_no_callback_is_refused_by_name():
    with pytest.raises(LlamaZhError, match=r"^callbacks\.x: made a dict, not a Lightning Callback$"):
        made(callbacks_slice(config("+callbacks.x._target_=builtins.dict")))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["+trainer.max_step=3"],
            "trainer.max_step: unknown argument of pytorch_lightning.Trainer (did you mean trainer.max_steps?)",
        ),
        (["+trainer.memory_gb=40"], "trainer.memory_gb: moved to hardware.memory_gb (the hardware= node)"),
        (["+trainer.logger=false"], "trainer.logger: set by llama_zh itself when it builds pytorch_lightning.Trainer"),
        (
            ["strategy._target_=llama_zh.train.strategies.Nope"],
            "strategy._target_=llama_zh.train.strategies.Nope: cannot be imported "
            "(llama_zh.train.strategies has no attribute Nope)",
        ),
        (
            ["+strategy.activation_checkpoint=true"],
            "strategy.activation_checkpoint: unknown argument of llama_zh.train.strategies.StrategyConfig "
            "(did you mean strategy.activation_checkpointing?)",
        ),
        (
            ["strategy=zero2", "+strategy.deepspeed.stag=3"],
            "strategy.deepspeed.stag: unknown key (did you mean strategy.deepspeed.stage?)",
        ),
        (
            ["+callbacks.throughput.peak=1"],
            "callbacks.throughput.peak: unknown argument of llama_zh.train.callbacks.Throughput",
        ),
        (
            ["+callbacks.stop._target_=pytorch_lightning.callbacks.EarlyStopping"],
            "callbacks.stop.monitor: missing (a required argument of pytorch_lightning.callbacks.EarlyStopping)",
        ),
        (["+logger.wandb.projekt=x"], "logger.wandb.projekt: unknown argument of llama_zh.tracking.WandbConfig"),
        (["+hardware.memory=40"], "hardware.memory: unknown key (did you mean hardware.memory_gb?)"),
    ],
)
def test_a_wrong_target_or_argument_is_one_line_naming_group_and_key(overrides, message):
    with pytest.raises(ConfigError) as caught:
        train_settings(config(*overrides))
    text = str(caught.value)
    assert text.startswith(message) and "\n" not in text, text


def test_a_value_the_constructor_refuses_is_one_line_naming_the_group():
    with pytest.raises(ConfigError) as caught:
        train_settings(config("strategy=zero2", "strategy.deepspeed=7"))
    assert str(caught.value) == "strategy.deepspeed=7: expected a mapping of DeepSpeed settings, or null (no DeepSpeed)"
    with pytest.raises(ConfigError) as caught:
        train_settings(config("strategy._target_=builtins.int"))  # no signature: the call itself refuses
    text = str(caught.value)
    assert text.startswith("strategy (builtins.int): TypeError: ") and "\n" not in text, text
    lr = callbacks_slice(
        config(
            "+callbacks.lr._target_=pytorch_lightning.callbacks.LearningRateMonitor",
            "+callbacks.lr.logging_interval=minute",
        )
    )
    with pytest.raises(LlamaZhError) as caught:
        made(lr)
    text = str(caught.value)
    assert text.startswith("callbacks.lr (LearningRateMonitor): MisconfigurationException: logging_interval")
    assert "\n" not in text


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without GPUs")
def test_hardware_facts_of_a800x8_reach_the_memory_plan_and_mfu(caplog):
    from llama_zh.train.memory_check import memory_plan_check

    settings = train_settings(config("trainer=a800x8"))
    assert settings.hardware.name == "a800"
    assert device_memory_bytes(settings.trainer, settings.hardware) == 80 * 1024**3
    assert peak_flops(settings.hardware) == 312e12
    seven_b = ModelConfig.from_name("llama_7b").with_vocab(32000)
    plan = batch_plan(1, 2048, settings.trainer, None)
    with caplog.at_level(logging.INFO, logger="llama_zh.train.memory_check"):
        memory_plan_check(settings, seven_b, seven_b.n_params, plan)  # ZeRO-2 over 8 x 80 GB: fits
    assert "trainer=a800x8, hardware=a800, strategy=zero2" in caplog.text
    assert re.search(r"available +80\.000", caplog.text)
    smaller = train_settings(config("trainer=a800x8", "hardware.memory_gb=20"))
    with pytest.raises(LlamaZhError, match=r"GiB per GPU planned, 20\.0 GiB available"):
        memory_plan_check(smaller, seven_b, seven_b.n_params, plan)


def test_a_wrong_argument_fails_the_entry_point_in_one_line_before_anything_runs(tmp_path):
    result = llama_zh(
        "+trainer.max_step=3", run_dir=tmp_path / "run", data_dir=tmp_path / "data", check=False, timeout=300
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "llama_zh: error: trainer.max_step: unknown argument of pytorch_lightning.Trainer" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "data").exists()


def test_a_callback_dropped_and_one_added_on_the_command_line_take_effect_in_a_run(tmp_path):
    llama_zh(
        "debug=fast",
        "logger=csv",
        "data.seq_len=32",
        "data.batch_size=2",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false",
        "~callbacks.throughput",
        "+callbacks.lr._target_=pytorch_lightning.callbacks.LearningRateMonitor",
        run_dir=tmp_path / "run",
        data_dir=tmp_path / "data",
        timeout=600,
    )
    with open(Path(tmp_path / "run" / "metrics.csv")) as f:
        columns = {k for row in csv.DictReader(f) for k, v in row.items() if v}
    assert "train/loss" in columns and "data/share_news" in columns  # the others still there
    assert not {"train/tokens_per_s", "train/step_time_s"} & columns  # Throughput dropped
    assert any(c.startswith("lr-") for c in columns), columns  # LearningRateMonitor added
