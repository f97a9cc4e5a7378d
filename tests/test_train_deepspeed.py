"""DeepSpeed ZeRO-2 and ZeRO-3 (+ CPU offload, DeepSpeedCPUAdam) on CPU, on 1 and 2 processes:
losses and weights match the plain strategy; states save, resume and consolidate to native weights.

DeepSpeedCPUAdam is compiled on first use (about a minute), then cached under TORCH_EXTENSIONS_DIR.
"""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import llama_zh
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ARGS = [
    "debug=fast",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "data.seq_len=32",
    "trainer.max_steps=4",
    "trainer.limit_val_batches=0",
    "trainer.log_every_n_steps=1",
    "state_every_n_steps=2",
    "state_keep_last=2",
    "optim.warmup_steps=1",
]


def train(run_dir, data_dir, *overrides):
    llama_zh(*ARGS, *overrides, run_dir=run_dir, data_dir=data_dir)
    return run_dir


def losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def assert_weights_close(a: dict, b: dict, atol: float = 5e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def plain(tmp_path_factory, data_dir):
    """The plain strategy at one process: micro batch 2 (for 1-process runs) and 4 (= 2 processes x 2)."""
    root = tmp_path_factory.mktemp("plain")
    return {
        1: train(root / "b2", data_dir, "data.batch_size=2"),
        2: train(root / "b4", data_dir, "data.batch_size=4"),
    }


@pytest.mark.parametrize("strategy", ["zero2", "zero3_offload"])
@pytest.mark.parametrize("processes", [1, 2])
def test_zero_matches_plain_and_consolidates(strategy, processes, plain, data_dir, tmp_path):
    from llama_zh.train.zero_checkpoint import read_zero

    trainer = "cpu" if processes == 1 else "cpu_ddp2"
    run = train(tmp_path / "run", data_dir, f"trainer={trainer}", f"strategy={strategy}", "data.batch_size=2")
    reference = plain[processes]
    # Same batches (2 processes split the 1-process batch of 4 between them), same init, same optimizer math.
    torch.testing.assert_close(torch.tensor(losses(run)), torch.tensor(losses(reference)), rtol=1e-5, atol=0)
    final = weights(run / "checkpoints" / "final")
    assert_weights_close(final, weights(reference / "checkpoints" / "final"))

    state = run / "checkpoints" / "state" / "step-000004"
    shard_files = list((state / "state").rglob("*_optim_states.pt"))
    assert len(shard_files) == processes  # one optimizer shard per process
    consolidated = dict(read_zero(state).tensors())
    assert consolidated.keys() == final.keys()
    for name, tensor in consolidated.items():
        assert torch.equal(tensor, final[name]), name  # the fp32 masters are the weights written at the end


def test_zero_state_resumes_to_the_same_weights(plain, data_dir, tmp_path):
    first = train(tmp_path / "first", data_dir, "strategy=zero2", "data.batch_size=2")
    state = first / "checkpoints" / "state" / "step-000002"
    second = train(tmp_path / "second", data_dir, "strategy=zero2", "data.batch_size=2", f"resume={state}")
    assert losses(second)[-2:] == losses(first)[-2:]
    assert_weights_close(weights(second / "checkpoints" / "final"), weights(first / "checkpoints" / "final"), atol=0)


def test_consolidation_command_writes_a_native_checkpoint(plain, data_dir, tmp_path):
    from llama_zh import load_checkpoint

    run = train(tmp_path / "run", data_dir, "strategy=zero3", "data.batch_size=2", "trainer.max_steps=2")
    out = tmp_path / "native"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llama_zh.train.zero_checkpoint",
            str(run / "checkpoints" / "state" / "step-000002"),
            str(out),
            "--dtype",
            "bfloat16",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    model, tokenizer = load_checkpoint(out)
    assert tokenizer is not None and next(model.parameters()).dtype == torch.bfloat16
    final = weights(run / "checkpoints" / "final")
    for name, p in model.state_dict().items():
        assert torch.equal(p, final[name].to(torch.bfloat16)), name


def test_zero_state_files_refuse_pickled_code(tmp_path):
    from llama_zh.errors import LlamaZhError
    from llama_zh.train.zero_checkpoint import _load

    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": Payload()}, path)
    with pytest.raises(LlamaZhError, match="refused to unpickle: it names (builtins.)?print,"):
        _load(str(path))
