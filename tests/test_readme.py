"""The README's commands work as written: every ```bash (and ```python) block, in order, as one script in an empty
directory, the way a new user would paste them; plus the `latest` link and the checkpoint line
they rely on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import llama_zh
from tiny_checkpoints import make_checkpoint, train_tokenizer

from llama_zh.__main__ import EXTRA_OVERRIDES_ENV, extra_overrides
from llama_zh.errors import LlamaZhError
from llama_zh.stages.rundir import link_latest, written_checkpoint

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SKIP = re.compile(r"<!--\s*not run in tests:\s*\S.*-->")
# What a skipped block may need that a test machine lacks: LLaMA's files, your own data, GPUs, a
# terminal, a package index, DeepSpeed's compiler run, or it is the test suite itself.
OUTSIDE = (
    "/llama/",
    "LLaMA/",
    "hf_llama",
    "/corpora/",
    "my_alpaca",
    "my_prefs",
    "ceval_",
    "a800x8",
    "stage.mode=chat",
    "pip install",
    "apt-get install",
    "pytest",
    "strategy=zero3_offload",
    "stage=serve",
    "127.0.0.1:8000",
)
# Enough steps to train, validate and checkpoint; the commands' own step counts are for real use.
SMOKE = (
    "trainer.max_steps=2 trainer.val_check_interval=2 trainer.limit_val_batches=1 trainer.enable_progress_bar=false "
    "data.batch_size=2"
)


def code_blocks(text: str) -> tuple[list[str], list[str]]:
    """The ```bash and ```python blocks to run, as shell text (Python through `python -`), and those
    skipped (a `<!-- not run in tests: why -->` line right before the fence)."""
    run, skipped = [], []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        language = lines[i].strip().removeprefix("```")
        if not lines[i].strip().startswith("```") or language not in ("bash", "python"):
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"README.md:{i + 1}: ```{language} block never closed"
        body = "\n".join(lines[i + 1 : end])
        if language == "python":
            body = f"python - <<'README_PY'\n{body}\nREADME_PY"
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        (skipped if SKIP.search(previous) else run).append(body)
        i = end + 1
    return run, skipped


def readme_script(blocks: list[str]) -> str:
    # pipefail: `cmd | tail` fails with cmd; the trap names the failing command last in the log.
    return (
        "set -euxo pipefail\ntrap 'echo \"README command failed: $BASH_COMMAND\" >&2' ERR\n" + "\n".join(blocks) + "\n"
    )


def user_env() -> dict:
    """The test's environment as a user's shell would have it: `python` is this interpreter, the
    package under test comes first on the path, data goes to ./data (no LLAMA_ZH_DATA), and no
    overrides are added unless a test says so."""
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_ZH_DATA", EXTRA_OVERRIDES_ENV)}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    env.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def test_blocks_split_on_the_marker():
    text = (
        "```bash\necho a\n```\n<!-- not run in tests: needs real LLaMA weights -->\n\n```bash\necho b\n```\n"
        "<!-- some other comment -->\n```bash\necho c\n```\n```python\nx = 1\n```\n```\nlayout\n```\n"
    )
    run, skipped = code_blocks(text)
    assert run == ["echo a", "echo c", "python - <<'README_PY'\nx = 1\nREADME_PY"] and skipped == ["echo b"]


def test_readme_has_commands_and_marks_those_it_skips():
    run, skipped = code_blocks(README.read_text(encoding="utf-8"))
    commands = [line for block in run for line in block.splitlines() if line.startswith("python -m llama_zh")]
    assert len(commands) >= 20, f"only {len(commands)} runnable README commands found"
    for block in skipped:  # skipped for what a test machine lacks, not to hide a failing command
        assert any(need in block for need in OUTSIDE), f"README.md: a skipped block needs nothing outside:\n{block}"


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    run, _ = code_blocks(README.read_text(encoding="utf-8"))
    assert run, "no ```bash or ```python blocks found in README.md"
    script = tmp_path / "readme.sh"
    script.write_text(readme_script(run), encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    env = dict(user_env(), **{EXTRA_OVERRIDES_ENV: SMOKE})
    result = subprocess.run(
        ["bash", str(script)], cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1500
    )
    assert result.returncode == 0, f"a README command failed (exit {result.returncode}):\n" + (
        result.stdout[-3000:] + "\n--- stderr ---\n" + result.stderr[-6000:]
    )
    # The chain really ran: each stage left its run, and the links name the newest.
    for stage in ("pretrain", "tokenizer", "sft", "eval", "infer", "convert"):
        assert (work / "outputs" / stage / "latest").is_symlink(), stage
    assert (work / "outputs" / "multirun" / "eval" / "latest" / "2").is_dir()
    assert (work / "tok_ext" / "checkpoint" / "model.safetensors").is_file()


# ------------------------------------------------------------------ the parts the chain relies on


def test_latest_link_is_relative_and_replaced(tmp_path):
    first, second = tmp_path / "pretrain" / "2024-01-01_00-00-00", tmp_path / "pretrain" / "2024-01-01_00-00-05"
    first.mkdir(parents=True)
    link = link_latest(first)
    assert link == tmp_path / "pretrain" / "latest" and os.readlink(link) == first.name
    second.mkdir()
    (second / "marker").write_text("2")
    assert link_latest(second) == link and os.readlink(link) == second.name
    assert (link / "marker").read_text() == "2"
    assert sorted(p.name for p in link.parent.iterdir()) == [first.name, second.name, "latest"]  # no temporary left


def test_latest_link_never_replaces_a_real_directory(tmp_path):
    (tmp_path / "latest").mkdir()
    (tmp_path / "latest" / "keep").write_text("x")
    (tmp_path / "run").mkdir()
    assert link_latest(tmp_path / "run") is None
    assert (tmp_path / "latest" / "keep").read_text() == "x" and not (tmp_path / "latest").is_symlink()
    assert link_latest(Path(".")) is None


def test_extra_overrides_are_added_once_after_the_commands_own():
    argv = ["llama_zh", "stage=sft", "trainer.max_steps=100"]
    assert extra_overrides(argv, None) == argv
    once = extra_overrides(argv, "trainer.max_steps=6 'stage.pad_token=<pad>'")
    assert once == argv + ["trainer.max_steps=6", "stage.pad_token=<pad>"]
    assert extra_overrides(once, "trainer.max_steps=6 'stage.pad_token=<pad>'") == once  # a DDP rank re-running it
    # After the last override, not after a flag that follows it (Hydra would refuse the split run).
    assert extra_overrides(["llama_zh", "stage=eval", "--multirun", "quant=none,int8"], "stage.max_batches=1") == [
        "llama_zh",
        "stage=eval",
        "--multirun",
        "quant=none,int8",
        "stage.max_batches=1",
    ]
    assert extra_overrides(["llama_zh", "stage=eval", "quant=none,int8", "--multirun"], "stage.max_batches=1") == [
        "llama_zh",
        "stage=eval",
        "quant=none,int8",
        "stage.max_batches=1",
        "--multirun",
    ]
    assert extra_overrides(["llama_zh", "--multirun"], "a=1") == ["llama_zh", "--multirun", "a=1"]
    with pytest.raises(LlamaZhError, match=EXTRA_OVERRIDES_ENV):
        extra_overrides(argv, "trainer.max_steps='6")


def test_written_checkpoint_of_each_result_kind():
    class Trained(float):
        checkpoint = Path("run/checkpoints/final")

    assert written_checkpoint(Trained(1.0)) == os.path.abspath("run/checkpoints/final")
    assert written_checkpoint({"checkpoint": "tiny-hf", "format": "hf"}) == os.path.abspath("tiny-hf")
    assert written_checkpoint({"tokenizer": "tok/tokenizer.model"}) is None
    assert written_checkpoint("answers.txt") is None


@pytest.mark.slow
def test_entry_point_links_latest_and_prints_the_checkpoint_last(tmp_path):
    tokenizer = train_tokenizer(tmp_path / "tok")
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", tokenizer)
    work = tmp_path / "work"
    work.mkdir()
    args = ["stage=convert", f"stage.src={ckpt}", "stage.src_format=native"]
    env = user_env()
    single = llama_zh(*args, "stage.dst_format=hf", cwd=work, env=env, timeout=600)
    link = work / "outputs" / "convert" / "latest"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert single.stdout.splitlines()[-1] == str(link.resolve() / "converted")

    named = llama_zh(*args, "stage.dst_format=hf", run_dir="runs/mine", cwd=work, env=env, timeout=600)
    assert not (work / "runs" / "latest").exists()  # a directory the user named is found by that name
    assert named.stdout.splitlines()[-1] == str(work / "runs" / "mine" / "converted")

    sweep = llama_zh("--multirun", *args, "stage.dst_format=hf,native", cwd=work, env=env, timeout=600)
    link = work / "outputs" / "multirun" / "convert" / "latest"
    assert link.is_symlink() and (link / "0" / "converted" / "config.json").is_file()
    assert sweep.stdout.splitlines()[-1] == str(link.resolve() / "1" / "converted")
