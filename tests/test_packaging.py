"""A non-editable install runs the default job from an empty directory: the configs are package data.

The wheel is built from a copy of the checkout (an in-tree build would leave build/ and *.egg-info in
it), installed with --no-deps into a venv that sees the system's torch and friends, and run with
PYTHONPATH unset from a directory that is not the checkout, so only the installed copy can answer.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# Run data and build products of the checkout, at its root only: llama_zh/data and llama_zh/conf/data are sources.
ROOT_NOT_SOURCES = {".git", "outputs", "data", "build", "dist", "wandb", "multirun", ".pytest_cache"}
SMOKE = [
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "logger=csv",
]


def run(args, cwd, env=None, timeout=900):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, args))} exited {result.returncode}:\n{result.stderr[-4000:]}"
    return result


def outside_env() -> dict:
    """The caller's environment without anything that would put the checkout on the path or move run data."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LLAMA_ZH_DATA", "LLAMA_ZH_EXTRA_OVERRIDES")}
    return dict(env, WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def not_sources(directory: str, names: list[str]) -> set[str]:
    skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
    return skip | (ROOT_NOT_SOURCES & set(names) if Path(directory) == REPO else set())


def installed_files(package: Path) -> set[Path]:
    return {p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("src") / "llama_zh"
    shutil.copytree(REPO, source, ignore=not_sources)
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: the build backend (setuptools) is already installed, and no index is reachable.
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", out, source],
        cwd=out,
    )
    (path,) = out.glob("llama_zh-*.whl")
    return path


@pytest.fixture(scope="module")
def venv_python(wheel, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("venv")
    # The system's pip installs into the venv: no ensurepip, no index.
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], cwd=venv)
    python = venv / "bin" / "python"
    run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel],
        cwd=venv,
        env=outside_env(),
    )
    return python


def test_wheel_holds_configs_and_chat_page(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (
        "llama_zh/conf/config.yaml",
        "llama_zh/conf/model/tiny.yaml",
        "llama_zh/conf/experiment/zh_sentiment/pretrain.yaml",
        "llama_zh/infer/static/index.html",
    ):
        assert name in names, name
    shipped = {n for n in names if n.startswith("llama_zh/conf/")}
    checkout = {
        f"llama_zh/conf/{p.relative_to(REPO / 'llama_zh' / 'conf').as_posix()}"
        for p in (REPO / "llama_zh" / "conf").rglob("*")
        if p.is_file()
    }
    assert shipped == checkout


def test_installed_package_runs_default_job_from_empty_dir(venv_python, tmp_path):
    cwd = tmp_path / "empty"
    cwd.mkdir()
    env = outside_env()
    where = run([venv_python, "-c", "import llama_zh; print(llama_zh.__file__)"], cwd=cwd, env=env).stdout.strip()
    package = Path(where).parent
    assert package.is_relative_to(venv_python.parent.parent) and not package.is_relative_to(REPO), where

    before = installed_files(package)
    run([venv_python, "-m", "llama_zh", *SMOKE], cwd=cwd, env=env)

    runs = [p for p in (cwd / "outputs" / "pretrain").iterdir() if p.name != "latest"]
    assert len(runs) == 1 and (runs[0] / "checkpoints" / "final").is_dir(), runs
    assert (cwd / "data").is_dir()  # corpus and tokenizer: the user's, next to the run
    assert installed_files(package) == before  # nothing of the run went into the installed package


def test_user_config_dir_adds_options(venv_python, tmp_path):
    user = tmp_path / "my_conf"
    (user / "model").mkdir(parents=True)
    (user / "model" / "mine.yaml").write_text(
        (REPO / "llama_zh" / "conf" / "model" / "tiny.yaml").read_text().replace("name: tiny", "name: mine")
    )
    shown = run(
        [venv_python, "-m", "llama_zh", "--config-dir", user, "model=mine", "--cfg", "job", "--package", "model"],
        cwd=tmp_path,
        env=outside_env(),
    ).stdout
    assert "name: mine" in shown
