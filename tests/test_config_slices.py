"""`from_mapping`: the one door from a config slice to a typed object; the slices the stages build with it."""

import ast
import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from llama_zh import stages
from llama_zh.config import CONF_DIR, ConfigError, from_mapping


@dataclass
class Inner:
    rank: int = 8


@dataclass
class Outer:
    lr: float
    inner: Inner = field(default_factory=Inner)
    tags: list = field(default_factory=list)


def test_builds_nested_dataclasses_and_keeps_defaults_in_one_place():
    built = from_mapping(Outer, {"lr": 0.1, "inner": {"rank": 4}}, "optim")
    assert built == Outer(lr=0.1, inner=Inner(rank=4))
    assert from_mapping(Outer, {"lr": 0.2}, "optim").inner == Inner()


@pytest.mark.parametrize(
    "values, message",
    [
        ({"lr": 0.1, "lrr": 1}, "optim.lrr: unknown key (did you mean optim.lr?)"),
        ({"lr": 0.1, "inner": {"rnak": 2}}, "optim.inner.rnak: unknown key (did you mean optim.inner.rank?)"),
        ({}, "optim.lr: missing (required)"),
    ],
)
def test_refuses_unknown_and_missing_keys_by_name(values, message):
    with pytest.raises(ConfigError) as caught:
        from_mapping(Outer, values, "optim")
    assert str(caught.value) == message


@dataclass
class WithOptional:
    name: str
    inner: Inner | None = None


def test_builds_an_optional_nested_dataclass_and_keeps_none():
    assert from_mapping(WithOptional, {"name": "x", "inner": {"rank": 2}}, "s").inner == Inner(rank=2)
    assert from_mapping(WithOptional, {"name": "x", "inner": None}, "s").inner is None
    with pytest.raises(ConfigError, match=r"^s\.inner\.rnak: unknown key \(did you mean s\.inner\.rank\?\)$"):
        from_mapping(WithOptional, {"name": "x", "inner": {"rnak": 2}}, "s")


def test_a_model_shapes_keys_are_called_fields():
    from llama_zh.config import ModelConfig

    with pytest.raises(ConfigError, match=r"^model\.n_layer: unknown field \(did you mean model\.n_layers\?\)$"):
        from_mapping(ModelConfig, {"n_layer": 2}, "model", what="field")


# ------------------------------------------------------------------------ the slices the stages build

PACKAGE = Path(stages.__file__).resolve().parents[1]
# Where the Hydra config may be read: the entry point that composes it, and the stages that slice it.
HYDRA_SIDE = ("__main__.py", "stages/")


def compose_config(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["paths.output_dir=/tmp/x", "paths.root_dir=/tmp", *overrides])


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):  # function-level imports count too
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def test_only_the_entry_point_and_the_stages_import_hydra_or_omegaconf():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith(HYDRA_SIDE):
            continue
        hydra = {m for m in imported_modules(path) if m.split(".")[0] in ("hydra", "omegaconf")}
        if hydra:
            offenders[relative] = sorted(hydra)
    assert offenders == {}


# (slice function, the dataclass it builds, the key of the composed config it reads)
SLICES = [
    (stages.trainer_slice, "llama_zh.train.hardware.TrainerConfig", "trainer"),
    (stages.hardware_slice, "llama_zh.train.hardware.HardwareConfig", "hardware"),
    (stages.strategy_slice, "llama_zh.train.strategies.StrategyConfig", "strategy"),
    (stages.optim_slice, "llama_zh.train.module.OptimConfig", "optim"),
    (stages.finetune_slice, "llama_zh.train.finetune.FinetuneConfig", "finetune"),
    (stages.quant_slice, "llama_zh.quant.QuantConfig", "quant"),
    (stages.data_slice, "llama_zh.data.prepare.DataConfig", "data"),
    (stages.tokenizer_slice, "llama_zh.data.prepare.TokenizerConfig", "tokenizer"),
]


def dataclass_named(dotted: str) -> type:
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def differing_defaults(cls: type, values: dict, where: str) -> list[str]:
    """The fields of `cls` whose default differs from the value the YAML gives (nested dataclasses too)."""
    differ = []
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            continue  # required: the YAML's value is the only one
        if dataclasses.is_dataclass(default):
            differ += differing_defaults(type(default), values[f.name] or {}, f"{where}.{f.name}")
        elif default != values[f.name] and not (isinstance(default, tuple) and list(default) == values[f.name]):
            differ.append(f"{where}.{f.name}: {default!r} in the code, {values[f.name]!r} in the YAML")
    return differ


def test_dataclass_defaults_equal_the_composed_yaml_defaults():
    cfg = compose_config()
    differ = []
    for _, dotted, group in SLICES:
        differ += differing_defaults(dataclass_named(dotted), OmegaConf.to_container(cfg[group], resolve=True), group)
    # The DeepSpeed block's defaults are strategy=zero2's, the first strategy that has one.
    zero2 = OmegaConf.to_container(compose_config("strategy=zero2").strategy.deepspeed, resolve=True)
    differ += differing_defaults(
        dataclass_named("llama_zh.train.strategies.DeepSpeedConfig"), zero2, "strategy.deepspeed"
    )
    # Each quantization method's keys are its own: their defaults are that method's file's.
    for method in ("int8", "nf4"):
        values = OmegaConf.to_container(compose_config(f"quant={method}").quant, resolve=True)
        del values["name"]  # the method itself: "none" by default
        differ += differing_defaults(dataclass_named("llama_zh.quant.QuantConfig"), values, f"quant={method}")
    # One FinetuneConfig serves every method: each option file's keys default to that file's values.
    options = group_options("finetune")
    assert len(options) >= 4, options  # a renamed conf directory must not leave nothing to compare
    for option in options:
        values = OmegaConf.to_container(compose_config(f"finetune={option}").finetune, resolve=True)
        del values["method"]  # the method itself: "full" by default
        differ += differing_defaults(
            dataclass_named("llama_zh.train.finetune.FinetuneConfig"), values, f"finetune={option}"
        )
    assert differ == []


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "slicer, group, option",
    [
        (slicer, group, option)
        for slicer, _, group in SLICES
        for option in group_options(group)
        if not (group == "tokenizer" and option == "file")  # its path is mandatory (???)
    ],
)
def test_every_shipped_option_builds_its_typed_object(slicer, group, option, monkeypatch):
    monkeypatch.setenv("SLURM_NNODES", "1")
    built = slicer(compose_config(f"{group}={option}"))
    assert dataclasses.is_dataclass(built)


def test_the_root_run_keys_are_read_from_the_yaml_without_a_default_of_their_own():
    from llama_zh.stages import train_settings

    cfg = compose_config()
    settings = train_settings(cfg)
    assert (settings.state_every_n_steps, settings.state_keep_last) == (100, 2)  # config.yaml's
    assert (settings.resume, settings.memory_check, settings.log_progress_every_s) == ("auto", True, 30)
    with open_dict(cfg):
        del cfg["state_every_n_steps"]
    with pytest.raises(Exception, match="state_every_n_steps"):  # a key gone from the YAML is not defaulted in code
        train_settings(cfg)


def test_each_stage_name_dispatches_to_its_own_run_function(monkeypatch):
    assert set(stages.RUNS) == set(group_options("stage"))
    for name, run in stages.RUNS.items():
        module = importlib.import_module(f"llama_zh.stages.{name}")
        monkeypatch.setattr(module, "run", lambda cfg, name=name: f"ran {name}")
        assert run(None) == f"ran {name}"


def test_an_unknown_stage_is_refused_by_name():
    cfg = OmegaConf.create({"stage": {"name": "pretrian"}})
    with pytest.raises(ConfigError, match="stage=pretrian: unknown stage; expected one of prepare, tokenizer"):
        stages.run_stage(cfg)
