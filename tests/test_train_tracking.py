"""Tracking: what every run logs, and W&B never holding a run hostage to the network."""

import csv
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from llama_zh.tracking import ResumingCSVLogger, build_loggers, run_config, truncate_metrics

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def config(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=False)


def test_run_config_records_choices_mix_and_commit():
    cfg = config("trainer=cpu_ddp2", "finetune=lora", "+data.sources.news.weight=0.7", "+data.sources.reviews.weight=0.3",
                 "paths.output_dir=/tmp/x", "paths.root_dir=/tmp")
    values = run_config(cfg)
    assert values["choices"] == {"stage": "pretrain", "model": "tiny", "trainer": "cpu_ddp2", "strategy": "ddp",
                                 "finetune": "lora", "quant": "none", "data": "sample_zh"}
    assert values["data_mix"] == {"news": 0.7, "reviews": 0.3}
    assert values["git_commit"] and len(values["git_commit"]) == 40
    assert values["finetune"]["rank"] == 8  # the resolved config itself


def test_unreachable_wandb_falls_back_to_offline_quickly(tmp_path, monkeypatch, caplog):
    # Nothing listens on port 9 of this machine: connection refused at once, as without a network.
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    cfg = config("logger.wandb.mode=online", "paths.output_dir=/tmp/x", "paths.root_dir=/tmp")
    start = time.monotonic()
    loggers = build_loggers(cfg, tmp_path)
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
    assert [(r["step"], r["train/loss"], r["val/loss"]) for r in rows] == [("0", "5.0", ""), ("1", "4.0", ""),
                                                                          ("2", "3.25", "3.1")]


@pytest.mark.parametrize("column", ["train/loss", "train/ppl", "lr", "train/grad_norm", "train/step_time_s",
                                    "train/tokens_per_s", "train/tokens", "train/mfu", "data/share_news", "val/loss",
                                    "val/ppl", "memory/measured_gib", "memory/planned_gib"])
def test_a_run_logs(column, logged_columns):
    assert column in logged_columns


@pytest.fixture(scope="module")
def logged_columns(tmp_path_factory):
    import os
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("tracking")
    env = dict(os.environ, WANDB_MODE="offline", LLAMA_ZH_DATA=str(root / "data"))
    args = [sys.executable, "-m", "llama_zh", "debug=fast", "logger=csv", "trainer.enable_progress_bar=false",
            "data.seq_len=32", "data.batch_size=2", "trainer.max_steps=3", "trainer.peak_tflops=1.0",
            f"hydra.run.dir={root / 'run'}"]
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(root / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {k for r in rows for k, v in r.items() if v}
