"""trainer= x strategy= composition, batch arithmetic, and the checks that fail before launch."""

from pathlib import Path

import pytest
from helpers import llama_zh
from hydra import compose, initialize_config_dir

from llama_zh.errors import LlamaZhError
from llama_zh.stages import strategy_slice, trainer_factory, trainer_slice
from llama_zh.train.hardware import LLAMA_ZH_KEYS, TrainerConfig, batch_plan, check_hardware
from llama_zh.train.strategies import DeepSpeedAnyDevice, build_strategy

CONF = str(Path(__file__).resolve().parents[1] / "llama_zh" / "conf")
TRAINERS = sorted(p.stem for p in (Path(CONF) / "trainer").glob("*.yaml"))
STRATEGIES = sorted(p.stem for p in (Path(CONF) / "strategy").glob("*.yaml"))


def config(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_groups_were_found():
    assert {"cpu", "cpu_ddp2", "gpu1", "a800x8", "multinode"} <= set(TRAINERS)
    assert {"auto", "ddp", "zero2", "zero3", "zero3_offload"} <= set(STRATEGIES)


@pytest.mark.parametrize(
    "trainer,strategy,precision",
    [
        ("cpu", "auto", "32-true"),
        ("cpu_ddp2", "ddp", "32-true"),
        ("gpu1", "auto", "bf16-mixed"),
        ("a800x8", "zero2", "bf16-mixed"),
        ("multinode", "zero2", "bf16-mixed"),
    ],
)
def test_each_trainer_names_its_default_strategy_and_precision(trainer, strategy, precision):
    cfg = config(f"trainer={trainer}")
    assert (cfg.trainer.name, cfg.strategy.name, cfg.trainer.precision) == (trainer, strategy, precision)


def test_command_line_strategy_wins_over_the_trainers_default():
    assert config("trainer=a800x8", "strategy=zero3_offload").strategy.name == "zero3_offload"
    assert config("strategy=zero3", "trainer=a800x8").strategy.name == "zero3"


@pytest.mark.parametrize("trainer", TRAINERS)
def test_trainer_files_give_valid_lightning_arguments(trainer):
    import inspect

    import pytorch_lightning as pl

    factory = trainer_factory(config(f"trainer={trainer}"))
    assert factory.func is pl.Trainer
    args = factory.keywords
    assert not set(args) & set(LLAMA_ZH_KEYS)
    assert set(args) <= set(inspect.signature(pl.Trainer.__init__).parameters)


def test_multinode_reads_node_count_from_the_environment(monkeypatch):
    monkeypatch.setenv("SLURM_NNODES", "4")
    assert config("trainer=multinode").trainer.num_nodes == 4
    monkeypatch.setenv("NUM_NODES", "2")
    monkeypatch.setenv("GPUS_PER_NODE", "4")
    cfg = config("trainer=multinode")
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (2, 4)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_builds(strategy):
    cfg = config(f"strategy={strategy}")
    built = build_strategy(strategy_slice(cfg), micro_batch=4)
    if strategy.startswith("zero"):
        assert isinstance(built, DeepSpeedAnyDevice)
        zero = built.config["zero_optimization"]
        assert zero["stage"] == cfg.strategy.deepspeed.stage
        assert ("offload_optimizer" in zero) == ("offload" in strategy)
        assert built.config["train_micro_batch_size_per_gpu"] == 4


def trainer_cfg(**values):
    base = {"name": "t", "accelerator": "cpu", "devices": 1, "num_nodes": 1, "accumulate_grad_batches": 1}
    return TrainerConfig(**(base | values))


def test_global_batch_arithmetic():
    plan = batch_plan(8, 512, trainer_cfg(devices=8, num_nodes=4, accumulate_grad_batches=2), None)
    assert plan.global_batch == 8 * 8 * 4 * 2 and plan.tokens_per_step == plan.global_batch * 512
    assert "global batch 512 sequences = micro batch 8 x devices 8 x nodes 4 x accumulation 2" in plan.describe()
    derived = batch_plan(4, 256, trainer_cfg(devices=2), 64)
    assert derived.accumulation == 8 and derived.global_batch == 64


@pytest.mark.parametrize(
    "global_batch,message",
    [
        (
            60,
            "global_batch_size=60 is not a positive multiple of micro batch 4 x devices 2 x nodes 1 = 8; use 56 or 64",
        ),
        (4, "use 8 or 16"),
        (0, "global_batch_size=0 is not a positive multiple"),
    ],
)
def test_global_batch_that_does_not_divide_is_refused(global_batch, message):
    with pytest.raises(LlamaZhError, match=message.replace("(", r"\(").replace(")", r"\)")):
        batch_plan(4, 256, trainer_cfg(devices=2), global_batch)


def test_global_batch_and_a_different_accumulation_conflict():
    with pytest.raises(LlamaZhError, match="set only one of them"):
        batch_plan(4, 256, trainer_cfg(accumulate_grad_batches=3), 32)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without GPUs")
def test_gpu_trainer_without_gpu_suggests_cpu_trainer():
    with pytest.raises(LlamaZhError, match="trainer=a800x8 needs CUDA GPUs .* use trainer=cpu"):
        check_hardware(trainer_slice(config("trainer=a800x8")))


def entry_point(*overrides, tmp_path):
    return llama_zh(*overrides, run_dir=tmp_path / "run", data_dir=tmp_path / "data", check=False, timeout=300)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["trainer=a800x8"], "use trainer=cpu"),
        (
            ["global_batch_size=12", "data.batch_size=8"],
            "global_batch_size=12 is not a positive multiple of micro batch 8",
        ),
        (["strategy=zero2", "strategy.deepspeed.offload_parameters=true"], "offload_parameters needs stage 3"),
    ],
)
def test_bad_training_setup_fails_before_launch(overrides, message, tmp_path):
    if overrides == ["trainer=a800x8"] and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = entry_point(*overrides, tmp_path=tmp_path)
    assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    # Failed before anything heavy: no corpus built, no checkpoint directory.
    assert not (tmp_path / "data").exists() and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "option,plugin,target",
    [
        ("+sweep=optuna_lr", "hydra_plugins.hydra_optuna_sweeper", "sweeper"),
        ("+launcher=slurm", "hydra_plugins.hydra_submitit_launcher", "launcher"),
    ],
)
def test_optional_sweeper_and_launcher_configs_compose(option, plugin, target):
    pytest.importorskip(plugin, reason="optional extra (pip install llama_zh[sweep] / [slurm])")
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[option, "trainer=multinode"], return_hydra_config=True)
    assert plugin.split(".")[1] in cfg.hydra[target]._target_


def test_training_stages_return_a_float_objective_with_the_checkpoint():
    import pickle

    from llama_zh.__main__ import sweep_objective
    from llama_zh.stages.rundir import written_checkpoint
    from llama_zh.train.fit import TrainResult

    result = pickle.loads(pickle.dumps(TrainResult(2.5, Path("/x/final"))))  # launchers pickle results back
    assert result == TrainResult(2.5, Path("/x/final")) and result.checkpoint == Path("/x/final")
    objective = sweep_objective(result)
    assert objective == 2.5 and type(objective) is float
    assert written_checkpoint(result) == "/x/final"
    assert sweep_objective({"checkpoint": "/y"}) == {"checkpoint": "/y"}  # other stages' reports pass through


# ------------------------------------------------------------------------------ options that would be ignored


@pytest.mark.parametrize(
    "overrides",
    [[f"stage={stage}"] for stage in ("prepare", "tokenizer", "convert", "pretrain", "sft", "eval", "infer")]
    + [
        ["experiment=zh_sentiment/pretrain", "debug=fast"],
        ["experiment=zh_sentiment/sft"],
        ["experiment=zh_sentiment/eval"],
        ["experiment=tiny_lr_sweep"],
        ["data=zh_mix"],
        ["stage=sft", "finetune=lora"],
        ["stage=infer", "quant=nf4"],
        ["+data.sources.more={files: [x.txt]}"],
    ],
)
def test_shipped_configs_pass_the_key_check(overrides):
    from llama_zh.stages import check_options

    check_options(config(*overrides))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["stage=infer", "stage.checkpoint=x", "+stage.temprature=0.5"],
            "stage.temprature: unknown key (did you mean stage.temperature?)",
        ),
        (
            ["stage=eval", "stage.checkpoint=x", "+stage.mc.shot=3"],
            "stage.mc.shot: unknown key (did you mean stage.mc.shots?)",
        ),
        (["+stage.zzz=1"], "stage.zzz: unknown key (expected one of init_from, name, save_every_n_steps)"),
        (["+optim.lrr=1e-3"], "optim.lrr: unknown key (did you mean optim.lr?)"),
        (["+data.packing.num_procs=2"], "data.packing.num_procs: unknown key (did you mean data.packing.num_proc?)"),
        (["+model.n_layer=2"], "model.n_layer: unknown field (did you mean model.n_layers?)"),
        (
            ["stage=sft", "stage.checkpoint=x", "+finetune.rnak=4"],
            "finetune.rnak: unknown key (did you mean finetune.rank?)",
        ),
        (
            ["stage=infer", "stage.checkpoint=x", "+quant.blocksize_=64"],
            "quant.blocksize_: unknown key (did you mean quant.blocksize?)",
        ),
        (["stage=eval", "stage.checkpoint=x", "model=llama_7b"], "model=llama_7b: stage=eval does not read model="),
    ],
)
def test_unknown_keys_and_unread_groups_are_refused(overrides, message, tmp_path):
    result = entry_point(*overrides, tmp_path=tmp_path)
    assert result.returncode == 1 and f"llama_zh: error: {message}" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """dim 64, 2 layers, max_seq_len 128: not the shape of model=tiny."""
    from tiny_checkpoints import make_checkpoint, train_tokenizer

    d = tmp_path_factory.mktemp("init")
    return make_checkpoint(d / "ckpt", train_tokenizer(d / "tok"))[0]


def test_init_from_refuses_an_explicit_model_of_another_shape(small_checkpoint, tmp_path):
    result = entry_point(f"stage.init_from={small_checkpoint}", "model=tiny", tmp_path=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert (
        f"llama_zh: error: model=tiny differs from the checkpoint of stage.init_from={small_checkpoint}: "
        "dim 128 (checkpoint 64), n_layers 4 (checkpoint 2)"
    ) in result.stderr
    assert not (tmp_path / "data").exists()


def test_init_from_refuses_an_explicit_tokenizer(small_checkpoint, tmp_path):
    from tiny_checkpoints import train_tokenizer

    other = train_tokenizer(tmp_path / "tok", 2000, reviews=1000).path
    result = entry_point(
        f"stage.init_from={small_checkpoint}", "tokenizer=file", f"tokenizer.path={other}", tmp_path=tmp_path
    )
    assert result.returncode == 1 and "llama_zh: error: tokenizer=file tokenizer.path=" in result.stderr, result.stderr[
        -2000:
    ]
    assert "trains with the checkpoint's own tokenizer" in result.stderr


def test_init_from_with_the_default_model_takes_the_checkpoints_shape(small_checkpoint, tmp_path):
    # data.seq_len 256 > the checkpoint's 128: refused right after the shape is chosen, before any data.
    result = entry_point(f"stage.init_from={small_checkpoint}", tmp_path=tmp_path)
    output = result.stdout + result.stderr
    assert "stage.init_from: the model's shape is the checkpoint's (vocab_size=2000, dim=64" in output, output[-2000:]
    assert result.returncode == 1 and "data.seq_len=256 exceeds the model's max_seq_len=128" in result.stderr
