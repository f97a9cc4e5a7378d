"""Outputs written so that no reader, rerun or second run ever sees half of one.

Every writer of llama_zh builds its output under a temporary name beside the destination,
`.<name>.tmp-<pid>-<hex>` (a file or a directory), and renames it into place only once it is complete:
    - any failure removes the temporary, and a full disk (ENOSPC, EDQUOT) becomes one line naming
      the destination and the space it needs against the space free, instead of a traceback from
      deep inside a writer (or torch's "unexpected pos" that does not even say the disk is full);
    - temporaries of the same destination left by killed runs (their process is gone) are removed
      by the next writer of that destination, one log line each: they are as large as what was written;
    - a lock (`.<name>.lock`, fcntl.flock, so a killed holder releases it) keeps two runs from writing
      one destination; the second refuses, naming the holder. `overwrite=False` is checked under the
      lock again right before the rename, so a destination that appeared meanwhile is never replaced.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from llama_zh.errors import LlamaZhError

log = logging.getLogger(__name__)

FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
RUN_LOCK = ".llama_zh.lock"


class DiskFullError(LlamaZhError):
    """No space (or no quota) left for an output; its temporary has been removed."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = Path(path)


class OutputLockedError(LlamaZhError):
    """Another live process writes the same output or run directory."""


class OutputExistsError(LlamaZhError):
    """The destination exists and overwriting was not asked for."""


def human_bytes(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def disk_size(path: Path) -> int:
    """Bytes `path` (a file or a whole directory) occupies, 0 if gone."""
    try:
        if not path.is_dir():
            return path.stat().st_size
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    except OSError:
        return 0


def full_disk_cause(exc: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT error behind `exc`, if any: writers wrap it (torch's zip writer raises a
    RuntimeError whose context holds it), so the whole chain is searched."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFullError) and isinstance(exc.__cause__, OSError):
            return exc.__cause__
        if isinstance(exc, OSError) and exc.errno in FULL_DISK_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def disk_full_error(dst: Path, cause: OSError, written: int, need_bytes: int | None) -> DiskFullError:
    directory = _existing_parent(dst)
    try:
        free = human_bytes(free_bytes(directory))
    except OSError:
        free = "unknown"
    what = "no space left on device" if cause.errno == errno.ENOSPC else "disk quota exceeded"
    need = (
        f"needs about {human_bytes(need_bytes)}"
        if need_bytes and need_bytes > written
        else f"needs more than the {human_bytes(written)} written"
    )
    return DiskFullError(
        f"{dst}: {what} ({need}, {free} free in {directory}); "
        "the partial output was removed: free space or choose another destination",
        dst,
    )


def _existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path if path.is_dir() else path.parent


def close_quietly(f) -> None:
    """Close a file whose buffered bytes may not fit on the disk: the error was already reported."""
    if f is None:
        return
    try:
        f.close()
    except OSError:
        pass


def remove_path(path: Path) -> None:
    """Remove a file or directory tree, whatever is left of it."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError as e:
        log.warning("could not remove the temporary %s (%s)", path, e)


# ---------------------------------------------------------------------------------- stale temporaries


def temp_path(dst: Path, kind: str = "tmp") -> Path:
    """`.<name>.<kind>-<pid>-<hex>` beside `dst`: hidden, recognisable as `dst`'s, naming its owner process."""
    return dst.with_name(f".{dst.name}.{kind}-{os.getpid()}-{secrets.token_hex(3)}")


def _pattern(dst: Path) -> re.Pattern:
    # tmp-<pid>[-hex]: this module's (and the GGUF writer's former) names; tmp-XXXXXXXX: the former
    # mkdtemp directories; <name>.tmp: the former plain files. The last two name no process.
    name = re.escape(dst.name)
    return re.compile(rf"\.{name}\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)(?:-[0-9a-f]+)?|[a-z0-9_]{{8}})|{name}\.tmp")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(dst: Path) -> list[Path]:
    """Remove what killed writers of `dst` left beside it; return what was removed.

    The caller holds `dst`'s lock (or owns its directory), so no live writer of this version is
    making any of them; a temporary whose name carries a live pid is kept all the same. A former
    `.old-` (the destination moved aside during a directory swap) is removed only once the
    destination itself is back, else it is the only copy.
    """
    dst = Path(dst)
    try:
        entries = list(dst.parent.iterdir())
    except FileNotFoundError:
        return []
    pattern, removed = _pattern(dst), []
    for path in entries:
        m = pattern.fullmatch(path.name)
        if not m:
            continue
        pid = int(m.group("pid")) if m.group("pid") else None
        if pid is not None and process_alive(pid):
            continue
        if m.group("kind") == "old" and not dst.exists():
            continue
        size = disk_size(path)
        remove_path(path)
        owner = f"process {pid}, which is gone" if pid is not None else "an earlier run"
        log.info("removed stale temporary %s (%s, left by %s)", path, human_bytes(size), owner)
        removed.append(path)
    return removed


# ---------------------------------------------------------------------------------------------- locks


def _on_rank_zero() -> bool:
    """False in the processes a distributed launcher starts besides the first (they run the same
    command and must not contend for the lock the first one holds for them all)."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"))


class Lock:
    """An exclusive flock on `path`, describing its holder inside; refused or waited for when taken.

    The file is removed on release (and re-checked after locking, so a waiter never holds a lock on a
    file already unlinked). flock is released by the kernel when the holder dies: a killed run
    never blocks the next.
    """

    def __init__(self, path: Path, what: Path, wait: bool = False):
        self.path, self.what, self.wait = Path(path), Path(what), wait
        self.fd: int | None = None

    def acquire(self) -> Lock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                self._lock(fd)
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file as it released it: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(self.describe()).encode())
        self.fd = fd
        _held.add(self)
        return self

    def _lock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = self.holder()
        if not self.wait:
            raise OutputLockedError(
                f"{self.what}: in use by another run ({holder}); wait for it to end or choose another output"
            )
        log.info("%s: waiting for the run writing it to finish (%s)", self.what, holder)
        fcntl.flock(fd, fcntl.LOCK_EX)

    def describe(self) -> dict:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        }

    def holder(self) -> str:
        for _ in range(20):  # the holder writes its description right after locking
            try:
                info = json.loads(self.path.read_text())
                command = " ".join(str(info["command"]).split())
                return f"pid {info['pid']} on {info['host']}, started {info['started']}: {command}"
            except (OSError, ValueError, KeyError, TypeError):
                time.sleep(0.05)
        return f"holder unknown, lock file {self.path}"

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None
        _held.discard(self)

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_held: weakref.WeakSet[Lock] = weakref.WeakSet()


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker, a packing worker): a flock belongs to the open file,
    which the child shares, so a child outliving a killed parent would keep the lock and refuse the
    rerun. The child closes its copies and forgets them (it must not remove the parent's lock file)."""
    for lock in list(_held):
        try:
            os.close(lock.fd)
        except (OSError, TypeError):
            pass
        lock.fd = None
    _held.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def output_lock(dst: Path, wait: bool = False) -> Lock:
    """The lock of one output (a file or directory): `.<name>.lock` beside it."""
    dst = Path(dst)
    return Lock(dst.with_name(f".{dst.name}.lock"), dst, wait)


_run_locks: dict[Path, Lock] = {}  # held to the end of the run; by the process, if it ends first


def claim_run_dir(directory: Path) -> Lock | None:
    """Lock a run directory for this process (re-entrant within it) until `release_run_dir`, or its exit.

    Two runs sharing a directory would interleave their metrics.csv rows and overwrite each other's
    checkpoints; the second refuses at once instead, naming the first.
    """
    directory = Path(directory).resolve()
    if not _on_rank_zero():
        return None
    if directory not in _run_locks:
        _run_locks[directory] = Lock(directory / RUN_LOCK, directory).acquire()
    return _run_locks[directory]


def release_run_dir(directory: Path) -> None:
    lock = _run_locks.pop(Path(directory).resolve(), None)
    if lock is not None:
        lock.release()


# ------------------------------------------------------------------------------------- atomic outputs


def fsync_tree(root: Path) -> None:
    """Flush a finished output before it is renamed into place: a crash of the machine, not just of the
    process, must not leave a complete-looking output with missing bytes."""
    paths = [root] if not root.is_dir() else [Path(d) / f for d, _, files in os.walk(root) for f in files]
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicOutput:
    """One output built under a temporary name beside `dst` and renamed into place on success.

        with AtomicOutput(dst, mode="wb", need_bytes=n) as out:
            out.file.write(...)                  # or write to out.tmp (a path; a directory if directory=True)
        # renamed on leaving the block (or at out.commit()); on an exception the temporary is removed

    `lock=True` takes `dst`'s own lock (refusing if held, waiting with `wait=True`); `lock=False` is for
    a caller that already holds a lock covering `dst` or writes inside a directory only it knows.
    `need_bytes`, when known, is checked against the free space before anything is written.
    """

    def __init__(
        self,
        dst: Path,
        *,
        directory: bool = False,
        mode: str | None = None,
        encoding: str | None = None,
        overwrite: bool = True,
        need_bytes: int | None = None,
        lock: bool = True,
        wait: bool = False,
        exists_error: Callable[[str], Exception] = OutputExistsError,
    ):
        self.dst, self.directory, self.mode, self.encoding = Path(dst), directory, mode, encoding
        self.overwrite, self.need_bytes, self.exists_error = overwrite, need_bytes, exists_error
        self.lock = output_lock(self.dst, wait) if lock else None
        self.tmp = temp_path(self.dst)
        self.file = None
        self.committed = False
        self._written = 0  # bytes of the temporary when it failed, for the message

    def _check_overwrite(self) -> None:
        if self.overwrite or not self.dst.exists():
            return
        if self.dst.is_dir() and not any(self.dst.iterdir()):
            return
        raise self.exists_error(
            f"{self.dst}: already exists{' and is not empty' if self.dst.is_dir() else ''} "
            "(set overwrite to replace it)"
        )

    def begin(self) -> AtomicOutput:
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        if self.lock is not None:
            self.lock.acquire()
        try:
            self._check_overwrite()
            remove_stale_temporaries(self.dst)
            self._check_space()
            if self.directory:
                self.tmp.mkdir()
            elif self.mode is not None:
                self.file = open(self.tmp, self.mode, encoding=self.encoding)
        except BaseException as e:
            self._discard()
            self._raise_converted(e)
            raise
        return self

    def _check_space(self) -> None:
        if not self.need_bytes:
            return
        free = free_bytes(self.dst.parent)
        if free < self.need_bytes:
            raise DiskFullError(
                f"{self.dst}: not enough space (needs about {human_bytes(self.need_bytes)}, "
                f"{human_bytes(free)} free in {self.dst.parent}): free space or choose another destination",
                self.dst,
            )

    def commit(self) -> Path:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None
        else:
            fsync_tree(self.tmp)
        self._check_overwrite()  # again, under the lock: a destination may have appeared while writing
        if self.directory and self.dst.exists():
            old = temp_path(self.dst, "old")
            os.replace(self.dst, old)
            os.replace(self.tmp, self.dst)
            remove_path(old)
        else:
            os.replace(self.tmp, self.dst)
        _fsync_dir(self.dst.parent)
        self.committed = True
        return self.dst

    def _discard(self) -> None:
        close_quietly(self.file)
        self.file = None
        remove_path(self.tmp)
        if self.lock is not None:
            self.lock.release()

    def _raise_converted(self, exc: BaseException) -> None:
        if isinstance(exc, DiskFullError) and self.tmp not in (exc.path, *exc.path.parents):
            return  # it names its own output already (not a part of this one's temporary)
        cause = full_disk_cause(exc)
        if cause is not None:
            raise disk_full_error(self.dst, cause, self._written, self.need_bytes) from cause

    def abort(self, exc: BaseException | None = None) -> None:
        """Remove the temporary; a full disk behind `exc` is raised as a one-line DiskFullError."""
        self._written = disk_size(self.tmp)
        self._discard()
        if exc is not None:
            self._raise_converted(exc)

    def __enter__(self) -> AtomicOutput:
        return self.begin()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None and not self.committed:
            try:
                self.commit()
            except BaseException as e:
                self.abort(e)
                raise
        if exc is not None:
            self.abort(exc)
        elif self.lock is not None:
            self.lock.release()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: Path, text: str, lock: bool = False) -> Path:
    """A small text file (a report, an index, a manifest) written atomically."""
    with AtomicOutput(path, mode="w", encoding="utf-8", lock=lock) as out:
        out.file.write(text)
    return Path(path)


def write_bytes(path: Path, data: bytes, lock: bool = False) -> Path:
    with AtomicOutput(path, mode="wb", lock=lock) as out:
        out.file.write(data)
    return Path(path)


def write_with(path: Path, write: Callable[[Path], None], lock: bool = False) -> Path:
    """A file written by `write(temporary path)` (a library's own saver: safetensors, matplotlib), atomically."""
    with AtomicOutput(path, lock=lock) as out:
        write(out.tmp)
    return Path(path)
