"""Tracking: what every run logs, and W&B never holding a run hostage to the network; what a run
prints (progress where no bar is seen, no noise from library internals)."""

import csv
import logging
import re
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

from llama_zh.stages import narrow, strategy_slice, tracking_slice
from llama_zh.tracking import ResumingCSVLogger, build_loggers, run_config, truncate_metrics
from llama_zh.train.callbacks import ProgressLog, step_description
from llama_zh.train.fit import quiet_library_warnings
from llama_zh.train.strategies import announce_jit_builds, jit_ops_to_build

CONF = str(Path(__file__).resolve().parents[1] / "llama_zh" / "conf")


def config(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=False)


def test_run_config_records_choices_mix_and_commit():
    cfg = config(
        "trainer=cpu_ddp2",
        "finetune=lora",
        "+data.sources.news.weight=0.7",
        "+data.sources.reviews.weight=0.3",
        "paths.output_dir=/tmp/x",
        "paths.root_dir=/tmp",
    )
    values = run_config(tracking_slice(narrow(cfg)).config)
    assert values["choices"] == {
        "stage": "pretrain",
        "model": "tiny",
        "trainer": "cpu_ddp2",
        "hardware": "cpu",
        "strategy": "ddp",
        "finetune": "lora",
        "data": "sample_zh",
    }
    assert values["data_mix"] == {"news": 0.7, "reviews": 0.3}
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", values["git_commit"])
    assert values["finetune"]["rank"] == 8  # the resolved config itself


def test_unreachable_wandb_falls_back_to_offline_quickly(tmp_path, monkeypatch, caplog):
    # Nothing listens on port 9 of this machine: connection refused at once, as without a network.
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    cfg = config("logger.wandb.mode=online", "paths.output_dir=/tmp/x", "paths.root_dir=/tmp")
    start = time.monotonic()
    loggers = build_loggers(tracking_slice(cfg), tmp_path)
    assert time.monotonic() - start < 60
    wandb_logger = loggers[1]
    assert "unreachable; logging offline instead" in caplog.text
    assert wandb_logger.experiment.settings.mode in ("offline", "dryrun")  # wandb calls offline "dryrun"
    wandb_logger.finalize("success")
    wandb_logger.experiment.finish()
    assert (tmp_path / "wandb_run_id").is_file()


def test_resumed_metrics_continue_the_file(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("lr,step,train/loss\n0.1,0,5.0\n0.1,1,4.0\n0.1,2,3.5\n,2,\n0.1,3,3.0\n")
    truncate_metrics(path, 2)  # resumed from the state after step 2: rows from step 2 on were the killed run's
    logger = ResumingCSVLogger(save_dir=str(tmp_path), name="", version="")
    logger.log_metrics({"train/loss": 3.25, "val/loss": 3.1}, step=2)
    logger.save()
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["train/loss"], r["val/loss"]) for r in rows] == [
        ("0", "5.0", ""),
        ("1", "4.0", ""),
        ("2", "3.25", "3.1"),
    ]


@pytest.mark.parametrize(
    "column",
    [
        "train/loss",
        "train/ppl",
        "lr",
        "train/grad_norm",
        "train/step_time_s",
        "train/tokens_per_s",
        "train/tokens",
        "train/mfu",
        "data/share_news",
        "val/loss",
        "val/ppl",
        "memory/measured_gib",
        "memory/planned_gib",
    ],
)
def test_a_run_logs(column, tiny_run):
    assert column in tiny_run["columns"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 3-step run with the default progress settings, its output captured (not a terminal)."""
    import os
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("tracking")
    # An unread group that cannot resolve, added the way a smoke test adds its overrides: pretrain
    # never reads quant, so neither resolves nor records it.
    env = dict(
        os.environ,
        WANDB_MODE="offline",
        LLAMA_ZH_DATA=str(root / "data"),
        LLAMA_ZH_EXTRA_OVERRIDES="+quant.unset=${oc.env:LLAMA_ZH_TEST_NEVER_SET}",
    )
    env.pop("LLAMA_ZH_TEST_NEVER_SET", None)
    args = [
        sys.executable,
        "-m",
        "llama_zh",
        "debug=fast",
        "logger=csv",
        "data.seq_len=32",
        "data.batch_size=2",
        "trainer.max_steps=3",
        "hardware.peak_tflops=1.0",
        f"hydra.run.dir={root / 'run'}",
    ]
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(root / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {
        "columns": {k for r in rows for k, v in r.items() if v},
        "output": result.stdout + result.stderr,
        "run": root / "run",
    }


def test_run_records_only_the_groups_pretrain_reads(tiny_run):
    import yaml

    recorded = yaml.safe_load((tiny_run["run"] / "hparams.yaml").read_text())
    assert "quant" not in recorded and "template" not in recorded
    assert recorded["optim"]["lr"] > 0  # what a sweep report over optim.lr reads back
    assert recorded["choices"]["finetune"] == "full"


def test_output_has_progress_lines_when_not_a_terminal(tiny_run):
    lines = [line for line in tiny_run["output"].splitlines() if "llama_zh.train.callbacks" in line and "| ETA" in line]
    # The first and the last step at least (the default is every 30 s, longer than this run).
    assert [line.split(" - ")[1].split(" (")[0] for line in lines] == ["step 1/3", "step 3/3"], tiny_run["output"]
    for field in ("loss ", "lr ", "tokens/s", "elapsed "):
        assert field in lines[-1]


@pytest.mark.parametrize("noise", ["Previous log files in this directory will be deleted", "LeafSpec", "Epoch 0/-2"])
def test_output_has_no_noise(noise, tiny_run):
    assert noise not in tiny_run["output"]


def test_progress_bar_counts_steps(tiny_run):
    assert any(line.startswith("step 3/3 ") for line in tiny_run["output"].splitlines()), tiny_run["output"]
    trainer = SimpleNamespace(global_step=5, max_steps=300, current_epoch=0, max_epochs=-1)
    assert step_description(trainer) == "step 5/300"
    trainer.current_epoch = 2  # a small SFT set, seen twice over
    assert step_description(trainer) == "step 5/300, epoch 2"


def progress_lines(callback: ProgressLog, steps: int, seconds_per_step: float, caplog) -> list[str]:
    """Drive `callback` through `steps` optimizer steps of 2 micro-batches each, on a fake clock."""
    clock = [0.0]
    callback.clock = lambda: clock[0]
    trainer = SimpleNamespace(
        global_step=0,
        max_steps=steps,
        is_global_zero=True,
        callback_metrics={"train/loss": torch.tensor(2.5)},
        optimizers=[SimpleNamespace(param_groups=[{"lr": 3e-4}])],
    )
    module = SimpleNamespace(tokens_seen=0)
    callback.on_train_start(trainer, module)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llama_zh.train.callbacks"):
        for step in range(1, steps + 1):
            for micro in range(2):
                clock[0] = step * seconds_per_step
                module.tokens_seen += 50
                trainer.global_step = step if micro == 1 else step - 1
                callback.on_train_batch_end(trainer, module, None, None, 2 * step + micro)
    return [r.getMessage() for r in caplog.records]


def test_progress_lines_every_seconds_or_steps(caplog):
    lines = progress_lines(ProgressLog(every_s=30), 10, 10.0, caplog)
    assert [line.split(" ")[1] for line in lines] == ["1/10", "4/10", "7/10", "10/10"]
    assert lines[1] == "step 4/10 (40%) | loss 2.5000 | lr 3.00e-04 | 10 tokens/s | elapsed 0:00:40 | ETA 0:01:00"
    lines = progress_lines(ProgressLog(every_s=0, every_n_steps=5), 10, 10.0, caplog)
    assert [line.split(" ")[1] for line in lines] == ["1/10", "5/10", "10/10"]
    assert progress_lines(ProgressLog(every_s=0, every_n_steps=0), 10, 10.0, caplog) == []


def test_library_deprecation_warnings_are_silenced_precisely(tmp_path):
    import torch.distributed as dist
    from pytorch_lightning.utilities._pytree import _tree_flatten

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_warnings()
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
        try:
            dist.all_gather_into_tensor(torch.zeros(2), torch.ones(2))  # as DeepSpeed calls it at every step
        finally:
            dist.destroy_process_group()
        _tree_flatten(object())  # as Lightning's CombinedLoader does for a data loader
        warnings.warn("a deprecation of our own", FutureWarning, stacklevel=2)
    messages = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert messages == ["a deprecation of our own"]


def test_first_deepspeed_run_says_it_compiles(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    offload = strategy_slice(config("strategy=zero3_offload"))
    assert jit_ops_to_build(offload, on_gpu=False) == ["deepspeed_shm_comm", "cpu_adam"]
    with caplog.at_level(logging.INFO, logger="llama_zh.train.strategies"):
        announce_jit_builds(offload, on_gpu=False)
    assert len(caplog.records) == 1 and str(tmp_path) in caplog.text and "TORCH_EXTENSIONS_DIR" in caplog.text
    (tmp_path / "cpu_adam").mkdir()
    (tmp_path / "cpu_adam" / "cpu_adam.so").write_bytes(b"")  # built by an earlier run
    assert jit_ops_to_build(offload, on_gpu=False) == ["deepspeed_shm_comm"]
    assert jit_ops_to_build(offload, on_gpu=True) == []
    assert jit_ops_to_build(strategy_slice(config("strategy=zero2")), on_gpu=True) == []
