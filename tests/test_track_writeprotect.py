"""Write-protect tracker (userfaultfd WP_ASYNC + PAGEMAP_SCAN) on real processes: exact page sets.

Every test on the `child` fixture runs twice: with the target's own userfaultfd (a cooperating
target, --uffd) and with one injected into a target that made none (ptrace)."""

import os

import pytest

from child import Child
from conftest import require, require_feature, swap_active
from migrator.errors import TargetGoneError, UnsupportedError
from migrator.kernel.maps import vma_smaps
from migrator.kernel.probe import probe_uffd_wp_async_anon, probe_uffd_wp_async_shmem
from migrator.tracking.uffds import UffdPool
from migrator.tracking.writeprotect import WriteProtectTracker


@pytest.fixture(params=["own", "injected"])
def child(root, request):
    require_feature("uffd_wp_async_anon", probe_uffd_wp_async_anon().supported)
    require_feature("uffd_wp_async_shmem", probe_uffd_wp_async_shmem().supported)
    c = Child(*(["--uffd"] if request.param == "own" else []), "--shm-pages", "64", "--anon-pages", "64")
    c.pools = [] if request.param == "injected" else None
    yield c
    c.exit()
    for pool in c.pools or []:
        pool.close()


def pages(tracker):
    return {k: v.pages() for k, v in tracker.collect().pages.items()}


def make(c, *names, **kw):
    """The tracker of the child's regions, with its own uffd or (fixture param) an injected one."""
    if getattr(c, "pools", None) is not None:
        c.pools.append(UffdPool())
        kw["pool"] = c.pools[-1]
    return WriteProtectTracker(c.pid, [c.region(n) for n in names], **kw)


def test_single_writes_exact(child):
    with make(child, "anon", "shm") as t:
        child.write("anon", [0, 5, 63])
        child.write("shm", [7])
        assert pages(t) == {"anon": [0, 5, 63], "shm": [7]}


def test_same_page_twice_reported_once_then_clean(child):
    with make(child, "anon") as t:
        child.write("anon", [9])
        child.write("anon", [9])
        assert pages(t) == {"anon": [9]}
        assert pages(t) == {"anon": []}
        child.write("anon", [9])
        assert pages(t) == {"anon": [9]}


def test_nothing_written(child):
    with make(child, "anon", "shm") as t:
        assert pages(t) == {"anon": [], "shm": []}
        assert pages(t) == {"anon": [], "shm": []}


def test_anon_swapped_out_then_written(child):
    require(swap_active(), "needs active swap (zram) for MADV_PAGEOUT of anonymous pages")
    with make(child, "anon") as t:
        child.write("anon", [1, 2])
        child.cmd("madvise", region="anon", advice="pageout", first=0, n=32)
        child.write("anon", [3, 40])
        assert pages(t) == {"anon": [1, 2, 3, 40]}
        child.cmd("madvise", region="anon", advice="pageout", first=0, n=64)
        child.write("anon", [4])
        assert pages(t) == {"anon": [4]}


def test_shmem_written_then_swapped_out_still_reported(child):
    """The kernel thread's case, with PTE markers: a written shmem page pushed out keeps its
    written state, and a page written again after the swap-out is reported."""
    require(swap_active(), "needs active swap (zram) for MADV_PAGEOUT of shmem pages")
    with make(child, "shm") as t:
        child.write("shm", [1, 2, 10])
        child.cmd("madvise", region="shm", advice="pageout", first=0, n=16)
        child.write("shm", [2, 20])
        assert pages(t) == {"shm": [1, 2, 10, 20]}


def test_misses_writes_from_another_process(child):
    """A second process writing the same memfd never touches the target's PTEs: the WP tracker
    does not see it (the ledger does: test_track_composite)."""
    import mmap
    a, b = child.span("shm")
    fd = os.open(f"/proc/{child.pid}/fd/{child.info['memfd']}", os.O_RDWR)
    m = mmap.mmap(fd, b - a, mmap.MAP_SHARED)
    with make(child, "shm") as t:
        m[3 * 4096:3 * 4096 + 4] = b"side"
        child.cmd("pwrite", pages=[4])
        assert pages(t) == {"shm": []}
    m.close()
    os.close(fd)


def test_anon_dontneed_reported_shmem_dontneed_not(child):
    with make(child, "anon", "shm") as t:
        child.cmd("madvise", region="anon", advice="dontneed", first=10, n=3)
        child.cmd("madvise", region="shm", advice="dontneed", first=10, n=3)
        assert pages(t) == {"anon": [10, 11, 12], "shm": []}


def test_fork_of_target(child):
    with make(child, "anon", "shm") as t:
        child.cmd("fork", region="anon", child_pages=[30])
        child.write("anon", [5])
        # the forked child's own copy of page 30 is not the target's memory
        assert pages(t) == {"anon": [5], "shm": []}
        child.write("anon", [30])
        assert pages(t) == {"anon": [30], "shm": []}


def test_new_mapping_inside_region_after_begin(child):
    """A mapping replacing part of a region: the failed scan may have re-protected pages before
    it met the new mapping, so the whole region is reported once; then the new mapping is
    tracked like the rest."""
    with make(child, "anon") as t:
        child.cmd("remap", region="anon", first=20, n=4)
        child.write("anon", [2])
        res = t.collect()
        assert res.pages["anon"].pages() == list(range(64))
        assert [e.what for e in res.events] == ["remapped", "remapped"]
        assert "0x%x-0x%x" % (child.span("anon")[0] + 20 * 4096, child.span("anon")[0] + 24 * 4096) in res.events[1].detail
        child.write("anon", [21, 40])
        assert pages(t) == {"anon": [21, 40]}


def test_new_mapping_seen_by_final_collect(child):
    """Replaced after a collect, nothing written since: the final collect's full check finds it."""
    with make(child, "anon") as t:
        child.cmd("remap", region="anon", first=20, n=4)
        res = t.collect(final=True)
        assert res.pages["anon"].pages() == [20, 21, 22, 23]
        assert [e.what for e in res.events] == ["remapped"]


def test_munmap_reported(child):
    with make(child, "anon") as t:
        child.cmd("munmap", region="anon", first=60, n=4)
        res = t.collect()
        assert [(e.what, e.detail.split()[0]) for e in res.events] == [
            ("unmapped", f"{child.span('anon')[0] + 60 * 4096:#x}-{child.span('anon')[1]:#x}")]
        assert res.pages["anon"].pages() == []


def test_mremap_shrinking_region_reported(child):
    with make(child, "anon") as t:
        child.cmd("mremap", region="anon", n=48)
        child.write("anon", [1])
        res = t.collect()
        a = child.span("anon")[0]
        assert [(e.what, e.detail.split()[0]) for e in res.events] == [
            ("unmapped", f"{a + 48 * 4096:#x}-{a + 64 * 4096:#x}")]
        assert res.pages["anon"].pages() == [1]


def test_range_bigger_than_scan_buffer(child):
    """vec of 2 entries: the walk must continue from walk_end until the end."""
    with make(child, "anon", vec_len=2) as t:
        written = [0, 3, 7, 8, 9, 20, 33, 34, 50, 63]
        child.write("anon", written)
        assert pages(t) == {"anon": written}
        assert t.pagemap.ioctl_calls >= 4


def test_target_exit_is_a_clear_error(child):
    t = make(child, "anon")
    t.begin()
    child.kill()
    with pytest.raises(TargetGoneError, match=f"process {child.pid}"):
        t.collect()
    t.end()


def test_target_without_userfaultfd_refused(root):
    c = Child("--shm-pages", "4", "--anon-pages", "4")
    try:
        with pytest.raises(UnsupportedError, match="holds no userfaultfd"):
            WriteProtectTracker(c.pid, [c.region("anon")]).begin()
    finally:
        c.exit()


@pytest.mark.parametrize("uffd", ["own", "injected"])
def test_thp_range(root, uffd):
    """A written 4 KiB page inside a transparent huge page: the scan reports exactly that page
    (the kernel splits the huge mapping when it re-protects part of it)."""
    from migrator.kernel.probe import probe_thp
    require_feature("uffd_wp_async_anon", probe_uffd_wp_async_anon().supported)
    require(probe_thp().supported, "needs anonymous THP (madvise mode)")
    c = Child(*(["--uffd"] if uffd == "own" else []), "--thp-pages", "1024", "--anon-pages", "1", "--shm-pages", "1")
    c.pools = [] if uffd == "injected" else None
    try:
        assert _anon_huge_kib(c.pid, c.span("thp")[0]) >= 2048, "the range is not backed by a huge page"
        with make(c, "thp") as t:
            c.write("thp", [5, 700])
            assert pages(t) == {"thp": [5, 700]}
            c.write("thp", [6])
            assert pages(t) == {"thp": [6]}
    finally:
        c.exit()
        for pool in c.pools or []:
            pool.close()


def test_mprotect_after_registration(child):
    """mprotect splits the VMA; both parts keep the registration: writes after read-only and
    writable again are reported exactly."""
    with make(child, "anon") as t:
        child.cmd("mprotect", region="anon", first=8, n=8, prot="r")
        child.write("anon", [2])
        assert pages(t) == {"anon": [2]}
        child.cmd("mprotect", region="anon", first=8, n=8, prot="rw")
        child.write("anon", [9, 15, 16])
        assert pages(t) == {"anon": [9, 15, 16]}


def test_mremap_moving_region_reported(child):
    """mremap moving a registered region drops its registration (no UFFD_EVENT_REMAP): the
    region is no longer mapped where it was tracked, which the tracker reports (the address
    space keeps its size, so at the latest at the final collect, which always checks)."""
    with make(child, "anon") as t:
        child.cmd("move", region="anon")
        res = t.collect(final=True)
        a, b = child.span("anon")
        assert [(e.what, e.detail.split()[0]) for e in res.events] == [("unmapped", f"{a:#x}-{b:#x}")]


def _anon_huge_kib(pid: int, addr: int) -> int:
    return int(vma_smaps(pid, addr).get("AnonHugePages", "0 kB").split()[0])
