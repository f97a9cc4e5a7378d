"""The commit a run records: this checkout's, marked dirty when the package's tracked files changed,
and none for a copy of the package that is not its checkout's own llama_zh/."""

import shutil
import subprocess

from helpers import REPO

from llama_zh.tracking import git_commit


def git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_a_checkout_records_its_commit_and_whether_the_package_is_dirty(tmp_path):
    repo = tmp_path / "checkout"
    shutil.copytree(REPO / "llama_zh", repo / "llama_zh", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    head = git(repo, "rev-parse", "HEAD")
    assert git_commit(repo / "llama_zh") == head
    (repo / "llama_zh" / "tracking.py").write_text("# changed\n")
    assert git_commit(repo / "llama_zh") == head + "-dirty"
    (repo / "notes.txt").write_text("untracked, outside the package: not dirty\n")
    git(repo, "checkout", "-q", "--", "llama_zh")
    assert git_commit(repo / "llama_zh") == head


def test_a_copy_installed_inside_another_repository_records_no_commit(tmp_path):
    project = tmp_path / "project"
    site = project / ".venv" / "lib" / "site-packages"
    shutil.copytree(REPO / "llama_zh" / "conf", site / "llama_zh" / "conf")  # any files: the path is what counts
    git(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "someone else's project")
    assert git_commit(site / "llama_zh") is None
    assert git_commit(tmp_path / "nowhere" / "llama_zh") is None


def test_this_package_records_the_repository_commit():
    assert git_commit() is not None and git_commit().split("-")[0] == git(REPO, "rev-parse", "HEAD")
