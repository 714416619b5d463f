"""Facts about the running kernel that the trackers rest on, checked with raw system calls.

Run by the kernel matrix on every kernel (MIGRATOR_KERNEL names the class: the features must be
exactly the class's); outside the matrix only the facts this kernel can show are checked.  The
shmem case is the kernel thread's failure, reproduced for real where soft-dirty exists: a written
shared-memory page pushed out to swap loses its soft-dirty bit (its PTE is cleared), while the
page cache still holds the written data.
"""

import mmap
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rawprobe as rp  # noqa: E402
import vmrun  # noqa: E402

KERNEL = os.environ.get("MIGRATOR_KERNEL")
N = 16
FIRST_HALF = set(range(N // 2))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

needs_soft_dirty = pytest.mark.skipif(not rp.has_soft_dirty(),
                                      reason="this kernel has no soft-dirty (CONFIG_MEM_SOFT_DIRTY)")


def swap_active() -> bool:
    with open("/proc/swaps") as f:
        return len(f.read().strip().splitlines()) > 1


def need_swap():
    if swap_active():
        return
    if IN_CI:
        pytest.fail("no active swap under CI=true (the matrix turns on zram in every VM)")
    pytest.skip("no active swap")


def anon():
    return mmap.mmap(-1, N * rp.PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def shared_memfd():
    fd = os.memfd_create("kernel-facts", 0)
    os.ftruncate(fd, N * rp.PAGE)
    return fd, mmap.mmap(fd, N * rp.PAGE, flags=mmap.MAP_SHARED)


def write_pages(m, pages, value=0x5A):
    for p in pages:
        m[p * rp.PAGE: p * rp.PAGE + 8] = bytes([value]) * 8


def test_features_are_exactly_the_kernel_class():
    if KERNEL is None:
        pytest.skip("MIGRATOR_KERNEL not set: run through tests/kernels/vmrun.py")
    found = rp.features()
    assert found == {k: vmrun.KERNELS[KERNEL].expect[k] for k in found}


@needs_soft_dirty
@pytest.mark.parametrize("kind", ["anon", "memfd"])
def test_soft_dirty_exact_pages(kind):
    fd = None
    m = anon() if kind == "anon" else None
    if kind == "memfd":
        fd, m = shared_memfd()
    try:
        write_pages(m, range(N))           # all present: none left to the VMA's flag
        rp.clear_soft_dirty()
        a = rp.address(m)
        assert rp.soft_dirty_pages(a, N) == set()
        write_pages(m, [0, 4, 8, 12])
        assert rp.soft_dirty_pages(a, N) == {0, 4, 8, 12}
        rp.clear_soft_dirty()
        write_pages(m, [15])
        assert rp.soft_dirty_pages(a, N) == {15}
    finally:
        m.close()
        if fd is not None:
            os.close(fd)


@needs_soft_dirty
def test_new_mapping_is_all_soft_dirty():
    """VM_SOFTDIRTY: a mapping made after clear_refs reads soft-dirty everywhere, holes too."""
    rp.clear_soft_dirty()
    m = anon()
    try:
        write_pages(m, [3])
        assert rp.soft_dirty_pages(rp.address(m), N) == set(range(N))
    finally:
        m.close()


def pageout(m):
    m.madvise(rp.MADV_PAGEOUT, 0, N * rp.PAGE)


@needs_soft_dirty
def test_anon_swap_out_keeps_soft_dirty():
    need_swap()
    m = anon()
    try:
        write_pages(m, range(N))
        rp.clear_soft_dirty()
        write_pages(m, FIRST_HALF)
        a = rp.address(m)
        pageout(m)
        ents = rp.pagemap(a, N)
        assert [bool(e & rp.PM_SWAPPED) for e in ents] == [True] * N, "MADV_PAGEOUT did not swap"
        assert rp.soft_dirty_pages(a, N) == FIRST_HALF
    finally:
        m.close()


@needs_soft_dirty
def test_shmem_swap_out_loses_soft_dirty():
    """The kernel thread's failure, for real: written shmem pages swapped out read clean."""
    need_swap()
    fd, m = shared_memfd()
    try:
        write_pages(m, range(N), 0x11)
        rp.clear_soft_dirty()
        write_pages(m, FIRST_HALF, 0x22)              # the pages the destination needs again
        a = rp.address(m)
        assert rp.soft_dirty_pages(a, N) == FIRST_HALF
        pageout(m)
        # PTEs are gone: not present, not swapped, not soft-dirty -- the writes are invisible
        assert rp.pagemap(a, N) == [0] * N
        assert rp.soft_dirty_pages(a, N) == set()
        # the page cache (the source of truth) still has them
        data = os.pread(fd, N * rp.PAGE, 0)
        assert [data[p * rp.PAGE] for p in range(N)] == [0x22] * (N // 2) + [0x11] * (N // 2)
        # written again after the swap-out: only that write is seen
        write_pages(m, [3], 0x33)
        assert rp.soft_dirty_pages(a, N) == {3}
    finally:
        m.close()
        os.close(fd)
