"""Outputs under a temporary name (llama_zh.atomic): a full disk is one line and leaves nothing,
killed writers' temporaries are removed by the next writer of the same destination, and two
processes never write one destination or run directory at once."""

import builtins
import errno
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import REPO, llama_zh
from tiny_checkpoints import make_checkpoint

from llama_zh import atomic
from llama_zh.atomic import DiskFullError, OutputLockedError, claim_run_dir, release_run_dir
from llama_zh.checkpoint import read_native
from llama_zh.convert import write
from llama_zh.data.corpus import Source, write_source
from llama_zh.data.packing import BlockEncoder, pack_corpus_file
from llama_zh.tensor_io import CheckpointError

FORMATS = ["native", "hf", "gguf", "tencentpretrain"]
NAMES = {"native": "dst", "hf": "dst", "gguf": "dst.gguf", "tencentpretrain": "dst.bin"}


@pytest.fixture(scope="module")
def ckpt(tok, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt", tok)[0]


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def corpus_text(path: Path, lines: int = 3000) -> Path:
    path.write_text(
        "".join(f"第{i}篇文章，内容是一些中文句子，用来填满磁盘。\n" for i in range(lines)), encoding="utf-8"
    )
    return path


def assert_one_line_full_disk(error: BaseException, dst: Path):
    message = str(error)
    assert isinstance(error, DiskFullError), f"{type(error).__name__}: {message}"
    assert "\n" not in message and str(dst) in message, message
    assert "needs" in message and "free" in message, message


# ------------------------------------------------------------------------------------- a full disk


class _Limited:
    """A writable file whose writes fail with ENOSPC once its disk's budget is spent."""

    def __init__(self, f, disk):
        self._f, self._disk = f, disk

    def write(self, data):
        n = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
        if self._disk.used + n > self._disk.limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.used += n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class FullDisk:
    """Files opened for writing under `root` share `limit` bytes, past which a write raises ENOSPC:
    a full disk without mounting one."""

    def __init__(self, monkeypatch, root: Path, limit: int):
        self.root, self.limit, self.used = Path(root), limit, 0
        real_open = builtins.open

        def fake_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if (
                isinstance(file, (str, os.PathLike))
                and any(c in mode for c in "wax+")
                and Path(file).absolute().is_relative_to(self.root)
            ):
                return _Limited(f, self)
            return f

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)


@pytest.mark.parametrize("dst_format", FORMATS)
def test_full_disk_is_one_line_and_leaves_nothing(ckpt, tmp_path, monkeypatch, dst_format):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / NAMES[dst_format]
    stream = read_native(ckpt)
    # gguf writes its tensors with numpy (around Python's file object): fail in its tokenizer block.
    FullDisk(monkeypatch, out_dir, 10_000 if dst_format == "gguf" else 200_000)
    with pytest.raises(Exception) as e:
        write(stream, dst, dst_format)
    assert_one_line_full_disk(e.value, dst)
    assert "no space left on device" in str(e.value)
    assert list(out_dir.iterdir()) == []


def test_full_disk_corpus(tmp_path, monkeypatch):
    source = Source("big", [str(corpus_text(tmp_path / "big.txt"))])
    out_dir = tmp_path / "corpus"
    out_dir.mkdir()
    FullDisk(monkeypatch, out_dir, 50_000)
    with pytest.raises(Exception) as e:
        write_source(source, out_dir)
    assert_one_line_full_disk(e.value, out_dir / "big.train.txt")
    assert list(out_dir.iterdir()) == []


def test_full_disk_packing_keeps_finished_shards_only(tok, tmp_path, monkeypatch):
    corpus = corpus_text(tmp_path / "c.train.txt")
    out_dir = tmp_path / "shards"
    out_dir.mkdir()
    with BlockEncoder(tok, 1) as encoder:
        with monkeypatch.context() as m:
            FullDisk(m, out_dir, 60_000)
            with pytest.raises(Exception) as e:
                pack_corpus_file(
                    corpus, "sha", tok, encoder, out_dir, "c", "train", shard_tokens=10_000, block_bytes=4096
                )
        assert isinstance(e.value, DiskFullError) and "\n" not in str(e.value)
        assert "c.train.0" in str(e.value) and ".bin" in str(e.value) and "needs" in str(e.value)
        left = sorted(p.name for p in out_dir.iterdir())
        assert left and all(not n.startswith(".") and ".tmp" not in n for n in left), left
        # The finished shards are whole: a rerun with space resumes after them.
        result = pack_corpus_file(
            corpus, "sha", tok, encoder, out_dir, "c", "train", shard_tokens=10_000, block_bytes=4096
        )
    assert result.reused_shards > 0 and result.documents == 3000


# A real full disk: a small tmpfs (needs the right to mount, as root in a container usually has).


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def mount(size_kb: int) -> Path:
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(point)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here to fill ({done.stderr.strip() or 'mount failed'})")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "--lazy", str(point)], check=False)  # lazy: a failed test may hold a file open


def test_real_full_disk_corpus_removes_its_temporaries(tmp_path, tmpfs):
    # The cleanup itself used to fail here (closing a file flushes what no longer fits), leaving .tmp files.
    disk = tmpfs(64)
    source = Source("big", [str(corpus_text(tmp_path / "big.txt"))])
    with pytest.raises(Exception) as e:
        write_source(source, disk / "corpus")
    assert_one_line_full_disk(e.value, disk / "corpus" / "big.train.txt")
    assert list((disk / "corpus").iterdir()) == []


@pytest.mark.parametrize("dst_format", FORMATS)
def test_real_full_disk_midway(ckpt, tmpfs, monkeypatch, dst_format):
    disk = tmpfs(200)  # the checkpoint is about 400 KB in float32, 200 KB in the f16 of GGUF
    monkeypatch.setattr(atomic, "free_bytes", lambda _: 1 << 40)  # past the check made before writing
    dst = disk / NAMES[dst_format]
    with pytest.raises(Exception) as e:
        write(read_native(ckpt), dst, dst_format)
    assert_one_line_full_disk(e.value, dst)
    assert os.listdir(disk) == []


def test_real_full_disk_checked_before_writing(ckpt, tmpfs):
    disk = tmpfs(200)
    with pytest.raises(DiskFullError, match="not enough space .*needs about") as e:
        write(read_native(ckpt), disk / "dst", "native")
    assert str(disk / "dst") in str(e.value)
    assert os.listdir(disk) == []


def test_real_full_disk_from_the_command_line(ckpt, tmp_path, tmpfs):
    disk = tmpfs(200)
    monkeypatched_free = "import llama_zh.atomic as a; a.free_bytes = lambda _: 1 << 40"  # write until ENOSPC
    sitecustomize = tmp_path / "site"
    sitecustomize.mkdir()
    (sitecustomize / "sitecustomize.py").write_text(monkeypatched_free)
    dst = disk / "model.bin"
    result = llama_zh(
        "stage=convert",
        f"stage.src={ckpt}",
        "stage.src_format=native",
        f"stage.dst={dst}",
        "stage.dst_format=tencentpretrain",
        "logger=csv",
        run_dir=tmp_path / "run",
        check=False,
        env_extra={"PYTHONPATH": f"{sitecustomize}:{REPO}"},
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("llama_zh: error:")]
    assert len(errors) == 1 and str(dst) in errors[0] and "no space left on device" in errors[0], result.stderr[-2000:]
    assert "unexpected pos" not in result.stderr
    assert os.listdir(disk) == []


# ------------------------------------------------------------------------------- stale temporaries


def _fabricate(path: Path, directory: bool) -> Path:
    if directory:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"\0" * 1000)
    else:
        path.write_bytes(b"\0" * 1000)
    return path


@pytest.mark.parametrize("dst_format", FORMATS)
def test_rerun_removes_stale_temporaries_of_its_destination(ckpt, tmp_path, caplog, dst_format):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    name, directory = NAMES[dst_format], dst_format in ("native", "hf")
    gone = dead_pid()
    stale = [_fabricate(out_dir / f".{name}.tmp-{gone}-a1b2c3", directory)]
    # Left by earlier versions: mkdtemp directories, GGUF's .tmp-<pid>, TencentPretrain's <name>.tmp.
    stale.append(
        _fabricate(
            out_dir
            / (
                f".{name}.tmp-{gone}"
                if dst_format == "gguf"
                else f"{name}.tmp"
                if dst_format == "tencentpretrain"
                else f".{name}.tmp-k3j_x9qz"
            ),
            directory,
        )
    )
    live = _fabricate(out_dir / f".{name}.tmp-{os.getpid()}-d4e5f6", directory)  # a writer still running
    other = _fabricate(out_dir / f".other.tmp-{gone}-a1b2c3", directory)  # another destination's
    with caplog.at_level(logging.INFO, logger="llama_zh.atomic"):
        write(read_native(ckpt), out_dir / name, dst_format)
    assert (out_dir / name).exists()
    assert not any(p.exists() for p in stale)
    assert live.exists() and other.exists()
    removals = [r.getMessage() for r in caplog.records if "removed stale temporary" in r.getMessage()]
    assert len(removals) == 2 and all(any(str(p) in m for m in removals) for p in stale), removals
    assert f"process {gone}, which is gone" in " ".join(removals)


def test_stale_shard_temporaries_are_removed_live_ones_kept(tok, tmp_path):
    corpus = corpus_text(tmp_path / "c.train.txt", lines=50)
    out_dir = tmp_path / "shards"
    out_dir.mkdir()
    gone = dead_pid()
    stale = [
        _fabricate(out_dir / f".c.train.00000.bin.tmp-{gone}-abcdef", False),
        _fabricate(out_dir / "c.train.00001.bin.tmp", False),
    ]
    live = _fabricate(out_dir / f".c.train.00000.bin.tmp-{os.getpid()}-abcdef", False)
    with BlockEncoder(tok, 1) as encoder:
        pack_corpus_file(corpus, "sha", tok, encoder, out_dir, "c", "train", shard_tokens=10_000)
    assert not any(p.exists() for p in stale) and live.exists()


def test_an_old_directory_moved_aside_is_kept_while_it_is_the_only_copy(tmp_path):
    gone = dead_pid()
    old = _fabricate(tmp_path / f".dst.old-{gone}-abcdef", True)
    atomic.remove_stale_temporaries(tmp_path / "dst")
    assert old.exists()  # killed between the two renames of a swap: the destination is this
    (tmp_path / "dst").mkdir()
    atomic.remove_stale_temporaries(tmp_path / "dst")
    assert not old.exists()


# -------------------------------------------------------------------------------------------- locks


HOLD = """
import os, sys, time
from pathlib import Path
from llama_zh import atomic
target = Path(sys.argv[2])
lock = atomic.claim_run_dir(target) if sys.argv[1] == "run" else atomic.output_lock(target).acquire()
if "--fork" in sys.argv and os.fork() == 0:  # a worker (DataLoader's) that outlives its parent
    print("worker", os.getpid(), flush=True)
    time.sleep(60)
    os._exit(0)
time.sleep(0.5)
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder():
    children = []

    def hold(kind: str, path: Path, *extra: str) -> subprocess.Popen:
        child = subprocess.Popen(
            [sys.executable, "-c", HOLD, kind, str(path), "--marker-of-the-holder", *extra],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        children.append(child)
        line = child.stdout.readline().split()
        if line[:1] == ["worker"]:
            workers.append(int(line[1]))
            line = child.stdout.readline().split()
        assert line == ["held"]
        return child

    children, workers = [], []
    hold.workers = workers
    yield hold
    for child in children:
        child.kill()
        child.wait()
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def assert_names_holder(message: str, child: subprocess.Popen):
    assert "\n" not in message
    assert f"pid {child.pid} on {socket.gethostname()}" in message and "started 20" in message, message
    assert "--marker-of-the-holder" in message, message  # its command line


@pytest.mark.parametrize("dst_format", ["native", "gguf"])
def test_second_writer_refuses_naming_the_holder(ckpt, tmp_path, holder, dst_format):
    dst = tmp_path / NAMES[dst_format]
    child = holder("output", dst)
    with pytest.raises(OutputLockedError) as e:
        write(read_native(ckpt), dst, dst_format)
    assert_names_holder(str(e.value), child)
    assert str(dst) in str(e.value)
    assert not dst.exists()
    child.send_signal(signal.SIGKILL)  # a killed holder never blocks the next run
    child.wait()
    write(read_native(ckpt), dst, dst_format)
    assert dst.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_second_convert_from_the_command_line_refuses(ckpt, tmp_path, holder):
    dst = tmp_path / "hf"
    child = holder("output", dst)
    result = llama_zh(
        "stage=convert",
        f"stage.src={ckpt}",
        "stage.src_format=native",
        f"stage.dst={dst}",
        "stage.dst_format=hf",
        "logger=csv",
        run_dir=tmp_path / "run",
        check=False,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("llama_zh: error:")]
    assert len(errors) == 1 and str(dst) in errors[0], result.stderr[-2000:]
    assert_names_holder(errors[0], child)


def test_run_directory_is_locked_for_the_training_run(tmp_path, holder):
    from llama_zh.train.fit import fit

    run_dir = tmp_path / "run"
    child = holder("run", run_dir)
    with pytest.raises(OutputLockedError) as e:
        fit(SimpleNamespace(output_dir=run_dir), job=None)  # refused before anything else
    assert_names_holder(str(e.value), child)
    assert str(run_dir.resolve()) in str(e.value)
    child.kill()
    child.wait()
    claim_run_dir(run_dir)  # released by the holder's death
    try:
        assert claim_run_dir(run_dir) is not None  # re-entrant within one process
    finally:
        release_run_dir(run_dir)
    assert not (run_dir / atomic.RUN_LOCK).exists()


def test_a_forked_worker_outliving_a_killed_run_does_not_hold_its_lock(tmp_path, holder):
    run_dir = tmp_path / "run"
    child = holder("run", run_dir, "--fork")
    child.kill()
    child.wait()
    assert atomic.process_alive(holder.workers[0])
    claim_run_dir(run_dir)
    release_run_dir(run_dir)


def test_launched_ranks_do_not_contend_for_the_run_lock(tmp_path, holder, monkeypatch):
    child = holder("run", tmp_path)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP worker started by the launching process, which holds it
    assert claim_run_dir(tmp_path) is None
    assert child.poll() is None


def test_data_writers_wait_for_each_other(tmp_path, holder):
    Source("s", [str(corpus_text(tmp_path / "s.txt", lines=20))])
    child = holder("output", tmp_path / "corpus" / "s")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; "
            "from llama_zh.data.corpus import Source, write_source; "
            f"write_source(Source('s', [{str(tmp_path / 's.txt')!r}]), Path({str(tmp_path / 'corpus')!r}))",
        ],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=5)  # waiting, not failing
    assert not (tmp_path / "corpus" / "s.report.json").exists()
    child.kill()
    child.wait()
    assert proc.wait(timeout=120) == 0
    assert json.loads((tmp_path / "corpus" / "s.report.json").read_text())["counts"]["read"] == 20


@pytest.mark.parametrize("dst_format", FORMATS)
def test_destination_appearing_meanwhile_is_not_replaced(ckpt, tmp_path, dst_format):
    dst = tmp_path / NAMES[dst_format]
    stream = read_native(ckpt)
    tensors = stream.tensors

    def appear_midway():
        for i, item in enumerate(tensors()):
            if i == 3:  # another writer (one that takes no lock) finishes first
                if dst_format in ("native", "hf"):
                    dst.mkdir()
                    (dst / "theirs.txt").write_text("theirs")
                else:
                    dst.write_text("theirs")
            yield item

    stream.tensors = appear_midway
    with pytest.raises(CheckpointError, match=f"{dst}: already exists"):
        write(stream, dst, dst_format)
    kept = dst / "theirs.txt" if dst.is_dir() else dst
    assert kept.read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
