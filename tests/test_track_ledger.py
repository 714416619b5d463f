"""The shmem content ledger and the composite tracker on real processes: every write path to
shared memory, exact page sets; and where the write-protect tracker misses, the composite catches."""

import mmap
import os

import pytest

from child import Child
from conftest import require, require_feature, swap_active
from migrator.errors import TargetGoneError
from migrator.kernel.probe import probe, probe_map_files
from migrator.tracking.choose import make_tracker
from migrator.tracking.fullhash import FullHashTracker
from migrator.tracking.ledger import LedgerRegistry, LedgerTracker
from migrator.tracking.writeprotect import WriteProtectTracker

PS = 4096


@pytest.fixture(scope="module")
def caps():
    return probe()


@pytest.fixture
def child(root, caps):
    """A writer child; it creates a userfaultfd (harmless where the kernel has no async WP)."""
    require(caps.map_files.supported, "needs /proc/PID/map_files (CAP_SYS_ADMIN)")
    c = Child("--uffd", "--shm-pages", "64", "--anon-pages", "64")
    yield c
    c.exit()


@pytest.fixture
def wp(caps):
    """For the tests that compare with the write-protect tracker."""
    require_feature("uffd_wp_async_shmem", caps.uffd_wp_async_shmem.supported)


def pages(tracker):
    return {k: v.pages() for k, v in tracker.collect().pages.items()}


@pytest.fixture
def side_mapping(child):
    """This test process maps the child's memfd: the vhost-user backend's role."""
    a, b = child.span("shm")
    fd = os.open(f"/proc/{child.pid}/fd/{child.info['memfd']}", os.O_RDWR)
    m = mmap.mmap(fd, b - a, mmap.MAP_SHARED)
    yield m
    m.close()
    os.close(fd)


def test_ledger_target_writes(child):
    with LedgerTracker(child.pid, [child.region("shm")]) as t:
        assert pages(t) == {"shm": []}
        child.write("shm", [0, 31, 63])
        child.write("shm", [31])
        assert pages(t) == {"shm": [0, 31, 63]}
        assert pages(t) == {"shm": []}


def test_ledger_sweeps_from_a_mapping_without_touching_holes(child, side_mapping):
    """use_views: the ledger hashes the data extents straight from a read-only mapping of the
    object (the one the sender packs from); same pages reported as with pread, every write path
    seen, and a punched hole stays a hole (a read fault there would allocate the page)."""
    from migrator.kernel.shmem import data_extents
    r = child.region("shm")
    a, b = child.span("shm")
    fd = os.open(f"/proc/{child.pid}/fd/{child.info['memfd']}", os.O_RDONLY)
    view = mmap.mmap(fd, b - a, mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        t = LedgerTracker(child.pid, [r])
        t.use_views({"shm": view})
        with t:
            assert t.registry.ledgers()[0]._view is not None
            assert pages(t) == {"shm": []}
            child.write("shm", [0, 31])
            side_mapping[40 * PS:40 * PS + 1] = b"\x07"
            child.cmd("pwrite", pages=[63])
            child.cmd("punch", first=8, n=3)
            assert pages(t) == {"shm": [0, 8, 9, 10, 31, 40, 63]}
            assert pages(t) == {"shm": []}
            data = [(x // PS, y // PS) for x, y in data_extents(fd, 0, b - a)]
            assert data == [(0, 8), (11, 64)]        # pages 8-10 still not allocated
    finally:
        view.close()
        os.close(fd)


def test_ledger_ignores_rewrites_of_identical_bytes(child):
    with LedgerTracker(child.pid, [child.region("shm")]) as t:
        child.cmd("write_same", region="shm", pages=[5])
        assert pages(t) == {"shm": []}


def test_other_process_writes_missed_by_wp_caught_by_ledger(wp, child, side_mapping):
    r = child.region("shm")
    with WriteProtectTracker(child.pid, [r]) as wp, make_tracker(child.pid, [r], "auto", inject=False) as comp:
        assert comp.name == "ledger"
        side_mapping[3 * PS:3 * PS + 4] = b"side"
        side_mapping[40 * PS + 100:40 * PS + 101] = b"x"
        assert pages(wp) == {"shm": []}            # the miss
        assert pages(comp) == {"shm": [3, 40]}     # the catch


def test_pwrite_missed_by_wp_caught_by_ledger(wp, child):
    r = child.region("shm")
    with WriteProtectTracker(child.pid, [r]) as wp, LedgerTracker(child.pid, [r]) as led:
        child.cmd("pwrite", pages=[4, 5, 60])
        assert pages(wp) == {"shm": []}
        assert pages(led) == {"shm": [4, 5, 60]}


def test_fallocate_punch_reported(wp, child):
    r = child.region("shm")
    with WriteProtectTracker(child.pid, [r]) as wp, LedgerTracker(child.pid, [r]) as led:
        child.cmd("punch", first=8, n=3)
        assert pages(wp) == {"shm": []}
        assert pages(led) == {"shm": [8, 9, 10]}
        assert child.cmd("read", region="shm", page=9)["data"] == "00" * 8


def test_shmem_swapout_and_writes_by_every_path(child, side_mapping):
    """The kernel thread's case: shmem pages swapped out between rounds, some written again by the
    target, some by another process, some by pwrite; the ledger reads the page cache (swapping
    back in where needed) and reports exactly the changed pages."""
    require(swap_active(), "needs active swap (zram) for MADV_PAGEOUT of shmem pages")
    r = child.region("shm")
    with make_tracker(child.pid, [r], "auto") as t:
        child.cmd("madvise", region="shm", advice="pageout", first=0, n=64)
        assert pages(t) == {"shm": []}             # swap-out alone changes no contents
        child.write("shm", [1])
        side_mapping[2 * PS:2 * PS + 1] = b"\xff"
        child.cmd("pwrite", pages=[3])
        child.cmd("madvise", region="shm", advice="pageout", first=0, n=64)
        assert pages(t) == {"shm": [1, 2, 3]}


def test_dontneed_on_shmem_changes_nothing(child):
    with LedgerTracker(child.pid, [child.region("shm")]) as t:
        child.cmd("madvise", region="shm", advice="dontneed", first=0, n=64)
        assert pages(t) == {"shm": []}


def test_one_ledger_per_object_shared_by_trackers(child):
    """Two consumers of one object share one ledger; each sees every change once."""
    reg = LedgerRegistry()
    r = child.region("shm")
    a = LedgerTracker(child.pid, [r], reg)
    b = LedgerTracker(child.pid, [r], reg)
    a.begin()
    b.begin()
    assert len(reg.ledgers()) == 1
    child.write("shm", [7])
    assert pages(a) == {"shm": [7]}
    child.write("shm", [8])
    assert pages(b) == {"shm": [7, 8]}
    assert pages(a) == {"shm": [8]}
    reg.close()


def test_ledger_memory_per_page(child):
    with LedgerTracker(child.pid, [child.region("shm")]) as t:
        led = t.registry.ledgers()[0]
        assert led.npages == 64
        from migrator.tracking.ledger import SWEEP_BUFFER, SWEEP_THREADS
        assert (led.memory_bytes() - SWEEP_BUFFER * SWEEP_THREADS) / led.npages == 12


def test_composite_exact_for_private_and_shared(wp, child, side_mapping):
    regions = [child.region("anon"), child.region("shm")]
    with make_tracker(child.pid, regions, "auto") as t:
        assert t.name == "wp+wp-mappers+ledger"
        child.write("anon", [1, 2])
        child.write("shm", [10])
        side_mapping[11 * PS:11 * PS + 1] = b"\x01"
        child.cmd("pwrite", pages=[12])
        child.cmd("madvise", region="anon", advice="dontneed", first=50, n=1)
        assert pages(t) == {"anon": [1, 2, 50], "shm": [10, 11, 12]}
        assert pages(t) == {"anon": [], "shm": []}


def test_full_hash_tracker_exact_on_any_process(root):
    """A target with no userfaultfd, none injected: content hashing through process_vm_readv."""
    c = Child("--shm-pages", "16", "--anon-pages", "16")
    try:
        regions = [c.region("anon"), c.region("shm")]
        with make_tracker(c.pid, regions, "auto", inject=False) as t:
            assert t.name in ("hash+ledger", "soft-dirty+ledger")
            assert "no write-protect: " in t.statistics().detail    # (why: no uffd, or the kernel)
        with FullHashTracker(c.pid, regions) as t:
            c.write("anon", [0, 15])
            c.cmd("pwrite", pages=[3])
            c.cmd("madvise", region="anon", advice="dontneed", first=7, n=1)
            assert pages(t) == {"anon": [0, 7, 15], "shm": [3]}
            assert pages(t) == {"anon": [], "shm": []}
    finally:
        c.exit()


def test_ledger_target_exit(child):
    t = LedgerTracker(child.pid, [child.region("shm")])
    t.begin()
    child.kill()
    with pytest.raises(TargetGoneError, match=f"process {child.pid}"):
        t.collect()
    t.end()


def test_map_files_probe_matches_privilege():
    assert probe_map_files().supported == (os.geteuid() == 0)


def test_ledger_baseline_from_what_round_0_sent(child):
    """begin_from_sends: no initial sweep; every page counts as a zero page (what an empty
    destination holds) until record_sent() gives the hashes of the pages sent, so the first
    collect reports exactly the pages whose contents differ from what was sent."""
    from migrator.transport.pagehash import page_hashes
    fd = os.open(f"/proc/{child.pid}/fd/{child.info['memfd']}", os.O_RDONLY)
    try:
        child.cmd("punch", first=20, n=3)                        # zeros, sent as zero runs
        t = LedgerTracker(child.pid, [child.region("shm")])
        assert t.begin_from_sends() == {"shm"}
        assert t.registry.ledgers()[0].sweeps == 0               # nothing read yet
        mem = os.pread(fd, 64 * PS, 0)
        # "round 0" sent pages 0-39 (20-22 as zeros); pages 40-63 were not sent
        t.record_sent("shm", [0, 20, 23, 17], [20, 3],
                      page_hashes(mem[:20 * PS] + mem[23 * PS:40 * PS]))
        child.write("shm", [7])
        unsent_data = [p for p in range(40, 64) if any(mem[p * PS:(p + 1) * PS])]
        assert unsent_data                       # (the child's pages hold data: a real check)
        assert pages(t) == {"shm": [7] + unsent_data}
        assert pages(t) == {"shm": []}
        t.end()
    finally:
        os.close(fd)


def test_ledger_baseline_from_sends_needs_its_own_registry(child):
    """A shared registry may hold hashes others rely on: armed by a sweep as begin() does."""
    reg = LedgerRegistry()
    t = LedgerTracker(child.pid, [child.region("shm")], reg)
    assert t.begin_from_sends() == set()
    assert reg.ledgers()[0].sweeps == 1
    t.end()
    reg.close()


def test_ledger_compares_with_what_was_sent(child):
    """record_sent every round: the ledger holds the hashes of what the destination holds.  A
    page sent as B (read while the target wrote it) that is A again at the next sweep must be
    reported: compared with the ledger's own last sweep (A) it would not be.  Same for a page
    that went out as zeros but holds data."""
    import xxhash
    fd = os.open(f"/proc/{child.pid}/fd/{child.info['memfd']}", os.O_RDONLY)
    try:
        assert all(any(os.pread(fd, PS, p * PS)) for p in (5, 9, 10))   # they hold data
        with LedgerTracker(child.pid, [child.region("shm")]) as t:
            assert pages(t) == {"shm": []}
            sent_b = xxhash.xxh3_64_digest(b"B" * PS)[::-1]    # little-endian, as the sender's
            t.record_sent("shm", [5, 1], [9, 2], sent_b)      # 9-10 went out as zeros
            assert pages(t) == {"shm": [5, 9, 10]}
            assert pages(t) == {"shm": []}
    finally:
        os.close(fd)


def test_a_page_in_flight_is_never_compared_with_a_hash_from_before_its_read(child):
    """The race mark_reading closes, played in order: a sender reads page 30 (data), the target
    punches it (a hole: no write for page tables), a collect sweeps, and only then does the
    sender report the page sent with its data.  Without the mark, the sweep would compare the
    hole with the lazy baseline's zero page hash and find no change; the sweep gate passes over
    a hole it saw at a check while it stays one, so nothing would hash the page again, and the
    destination would keep the data while the source holds zeros."""
    from migrator.transport.pagehash import page_hashes
    fd = os.open(f"/proc/{child.pid}/fd/{child.info['memfd']}", os.O_RDONLY)
    try:
        t = LedgerTracker(child.pid, [child.region("shm")])
        assert t.begin_from_sends() == {"shm"}
        mem = os.pread(fd, 64 * PS, 0)
        t.record_sent("shm", [0, 30], [], page_hashes(mem[:30 * PS]))     # "round 0", part 1
        t.mark_reading("shm", [30, 2])                                    # the next batch: 30-31
        read = os.pread(fd, 2 * PS, 30 * PS)                              # ... read
        assert any(read[:PS])
        child.cmd("punch", first=30, n=1)
        unsent = list(range(32, 64))                     # (never sent: data, against zeros)
        assert pages(t) == {"shm": [30, 31] + unsent}    # 31: in flight, unchanged, reported too
        t.record_sent("shm", [30, 2], [], page_hashes(read))              # ... then reported sent
        assert pages(t) == {"shm": [30]}                 # the zeros differ from what was sent
        t.end()
    finally:
        os.close(fd)
