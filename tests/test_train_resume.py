"""Exact resume: a pretrain run SIGKILLed at any moment and rerun with the same command continues
from its newest training state, and every later step's loss equals the uninterrupted run's, bit
for bit on CPU (plain strategy), data position and LR schedule included. A state damaged after it
was written is never handed to torch: resume=auto falls back to the newest intact one."""

import csv
import json
import logging
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import cli_command, cli_env, llama_zh
from safetensors.torch import load_file

from llama_zh.errors import LlamaZhError
from llama_zh.train.callbacks import STATE_META, resolve_resume, state_problem, write_manifest

# Small and fast: 2 sequences of 32 tokens per micro-batch, accumulation 2, a state every 3 steps.
ARGS = [
    "debug=fast",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "data.seq_len=32",
    "data.batch_size=2",
    "trainer.accumulate_grad_batches=2",
    "trainer.max_steps=12",
    "trainer.val_check_interval=8",
    "trainer.log_every_n_steps=1",
    "state_every_n_steps=3",
    "state_keep_last=2",
    "optim.warmup_steps=3",
]
COMPARED = ("step", "train/loss", "lr", "train/tokens", "train/grad_norm", "data/share_news", "val/loss")


def train(run_dir, data_dir, *extra, check=True):
    return llama_zh(*ARGS, *extra, run_dir=run_dir, data_dir=data_dir, check=check, timeout=600)


def kill_when(run_dir, data_dir, condition, timeout=300):
    """Start the run and SIGKILL it the moment `condition()` holds; returns True if it was killed."""
    args, env = cli_command(*ARGS, run_dir=run_dir), cli_env(data_dir)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if condition():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.005)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def metrics(run_dir: Path) -> list[tuple]:
    """The compared columns of each row that has any (the end-of-training memory row has none; a run
    killed after its last state but before that row resumes with nothing left to train and skips it)."""
    with open(run_dir / "metrics.csv") as f:
        rows = [tuple(r.get(k, "") for k in COMPARED) for r in csv.DictReader(f)]
    return [r for r in rows if any(r[1:])]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    run_dir = tmp_path_factory.mktemp("reference")
    train(run_dir, data_dir)
    return run_dir


def states(run_dir: Path) -> list[str]:
    state_dir = run_dir / "checkpoints" / "state"
    return sorted(p.name for p in state_dir.iterdir()) if state_dir.is_dir() else []


@pytest.mark.slow
def test_sigkill_twice_then_rerun_equals_uninterrupted_run(reference, data_dir, tmp_path):
    run_dir = tmp_path / "run"

    # 1. Killed while the state of step 6 is being written: only the .tmp directory exists.
    def writing():
        return any(n.startswith(".step-000006") for n in states(run_dir))

    assert kill_when(run_dir, data_dir, writing), "the run finished before it could be killed"
    assert "step-000003" in states(run_dir)
    # 2. Rerun; killed again between states, once step 9's state exists and training went on a little.
    started = {}

    def past_step_9():
        if "step-000009" in states(run_dir):
            started.setdefault("t", time.monotonic())
            return time.monotonic() - started["t"] > 0.3
        return False

    assert kill_when(run_dir, data_dir, past_step_9), "the rerun finished before it could be killed"
    # 3. Rerun to the end.
    result = train(run_dir, data_dir)
    assert "resuming from" in result.stdout + result.stderr

    assert metrics(run_dir) == metrics(reference)
    final, ref_final = (load_file(d / "checkpoints" / "final" / "model.safetensors") for d in (run_dir, reference))
    assert final.keys() == ref_final.keys()
    for name in final:
        assert torch.equal(final[name], ref_final[name]), name
    # Only whole states remain, the newest `state_keep_last`, each with its metadata.
    assert states(run_dir) == ["step-000009", "step-000012"]
    meta = json.loads((run_dir / "checkpoints" / "state" / "step-000012" / "llama_zh.json").read_text())
    assert meta["global_step"] == 12 and meta["global_batch"] == 4


@pytest.mark.slow
def test_finished_run_rerun_does_not_train_again(reference, data_dir):
    before = metrics(reference)
    result = train(reference, data_dir)
    assert "resuming from" in result.stdout + result.stderr
    assert metrics(reference) == before


@pytest.mark.slow
def test_resume_from_another_shape_or_tokenizer_is_refused(reference, data_dir, tmp_path):
    state = reference / "checkpoints" / "state" / "step-000012"
    result = train(tmp_path / "other", data_dir, "model.n_layers=2", f"resume={state}", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot continue from" in result.stderr and "n_layers 4 -> 2" in result.stderr

    # Same shape, another tokenizer (a different vocabulary size of the trained sentencepiece model).
    result = train(
        tmp_path / "tok",
        data_dir,
        "tokenizer.train.vocab_size=7000",
        "model.vocab_size=8000",
        f"tokenizer.path={tmp_path}/tok7000/tokenizer.model",
        f"resume={state}",
        check=False,
    )
    assert result.returncode == 1 and "the tokenizer differs" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_resume_path_that_is_not_a_state_is_refused(data_dir, tmp_path):
    result = train(tmp_path / "run", data_dir, f"resume={tmp_path}", check=False)
    assert result.returncode == 1 and "not a llama_zh training state" in result.stderr


# ------------------------------------------------------------------------------------ damaged states


def fake_state(state_dir: Path, step: int, manifest: bool = True) -> Path:
    """A state directory laid out as TrainingState.save lays it out (a real torch file inside)."""
    step_dir = state_dir / f"step-{step:06d}"
    step_dir.mkdir(parents=True)
    torch.save({"global_step": step, "weights": torch.arange(1000.0)}, step_dir / "state.ckpt")
    (step_dir / STATE_META).write_text(json.dumps({"global_step": step}))
    if manifest:
        write_manifest(step_dir)
    return step_dir


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_auto_falls_back_past_a_truncated_newest_state(tmp_path, caplog):
    old, new = fake_state(tmp_path, 3), fake_state(tmp_path, 6)
    assert resolve_resume("auto", tmp_path) == new and state_problem(new) is None
    truncate(new / "state.ckpt")
    with caplog.at_level(logging.WARNING, logger="llama_zh.train.callbacks"):
        assert resolve_resume("auto", tmp_path) == old
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and str(new) in warning[0] and str(old) in warning[0] and "state.ckpt" in warning[0]


def test_same_size_damage_is_caught_by_the_checksum(tmp_path):
    state = fake_state(tmp_path, 3)
    data = bytearray((state / "state.ckpt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (state / "state.ckpt").write_bytes(bytes(data))
    assert "checksum" in state_problem(state)
    (state / "tokenizer.model").write_text("added later")  # not in the manifest: ignored
    (state / "state.ckpt").unlink()
    assert state_problem(state) == "state.ckpt is missing"


def test_auto_refuses_when_no_state_is_intact(tmp_path):
    states = [fake_state(tmp_path, 3), fake_state(tmp_path, 6)]
    for state in states:
        truncate(state / "state.ckpt")
    with pytest.raises(LlamaZhError) as e:
        resolve_resume("auto", tmp_path)
    message = str(e.value)
    assert "\n" not in message and "step-000003" in message and "step-000006" in message and "resume=null" in message
    assert resolve_resume("auto", tmp_path / "none") is None  # no state at all: a fresh start, as before


def test_explicit_resume_of_a_damaged_state_is_refused(tmp_path):
    state = fake_state(tmp_path, 3)
    (state / "manifest.json").write_text("{not json")
    for resume in (state, state / "state.ckpt"):
        with pytest.raises(LlamaZhError, match="damaged") as e:
            resolve_resume(str(resume), tmp_path)
        assert str(state) in str(e.value) and "manifest.json" in str(e.value) and "\n" not in str(e.value)


def test_state_without_manifest_is_still_checked(tmp_path):
    """States written before manifests: a truncated torch file is still caught (its zip directory is gone)."""
    old, new = fake_state(tmp_path, 3, manifest=False), fake_state(tmp_path, 6, manifest=False)
    assert resolve_resume("auto", tmp_path) == new
    truncate(new / "state.ckpt")
    assert resolve_resume("auto", tmp_path) == old


@pytest.mark.slow
def test_truncated_newest_state_resumes_from_the_previous_one(reference, data_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    newest, previous = (run_dir / "checkpoints" / "state" / n for n in ("step-000012", "step-000009"))
    truncate(newest / "state.ckpt")
    result = train(run_dir, data_dir)
    output = result.stdout + result.stderr
    warning = [line for line in output.splitlines() if "is damaged" in line]
    assert warning and str(newest) in warning[0] and str(previous) in warning[0], output[-3000:]
    assert f"resuming from {previous}" in output
    # Steps 10-12 trained again, as the uninterrupted run trained them; the damaged state replaced.
    assert metrics(run_dir) == metrics(reference)
    assert states(run_dir) == ["step-000009", "step-000012"] and state_problem(newest) is None
