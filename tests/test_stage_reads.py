"""Each stage is handed, resolves and records only the config groups it reads (llama_zh.stages.READS)."""

from pathlib import Path

import pytest
from helpers import llama_zh
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from llama_zh import stages
from llama_zh.config import CONF_DIR, ConfigError
from llama_zh.stages import check_unread, kept_keys, narrow, plain, tracking_slice
from llama_zh.tracking import run_config

RUN = {*stages.RUN_KEYS, "experiment_name"}
TRAINING = {"stage", "paths", "trainer", "hardware", "strategy", "optim", "finetune", "callbacks", "logger", *RUN}
# Written out by hand from the stages' code, not derived from READS: a change to READS must change this.
EXPECTED = {
    "prepare": {"stage", "paths", "data", "tokenizer"},
    "tokenizer": {"stage", "paths", "data", "seed", "logger", "experiment_name"},
    "convert": {"stage", "paths", "model"},
    "pretrain": TRAINING | {"model", "tokenizer", "data"},
    # data only through logger.wandb.tags' ${data.name}
    "sft": TRAINING | {"template", "data"},
    "dpo": TRAINING | {"template", "data"},
    "eval": {"stage", "paths", "data", "template", "trainer", "quant", "seed", "logger", "experiment_name"},
    # seed through stage.seed's ${seed}
    "infer": {"stage", "paths", "template", "trainer", "quant", "seed"},
    "serve": {"stage", "paths", "template", "trainer", "quant"},
}


def config(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["paths.output_dir=/tmp/x", "paths.root_dir=/tmp", *overrides])


def test_every_stage_has_a_table():
    assert set(EXPECTED) == set(stages.STAGES) == set(stages.READS)


@pytest.mark.parametrize("stage", sorted(EXPECTED))
def test_each_stage_keeps_exactly_its_groups(stage):
    cfg = narrow(config(f"stage={stage}"))
    assert set(cfg) == EXPECTED[stage]


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo", "eval", "tokenizer"])
def test_the_recorded_config_holds_only_what_the_stage_read(stage):
    values = run_config(tracking_slice(narrow(config(f"stage={stage}"))).config)
    assert set(values) - {"git_commit", "choices", "data_mix"} == EXPECTED[stage]
    assert set(values["choices"]) <= EXPECTED[stage]


def test_a_sweep_over_optim_lr_still_finds_it_in_the_recorded_config():
    values = run_config(tracking_slice(narrow(config("stage=pretrain", "optim.lr=0.002"))).config)
    assert values["optim"]["lr"] == 0.002


def test_an_unset_env_var_or_missing_value_in_an_unread_group_is_never_resolved(monkeypatch):
    monkeypatch.delenv("LLAMA_ZH_TEST_NEVER_SET", raising=False)
    cfg = config("stage=convert")
    with open_dict(cfg):
        cfg.optim.lr = "${oc.env:LLAMA_ZH_TEST_NEVER_SET}"
        cfg.strategy.name = "???"
    with pytest.raises((InterpolationResolutionError, MissingMandatoryValue)):
        plain(cfg)  # the whole config fails to resolve ...
    narrowed = narrow(cfg)
    assert "optim" not in narrowed and "strategy" not in narrowed
    plain(narrowed.model)  # ... what convert reads does


def test_a_key_an_interpolation_names_is_kept():
    cfg = config("stage=convert")
    with open_dict(cfg):
        cfg.stage.dst = "${study_dir}/converted"
        cfg.study_dir = "/tmp/study"
    assert "study_dir" in kept_keys(cfg)
    assert narrow(cfg).stage.dst == "/tmp/study/converted"


class _Overrides:
    def __init__(self, task):
        self.overrides = type("O", (), {"task": task})()


@pytest.fixture
def hydra_overrides(monkeypatch):
    from hydra.core.hydra_config import HydraConfig

    def set_task(*task):
        monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
        monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: _Overrides(list(task))))

    return set_task


@pytest.mark.parametrize(
    "stage, override",
    [("convert", "optim.lr=1"), ("serve", "optim.weight_decay=0"), ("infer", "+strategy.x=1"), ("sft", "model.dim=8")],
)
def test_an_override_of_an_unread_group_is_refused_in_one_line(stage, override, hydra_overrides, monkeypatch):
    monkeypatch.delenv(stages.EXTRA_OVERRIDES_ENV, raising=False)
    cfg = config(f"stage={stage}")
    hydra_overrides(f"stage={stage}", override)
    group = override.lstrip("+").split(".")[0]
    with pytest.raises(ConfigError) as caught:
        check_unread(cfg, kept_keys(cfg))
    assert str(caught.value) == f"{override}: stage={stage} does not read {group}, so it would be ignored; drop it"


def test_overrides_of_read_groups_and_group_choices_pass(hydra_overrides, monkeypatch):
    monkeypatch.delenv(stages.EXTRA_OVERRIDES_ENV, raising=False)
    cfg = config("stage=convert")
    hydra_overrides("stage=convert", "model=llama_7b", "paths.data_dir=/d", "debug=fast", "hydra.run.dir=/r")
    check_unread(cfg, kept_keys(cfg))
    hydra_overrides("stage=convert", "logger=csv", "trainer=cpu", "optim=adamw8bit")  # a setup, not a value
    check_unread(cfg, kept_keys(cfg))


def test_the_smoke_test_overrides_are_exempt(hydra_overrides, monkeypatch):
    monkeypatch.setenv(stages.EXTRA_OVERRIDES_ENV, "trainer.max_steps=6 'stage.pad_token=<pad>'")
    cfg = config("stage=convert")
    hydra_overrides("stage=convert", "trainer.max_steps=6")
    check_unread(cfg, kept_keys(cfg))
    hydra_overrides("stage=convert", "trainer.max_steps=7")
    with pytest.raises(ConfigError, match=r"^trainer.max_steps=7: stage=convert does not read trainer"):
        check_unread(cfg, kept_keys(cfg))


def test_convert_runs_with_an_unresolvable_unread_group(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMA_ZH_TEST_NEVER_SET", raising=False)
    directory, _ = tiny_checkpoint
    extra = "trainer.max_steps=6 +optim.unset=${oc.env:LLAMA_ZH_TEST_NEVER_SET}"
    llama_zh(
        "stage=convert",
        f"stage.src={directory}",
        "stage.src_format=native",
        f"stage.dst={tmp_path / 'out'}",
        run_dir=tmp_path / "run",
        data_dir=tmp_path / "data",
        env_extra={stages.EXTRA_OVERRIDES_ENV: extra},
        timeout=300,
    )
    assert any(Path(tmp_path / "out").iterdir())


def test_convert_refuses_a_users_override_of_an_unread_group(tmp_path, monkeypatch):
    monkeypatch.delenv(stages.EXTRA_OVERRIDES_ENV, raising=False)
    result = llama_zh(
        "stage=convert",
        "stage.src=/nonexistent",
        "optim.lr=1",
        run_dir=tmp_path / "run",
        data_dir=tmp_path / "data",
        check=False,
        timeout=300,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("llama_zh: error:")]
    assert errors == ["llama_zh: error: optim.lr=1: stage=convert does not read optim, so it would be ignored; drop it"]
    assert not (tmp_path / "run" / "converted").exists()
