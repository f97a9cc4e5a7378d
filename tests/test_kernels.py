"""llama_zh.kernels: the small-batch CPU product against F.linear and its fallbacks (its use in decoding, the
kernel backend of the inference loader: tests/test_infer_room.py)."""

import gc
import mmap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama_zh import kernels

needs_kernel = pytest.mark.skipif(kernels.load() is None, reason="no AVX2 CPU or no C compiler: kernel not built")
pytestmark = pytest.mark.usefixtures("small_weights_too")  # conftest.py: the kernel for small weights too


def _close(y, ref, K):
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=2e-6 * K)


@needs_kernel
@pytest.mark.parametrize("n_threads", [1, 2])
def test_kernel_matches_f_linear_on_every_tile_and_tail(threads, n_threads):
    threads(n_threads)
    gen = torch.Generator().manual_seed(0)
    # rows: each tile (4x2, 2x4, 1x4) and their remainders; N: remainders of 2 and 4 and several
    # chunks; K: multiples of 16, of 8 only, and masked tails.
    for M in (1, 2, 3, 4, 5, 7, 8, 9, 16, 64):
        for N, K in [(1, 1), (5, 3), (7, 13), (33, 24), (250, 128), (101, 352), (1030, 40)]:
            x, w = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen)
            with torch.no_grad():
                assert kernels.applies(x, w)
                _close(kernels.linear(x, w), F.linear(x, w), K)


@needs_kernel
def test_kernel_takes_strided_views():
    gen = torch.Generator().manual_seed(1)
    fused = torch.randn(96, 40, generator=gen)
    w = fused[16:80]  # a projection's rows of a fused weight: row stride 40, offset
    x = torch.randn(3, 5, 40, generator=gen)[:, 2:3]  # (B, 1, K) view with a row stride of 5 * 40
    with torch.no_grad():
        assert kernels.applies(x, w)
        y = kernels.linear(x, w)
    assert y.shape == (3, 1, 64)
    _close(y, F.linear(x, w), 40)
    wide = torch.randn(64, 40, generator=gen)[:, ::2]  # columns not contiguous: not the kernel's layout
    assert not kernels.applies(x[..., :20], wide)
    _close(kernels.linear(x[..., :20], wide), F.linear(x[..., :20], wide), 20)


def test_everything_else_goes_to_f_linear():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(24, 16, generator=gen)
    x = torch.randn(2, 16, generator=gen)
    column_major = w.T.contiguous().T
    most_rows = torch.zeros(kernels.MAX_ROWS, 16)
    cases = {
        "column-major weight": (x, column_major),
        "bf16": (x.bfloat16(), w.bfloat16()),
        "too many rows": (torch.randn(kernels.MAX_ROWS + 1, 16, generator=gen), w),
    }
    with torch.no_grad():
        for name, (a, b) in cases.items():
            assert not kernels.applies(a, b), name
            torch.testing.assert_close(kernels.linear(a, b), F.linear(a, b), msg=name)
        if kernels.load() is not None:
            assert kernels.applies(most_rows, w)
            kernels.MIN_WEIGHT = w.numel() + 1  # restored by the fixture
            assert not kernels.applies(most_rows, w), "a weight under MIN_WEIGHT"
    # Autograd: a weight or an input that needs a gradient gets F.linear, and the gradient flows.
    trainable = w.clone().requires_grad_()
    assert not kernels.applies(x, trainable)
    kernels.linear(x, trainable).sum().backward()
    torch.testing.assert_close(trainable.grad, x.sum(0).expand(24, 16))
    xg = x.clone().requires_grad_()
    assert not kernels.applies(xg, w)
    kernels.linear(xg, w).sum().backward()
    torch.testing.assert_close(xg.grad, w.sum(0).expand(2, 16))


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """kernels.load() as on a first call, building into an empty cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    return tmp_path


def test_a_compiler_that_fails_leaves_f_linear_and_no_file(fresh_load, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")  # exits 1 for any arguments
    monkeypatch.setattr(kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(kernels.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with caplog.at_level("WARNING", logger="llama_zh.kernels"):
        assert kernels.load() is None
    assert "small-batch CPU kernel not used" in caplog.text and "false failed" in caplog.text
    assert list(fresh_load.rglob("*.so")) == []  # the temporary file is gone, nothing half-written
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    with torch.no_grad():
        assert not kernels.applies(x, w)
        torch.testing.assert_close(kernels.linear(x, w), F.linear(x, w))


def test_switched_off_by_the_environment(fresh_load, monkeypatch):
    monkeypatch.setenv("LLAMA_ZH_CPU_KERNELS", "0")
    assert kernels.load() is None
    assert list(fresh_load.rglob("*.so")) == []


@needs_kernel
def test_build_is_cached_by_source(fresh_load):
    lib = kernels.load()
    built = list(fresh_load.rglob("small_gemm-*.so"))
    assert lib is not None and len(built) == 1
    kernels._tried = False
    kernels.load()
    assert list(fresh_load.rglob("small_gemm-*.so")) == built  # reused, not rebuilt


@pytest.fixture
def gemv_isa():
    """Each GEMV path this CPU has (2 = AVX-512, 1 = AVX2), forced in turn; the best restored after."""
    lib = kernels.load()
    best = lib.llama_zh_gemv_isa()
    yield lib, list(range(1, best + 1))
    lib.llama_zh_gemv_force(best)


@needs_kernel
@pytest.mark.parametrize("n_threads", [1, 2])
def test_gemv_matches_f_linear_on_odd_shapes(gemv_isa, threads, n_threads):
    lib, isas = gemv_isa
    threads(n_threads)
    gen = torch.Generator().manual_seed(3)
    # K: under one load, masked tails of both widths (8 and 16 floats), the unrolled 64-float body and
    # its remainders; N: 1 row of w, and more than the 64 rows from which two threads share them.
    # K > 1024 at 3-4 rows: the tiles, through the same entry point.
    shapes = [(1, 1), (3, 5), (2, 7), (7, 15), (33, 17), (65, 31), (5, 64), (129, 100), (70, 200), (257, 771)]
    shapes += [(67, 1030)]
    for isa in isas:
        assert lib.llama_zh_gemv_force(isa) == isa
        for M in range(1, kernels.GEMV_ROWS + 1):
            for N, K in shapes:
                x = torch.randn(M, K + 3, generator=gen)[:, 1 : K + 1]  # row stride K + 3, offset
                w = torch.randn(N, K + 2, generator=gen)[:, :K]  # a row stride of its own
                y = torch.empty(M, N + 1)[:, :N]  # an output row stride of its own
                lib.llama_zh_gemv(M, N, K, x.data_ptr(), K + 3, w.data_ptr(), K + 2, y.data_ptr(), N + 1, n_threads)
                _close(y, F.linear(x, w), K)


@needs_kernel
def test_linear_takes_the_gemv_up_to_gemv_rows(monkeypatch, gemv_isa):
    lib, _ = gemv_isa
    taken = []

    class Spy:
        def __getattr__(self, name):
            taken.append(name)
            return getattr(lib, name)

    monkeypatch.setattr(kernels, "_lib", Spy())
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(40, 24, generator=gen)
    with torch.no_grad():
        for M in (1, kernels.GEMV_ROWS, kernels.GEMV_ROWS + 1):
            x = torch.randn(M, 1, 24, generator=gen)
            _close(kernels.linear(x, w), F.linear(x, w), 24)
    assert taken == ["llama_zh_gemv", "llama_zh_gemv", "llama_zh_sgemm_nt"]


def _huge_pages_of(address: int) -> int:
    """AnonHugePages (kB) of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(a, 16) for a in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


def test_huge_page_copy_is_an_equal_independent_aligned_copy():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(3 * kernels.HUGE_PAGE // 4 // 512 + 7, 512, generator=gen)[:, :500]  # 3 MiB, strided
    want = w.clone()
    copy = kernels.huge_page_copy(w)
    assert copy.is_contiguous() and copy.shape == w.shape and torch.equal(copy, want)
    w.zero_()
    assert torch.equal(copy, want)  # a copy, not a view of the original
    small = torch.randn(8, 16, generator=gen)
    assert kernels.huge_page_copy(small) is small  # under one huge page: left where it is
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert copy.data_ptr() % kernels.HUGE_PAGE == 0
    rows = copy[1:3]
    del copy
    gc.collect()
    assert torch.equal(rows, want[1:3])  # the mapping lives as long as a view of it


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text.split("[")[1].split("]")[0]


def _huge_page_kib(address: int) -> int:
    """AnonHugePages (KiB) of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(a, 16) for a in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="no transparent huge pages on this machine")
def test_huge_page_copy_is_backed_by_huge_pages():
    w = torch.randn(5 * kernels.HUGE_PAGE // 4 // 256, 256)  # 5 MiB: two whole 2 MiB pages and a tail
    copy = kernels.huge_page_copy(w)
    # >=: neighbouring mappings of the same kind (earlier copies) may have merged into this one
    assert _huge_page_kib(copy.data_ptr()) >= 2 * kernels.HUGE_PAGE // 1024
