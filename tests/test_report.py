"""`python -m llama_zh.report`: the comparison of a multirun's jobs, and the W&B group they share."""

import csv
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from llama_zh import report

CONF = str(Path(__file__).resolve().parents[1] / "llama_zh" / "conf")

HEADER = "epoch,lr,memory/measured_gib,memory/planned_gib,step,train/loss,train/tokens_per_s,val/loss,val/ppl"


def make_job(sweep: Path, num: int, lr: str, rows: list[str], finished: bool = True, header: str = HEADER) -> Path:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"optim.lr={lr}", "trainer.max_steps=9"]))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"optim": {"lr": float(lr)}, "seed": 1234}))
    (job / "metrics.csv").write_text("\n".join([header, *rows]) + "\n")
    if finished:
        (job / "checkpoints" / "final").mkdir(parents=True)
    return job


ROWS_0 = [  # epoch,lr,measured,planned,step,train/loss,tokens/s,val/loss,val/ppl
    "0,0.001,,,0,9.0,100.0,,",
    "0,0.001,,,1,8.0,400.0,,",
    "0,0.001,,,2,7.0,300.0,,",
    "0,,,,2,,,6.5,665.1",
    "0,0.001,,,5,6.0,1000.0,,",
    "0,,,,5,,,5.5,244.7",
    "0,,,,8,,,5.75,314.2",
    ",,0.75,1.25,8,,,,",
]
ROWS_1 = ["0,0.003,,,0,9.5,50.0,,", "0,,,,2,,,nan,nan", "0,0.003,,,3,8.5,70.0,,"]  # killed at step 3


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_report(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llama_zh.report", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def in_process(capsys, *args) -> subprocess.CompletedProcess:
    """`run_report` without starting an interpreter (most tests: the exit status is main's return)."""
    capsys.readouterr()
    code = report.main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    make_job(root, 0, "1e-3", ROWS_0)
    make_job(root, 1, "3e-3", ROWS_1, finished=False)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_table_of_a_fabricated_sweep(sweep):
    assert report.main([str(sweep)]) == 0
    rows = read_csv(sweep / "report.csv")
    assert [r["job"] for r in rows] == ["0", "1"]
    assert "trainer.max_steps" not in rows[0]  # the same in every job: said once, above the table
    assert [r["optim.lr"] for r in rows] == ["1e-3", "3e-3"]
    first, killed = rows
    assert (first["status"], first["steps"]) == ("finished", "9")
    assert float(first["final_val_loss"]) == 5.75 and float(first["best_val_loss"]) == 5.5
    assert first["best_val_step"] == "5"
    assert float(first["final_train_loss"]) == 6.0
    assert float(first["tokens_per_s"]) == 350.0  # the median of 100, 400, 300, 1000 (their mean: 450)
    assert (float(first["peak_memory_gib"]), float(first["planned_memory_gib"])) == (0.75, 1.25)
    assert (killed["status"], killed["steps"]) == ("incomplete", "4")
    assert killed["final_val_loss"] == "nan" and killed["best_val_loss"] == ""  # a nan loss is never the best
    assert float(killed["tokens_per_s"]) == 60.0
    assert killed["peak_memory_gib"] == ""
    md = (sweep / "report.md").read_text()
    assert "`trainer.max_steps=9`" in md and "![" in md
    table = [line for line in md.splitlines() if line.startswith("| 0 ") or line.startswith("| 1 ")]
    assert "1e-3" in table[0] and "finished" in table[0] and "5.5000" in table[0]
    assert "3e-3" in table[1] and "incomplete" in table[1]
    assert (sweep / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(sweep.glob(".*.tmp"))


def test_plot_has_one_train_and_one_val_curve_per_job(sweep):
    rep = report.Report.of(report.load_jobs(report.find_runs([sweep])))
    pytest.importorskip("matplotlib")
    fig = report.plot_losses(rep)
    train_ax, val_ax = fig.axes
    assert [line.get_label() for line in train_ax.lines] == ["0: optim.lr=1e-3", "1: optim.lr=3e-3"]
    assert list(train_ax.lines[0].get_xdata()) == [0, 1, 2, 5]
    assert list(train_ax.lines[0].get_ydata()) == [9.0, 8.0, 7.0, 6.0]
    assert list(val_ax.lines[0].get_ydata()) == [6.5, 5.5, 5.75]
    assert len(val_ax.lines) == 2


def test_a_key_one_job_did_not_override_shows_its_config_value(tmp_path):
    a = make_job(tmp_path / "runs", 0, "1e-3", ["0,,,,0,5.0,10.0,,"])
    (a / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": {"model": "tiny"}}}}))
    b = make_job(tmp_path / "other", 0, "1e-3", ["0,,,,0,4.0,10.0,,"])
    (b / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["trainer.max_steps=9", "seed=7", "model=llama_7b"]))
    out = tmp_path / "out"
    out.mkdir()
    assert report.main([str(a), str(b), "--output", str(out)]) == 0
    rows = read_csv(out / "report.csv")
    # Both run directories are named 0: the rows are told apart by their paths.
    assert [r["job"] for r in rows] == [str(a), str(b)]
    # a's seed from its config.yaml, its model from the group choices in hydra.yaml; b's lr from its config.yaml.
    assert [(r["optim.lr"], r["seed"], r["model"]) for r in rows] == [
        ("1e-3", "1234", "tiny"),
        ("0.001", "7", "llama_7b"),
    ]
    assert "trainer.max_steps" not in rows[0]


def test_list_of_runs_defaults_to_their_common_parent(tmp_path):
    make_job(tmp_path / "a", 0, "1e-3", ["0,,,,0,5.0,10.0,,"])
    make_job(tmp_path / "b", 0, "2e-3", ["0,,,,0,5.0,10.0,,"])
    assert report.main([str(tmp_path / "a" / "0"), str(tmp_path / "b" / "0")]) == 0
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.csv").is_file()


def test_without_matplotlib_the_table_is_written_and_one_line_says_so(sweep, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # import matplotlib -> ImportError
    assert report.main([str(sweep)]) == 0
    assert (sweep / "report.csv").is_file() and (sweep / "report.md").is_file()
    assert not (sweep / "report.png").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["report.png: not written, the plot needs matplotlib (pip install matplotlib)"]
    assert "needs matplotlib" in (sweep / "report.md").read_text()


@pytest.mark.parametrize(
    "body,expected",
    [
        (b"", ": empty; expected a header line"),
        (b"\n\n", ": empty; expected a header line"),
        (b"epoch,train/loss\n0,5.0\n", ":1: no 'step' column in the header (columns: epoch, train/loss)"),
        (f"{HEADER}\n0,,,,0,oops,,,\n".encode(), ":2: column 'train/loss': 'oops' is not a number"),
        (f"{HEADER}\n0,,,,0,5.0,,,\n0,,,,1,5.0\n".encode(), ":3: 6 fields, the header has 9"),
        (f"{HEADER}\n0,,,,1.5,5.0,,,\n".encode(), ":2: step '1.5' is not a step number"),
        (f"{HEADER}\n0,,,,-1,5.0,,,\n".encode(), ":2: step '-1' is not a step number"),
        (f"{HEADER}\n0,,,,,5.0,,,\n".encode(), ":2: step '' is not a step number"),
        (f'{HEADER}\n0,,,,0,"5.0,,,\n'.encode(), ":2: not CSV (unexpected end of data)"),
        (HEADER.encode() + b"\n0,,,,0,\xff,,,\n", f": not UTF-8 text (byte {len(HEADER) + 8})"),
    ],
)
def test_malformed_metrics_is_one_line_naming_the_file(sweep, body, expected, capsys):
    assert report.main([str(sweep)]) == 0
    before = (sweep / "report.md").read_bytes()
    bad = sweep / "1" / "metrics.csv"
    bad.write_bytes(body)
    result = in_process(capsys, sweep)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"llama_zh.report: error: {bad}{expected}"), result.stderr
    assert (sweep / "report.md").read_bytes() == before  # the previous report is kept whole
    assert not list(sweep.glob(".*.tmp"))


def test_no_jobs(tmp_path):
    result = run_report(tmp_path)  # through the command line: the exit status
    assert result.returncode != 0
    assert (
        result.stderr.strip() == f"llama_zh.report: error: {tmp_path}: no jobs (no subdirectory with a "
        "metrics.csv or a .hydra/); expected a sweep directory such as "
        "outputs/multirun/pretrain/<date_time>"
    )


def test_jobs_without_any_metrics(tmp_path, capsys):
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    (tmp_path / "1" / ".hydra").mkdir(parents=True)
    result = in_process(capsys, tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"llama_zh.report: error: {tmp_path / '0' / 'metrics.csv'}: missing, and so is every other job's: "
        "nothing to compare"
    ]


def test_a_job_that_never_logged_is_listed_as_incomplete(sweep, capsys):
    (sweep / "2" / ".hydra").mkdir(parents=True)
    (sweep / "2" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["optim.lr=1e-2", "trainer.max_steps=9"]))
    result = in_process(capsys, sweep)
    assert result.returncode == 0, result.stderr
    rows = read_csv(sweep / "report.csv")
    assert (rows[2]["job"], rows[2]["optim.lr"], rows[2]["status"]) == ("2", "1e-2", "incomplete (no metrics.csv)")
    assert f"{sweep / '2' / 'metrics.csv'}: missing" in result.stderr


def test_a_run_dir_without_metrics_is_refused(tmp_path, sweep, capsys):
    other = tmp_path / "other"
    (other / ".hydra").mkdir(parents=True)
    result = in_process(capsys, sweep / "0", other)
    assert result.returncode != 0
    assert (
        result.stderr.strip() == f"llama_zh.report: error: {other / 'metrics.csv'}: missing; expected a run "
        "directory of llama_zh"
    )


def test_not_a_directory(tmp_path, capsys):
    result = in_process(capsys, tmp_path / "nope")
    assert (result.returncode, result.stderr.strip()) == (
        1,
        f"llama_zh.report: error: {tmp_path / 'nope'}: no such directory",
    )


# ------------------------------------------------------------------------------------------- W&B group


@pytest.fixture
def hydra_multirun(tmp_path):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        full = compose("config", overrides=[f"hydra.sweep.dir={tmp_path / 'lr-sweep'}"], return_hydra_config=True)
        job = compose("config", overrides=["paths.output_dir=/tmp/x", "paths.root_dir=/tmp"])
    with open_dict(full):
        full.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(full)
    yield job
    HydraConfig.instance().cfg = None


def test_wandb_group_is_per_sweep_in_a_multirun(hydra_multirun):
    from llama_zh.stages import tracking_slice
    from llama_zh.tracking import wandb_group

    assert wandb_group(tracking_slice(hydra_multirun)) == "pretrain-lr-sweep"
    with open_dict(hydra_multirun):
        hydra_multirun.logger.wandb.group = "mine"
    assert wandb_group(tracking_slice(hydra_multirun)) == "mine"


def test_wandb_group_of_a_single_run_is_the_experiment_name():
    from llama_zh.stages import tracking_slice
    from llama_zh.tracking import wandb_group

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            "config", overrides=["experiment=tiny_lr_sweep", "paths.output_dir=/tmp/x", "paths.root_dir=/tmp"]
        )
    assert not HydraConfig.initialized()
    assert wandb_group(tracking_slice(cfg)) == "tiny_lr_sweep"


def test_jobs_of_one_process_get_their_own_wandb_run_in_the_sweeps_group(hydra_multirun, tmp_path):
    from llama_zh.stages import tracking_slice
    from llama_zh.tracking import build_loggers

    runs = []
    for num in range(2):  # as Hydra's basic launcher runs a sweep: one job after another in one process
        out = tmp_path / "lr-sweep" / str(num)
        out.mkdir(parents=True)
        wandb_logger = build_loggers(tracking_slice(hydra_multirun), out)[1]
        assert wandb_logger._wandb_init["group"] == "pretrain-lr-sweep"
        assert wandb_logger.experiment.group == "pretrain-lr-sweep"
        runs.append((out, wandb_logger.experiment.id))
    wandb_logger.experiment.finish()
    assert runs[0][1] != runs[1][1]
    for out, run_id in runs:
        assert (out / "wandb_run_id").read_text() == run_id
        assert wandb_run_record(out, wait_s=60).run_group == "pretrain-lr-sweep"


def wandb_run_record(run_dir: Path, wait_s: float = 0):
    """The RunRecord of the run directory's offline W&B run, read from its .wandb file (W&B's record
    log: a 7-byte file header, then 32 KiB blocks of chunks `crc32 u32, length u16, type u8, data`).
    W&B's service writes the file after `finish()` returns: wait up to `wait_s` for the record."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return _run_record(run_dir)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _run_record(run_dir: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    paths = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(paths) == 1, f"{run_dir}: {len(paths)} offline W&B runs"
    path = paths[0]
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "run":
                return record.run
    raise AssertionError(f"{path}: no run record")


# --------------------------------------------------------------------------------- a real sweep, end to end


def expected_from_metrics(path: Path) -> dict:
    """The job's numbers, read straight from its metrics.csv (independently of llama_zh.report)."""
    rows = read_csv(path)

    def series(column):
        return [(int(r["step"]), float(r[column])) for r in rows if r.get(column)]

    val, train = series("val/loss"), series("train/loss")
    best = min(val, key=lambda p: p[1])
    return {
        "final_val_loss": val[-1][1],
        "best_val_loss": best[1],
        "best_val_step": best[0],
        "final_train_loss": train[-1][1],
        "train": train,
        "val": val,
        "tokens_per_s": statistics.median(v for _, v in series("train/tokens_per_s")),
        "peak_memory_gib": max(v for _, v in series("memory/measured_gib")),
        "steps": max(int(r["step"]) for r in rows) + 1,
    }


@pytest.mark.slow
def test_report_of_a_real_lr_sweep(tmp_path):
    sweep = tmp_path / "lr-sweep"
    env = dict(os.environ, WANDB_MODE="offline", LLAMA_ZH_DATA=str(tmp_path / "data"), PYTHONUNBUFFERED="1")
    args = [
        sys.executable,
        "-m",
        "llama_zh",
        "--multirun",
        "optim.lr=1e-3,3e-3",
        "debug=fast",
        "data.seq_len=32",
        "data.batch_size=2",
        "trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={sweep}",
    ]
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]

    result = run_report(sweep)
    assert result.returncode == 0, result.stderr
    rows = read_csv(sweep / "report.csv")
    assert [(r["job"], r["optim.lr"], r["status"]) for r in rows] == [
        ("0", "0.001", "finished"),
        ("1", "0.003", "finished"),
    ]
    md = (sweep / "report.md").read_text()
    assert "| optim.lr |" in md and "| 0.001 " in md and "| 0.003 " in md
    for row in rows:
        expected = expected_from_metrics(sweep / row["job"] / "metrics.csv")
        assert expected["steps"] == 6
        for key in ("final_val_loss", "best_val_loss", "final_train_loss", "tokens_per_s", "peak_memory_gib"):
            assert float(row[key]) == expected[key], key
        assert (int(row["best_val_step"]), int(row["steps"])) == (expected["best_val_step"], expected["steps"])

    assert (sweep / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = report.plot_losses(report.Report.of(report.load_jobs(report.find_runs([sweep]))))
    for ax, column in zip(fig.axes, ("train", "val"), strict=False):
        assert len(ax.lines) == 2
        for line, row in zip(ax.lines, rows, strict=False):
            assert line.get_label() == f"{row['job']}: optim.lr={row['optim.lr']}"
            expected = expected_from_metrics(sweep / row["job"] / "metrics.csv")[column]
            assert list(zip(line.get_xdata(), line.get_ydata(), strict=False)) == expected

    # Both jobs ran in one process: each has its own W&B run, both in the sweep's group.
    ids = []
    for job in ("0", "1"):
        record = wandb_run_record(sweep / job)
        assert record.run_group == "pretrain-lr-sweep"
        assert record.run_id == (sweep / job / "wandb_run_id").read_text()
        ids.append(record.run_id)
    assert ids[0] != ids[1]
