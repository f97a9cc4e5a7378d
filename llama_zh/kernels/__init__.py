"""`linear(x, weight)`: F.linear without bias, through a CPU kernel for the few rows of a decoding step.

Two kernels (small_gemm.c, AVX2 + FMA, AVX-512 chosen at run time where the CPU has it): for up to
GEMV_ROWS rows a GEMV that reads the weight as one forward stream, one row after the other; for more
rows, tiles of rows of x against rows of w. `huge_page_copy` lays a weight out in 2 MiB pages, which
the loader's kernel backend does once per weight at load. The library is compiled on first use with
the system C compiler into a per-user cache and called through ctypes; it is used only where it
measured faster than PyTorch's own product: fp32 on an x86-64 CPU with AVX2, a row-major weight, at
most MAX_ROWS rows, and no autograd. Everything else, and every machine without a compiler, goes to
F.linear unchanged. LLAMA_ZH_CPU_KERNELS=0 turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import mmap
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("small_gemm.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
# Rows (batch x new tokens) up to which the kernel beats MKL on cold weights; past it the product is
# compute-bound and MKL's blocked GEMM wins (figures: experiments/inference.md, the kernel's thresholds).
MAX_ROWS = 64
# Elements from which a weight goes to the kernel (1 MiB of fp32): smaller weights stay in cache from
# one decoding step to the next, where MKL is as fast and the ctypes call costs more
# (experiments/inference.md, the kernel's thresholds).
MIN_WEIGHT = 1 << 18
# Rows up to which llama_zh_gemv streams w once (small_gemm.c GEMV_MAX_ROWS); past it, the tiles.
GEMV_ROWS = 4
HUGE_PAGE = 2 << 20

_lib: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "llama_zh" / "kernels"


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)


def _build(compiler: str) -> Path:
    """The shared library for this source, flags and compiler, compiled once (atomically: a
    temporary name renamed into place, so concurrent first uses cannot load half a file)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"small_gemm-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE}: {done.stderr.strip()[:500]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it does not apply (reason logged once)."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("LLAMA_ZH_CPU_KERNELS", "1") == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64") or torch.backends.cpu.get_cpu_capability() not in (
        "AVX2",
        "AVX512",
    ):
        log.info("small-batch CPU kernel not used: needs an x86-64 CPU with AVX2")
        return None
    compiler = _compiler()
    if compiler is None:
        log.info("small-batch CPU kernel not used: no C compiler found (cc, gcc or clang)")
        return None
    try:
        # torch is imported, so its OpenMP runtime (soname libgomp.so.1) is the one the kernel binds to.
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        log.warning("small-batch CPU kernel not used: %s", err)
        return None
    c_long, ptr = ctypes.c_long, ctypes.c_void_p
    lib.llama_zh_sgemm_nt.argtypes = [c_long, c_long, c_long, ptr, c_long, ptr, c_long, ptr, c_long, ctypes.c_int]
    lib.llama_zh_sgemm_nt.restype = None
    lib.llama_zh_gemv.argtypes = lib.llama_zh_sgemm_nt.argtypes
    lib.llama_zh_gemv.restype = None
    lib.llama_zh_gemv_isa.argtypes = []
    lib.llama_zh_gemv_isa.restype = ctypes.c_int
    lib.llama_zh_gemv_force.argtypes = [ctypes.c_int]
    lib.llama_zh_gemv_force.restype = ctypes.c_int
    _lib = lib
    return lib


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear(x, weight) takes the kernel. Called for every product of every decoding step
    (49 per 130m step), so written in the tensor attributes that cost least (is_cpu rather than
    device.type, `is` on dtypes, the grad flags only when grad mode is on; experiments/inference.md)."""
    if not _tried:
        load()
    f32 = torch.float32
    return (
        _lib is not None
        and x.dtype is f32
        and weight.dtype is f32
        and x.is_cpu
        and weight.is_cpu
        and weight.dim() == 2
        and weight.stride(1) == 1
        and x.shape[-1] == weight.shape[1]
        and weight.numel() >= MIN_WEIGHT
        and 0 < x.numel() <= MAX_ROWS * weight.shape[1]
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight): x (..., K), weight (N, K) -> (..., N)."""
    if not applies(x, weight):
        return F.linear(x, weight)
    N, K = weight.shape
    rows = x.numel() // K
    if not x.is_contiguous():
        x = x.contiguous()
    y = x.new_empty(x.shape[:-1] + (N,))
    product = _lib.llama_zh_gemv if rows <= GEMV_ROWS else _lib.llama_zh_sgemm_nt
    product(rows, N, K, x.data_ptr(), K, weight.data_ptr(), weight.stride(0), y.data_ptr(), N, torch.get_num_threads())
    return y


def huge_page_copy(weight: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `weight` in fresh anonymous memory asked to be backed by 2 MiB pages
    (transparent huge pages, madvise); a plain contiguous copy where that cannot be asked.

    Why: a decoding step streams every weight once, 4 KiB pages cost a TLB miss every 64 cache lines
    and stop the hardware prefetcher at every page boundary (figures: experiments/inference.md).
    The pages are asked for before the first write (a page already touched stays 4 KiB); only whole
    2 MiB ranges are asked for, so the tail stays in small pages and no memory is wasted
    (docs/reference.md#huge-pages)."""
    nbytes = weight.numel() * weight.element_size()
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE") or weight.device.type != "cpu":
        return weight.contiguous()
    try:
        # private: a shared anonymous mapping is shmem, whose huge pages are a separate, mostly-off setting;
        # the extra 2 MiB are slack for the alignment, never touched and so never backed
        buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        address = torch.frombuffer(buf, dtype=torch.uint8, count=1).data_ptr()
        offset = -address % HUGE_PAGE
        buf.madvise(mmap.MADV_HUGEPAGE, offset, nbytes // HUGE_PAGE * HUGE_PAGE)
    except (OSError, ValueError) as err:  # no THP in this kernel, or a limit on mappings
        log.info("2 MiB pages not used for a %s weight: %s", tuple(weight.shape), err)
        return weight.contiguous()
    # frombuffer keeps `buf` alive as long as the tensor (or a view of it) is
    copy = torch.frombuffer(buf, dtype=weight.dtype, count=weight.numel(), offset=offset).view(weight.shape)
    return copy.copy_(weight)


def trim_heap() -> bool:
    """Give the C heap's free memory back to the OS (glibc's malloc_trim); False where there is no
    glibc. Why: a load that re-lays weights (fused copies, 2 MiB-page copies, column-major copies)
    frees the originals, and glibc keeps freed heap chunks mapped: the 130m model loaded through the
    kernel backend held 970 MB resident against 835 MB after the trim (torch backend: 901 / 835)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True
