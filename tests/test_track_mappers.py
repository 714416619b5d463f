"""Write-protect tracking of shared memory through every process that maps it (MapperTracker), on
real processes sharing a real memfd, each with a userfaultfd injected by ptrace: exact page sets
by object page, mappers found late, mappers gone, mappers that cannot be injected."""

import os
import subprocess
import sys

import pytest

from child import Child
from conftest import require, require_feature, swap_active
from tracer import Tracer
from waiting import wait_until
from migrator.errors import TargetGoneError
from migrator.kernel.mappers import find_mappers
from migrator.kernel.maps import vma_smaps
from migrator.kernel.probe import probe_uffd_wp_async_shmem
from migrator.tracking.composite import CompositeTracker
from migrator.tracking.mappers import MapperTracker
from migrator.tracking.uffds import UffdPool


def _target(shm_pages: int):
    """A child with a memfd of shm_pages pages (populated) and 4 private pages."""
    require_feature("uffd_wp_async_shmem", probe_uffd_wp_async_shmem().supported)
    c = Child("--shm-pages", str(shm_pages), "--anon-pages", "4")
    yield c
    c.exit()


def _other(target: Child, offset: int, pages: int) -> Child:
    """Another mapper of target's memfd: object pages offset.. (pages), not populated."""
    return Child("--shm-from", f"/proc/{target.pid}/fd/{target.info['memfd']}",
                 "--shm-offset", str(offset), "--shm-pages", str(pages), "--anon-pages", "1",
                 "--no-populate")


@pytest.fixture
def target(root):
    yield from _target(64)


@pytest.fixture
def others(target):
    """Start extra mappers of the target's memfd: others(offset=0, pages=64)."""
    started = []

    def start(offset: int = 0, pages: int = 64) -> Child:
        c = _other(target, offset, pages)
        started.append(c)
        return c
    yield start
    for c in started:
        c.exit()


class Tracked:
    """A MapperTracker over the target's shm region, with its own pool (closed at exit)."""

    def __init__(self, target: Child, pool: UffdPool | None = None, **kw):
        self.pool = pool or UffdPool()
        self.t = MapperTracker(target.pid, [target.region("shm")], self.pool, **{"discover_every_s": 0, **kw})

    def __enter__(self) -> MapperTracker:
        self.t.begin()
        return self.t

    def __exit__(self, *exc) -> None:
        self.t.end()
        self.pool.close()


def pages(t) -> list[int]:
    return t.collect().pages["shm"].pages()


def test_every_mapper_exact_union(target, others):
    a, b = others(), others()
    with Tracked(target) as t:
        assert set(t.mappers()) == {target.pid, a.pid, b.pid}
        assert all("injected" in how for how in t.mappers().values())
        assert t.writer_pids() == {a.pid, b.pid}    # (a switch-over must pause them too)
        target.write("shm", [1])
        a.write("shm", [2, 40])
        b.write("shm", [63, 1])
        assert pages(t) == [1, 2, 40, 63]
        assert pages(t) == []
        b.write("shm", [7])
        assert pages(t) == [7]


def test_mapper_at_an_offset_reported_by_object_page(target, others):
    """A mapper of object pages 16..47 at its own address: its page k is object page 16 + k."""
    a = others(offset=16, pages=32)
    with Tracked(target) as t:
        a.write("shm", [0, 5, 31])
        assert pages(t) == [16, 21, 47]


def test_without_the_mappers_only_the_target_is_seen(target, others):
    """The reason for tracking every mapper: the target's own page tables miss the others."""
    a = others()
    pool = UffdPool()           # (one uffd per process: the pool gives both trackers the target's)
    from migrator.tracking.writeprotect import WriteProtectTracker
    with WriteProtectTracker(target.pid, [target.region("shm")], pool=pool) as wp, Tracked(target, pool) as t:
        a.write("shm", [9])
        assert wp.collect().pages["shm"].pages() == []
        assert pages(t) == [9]


def test_mapper_found_at_the_next_collect(target, others):
    with Tracked(target) as t:
        assert set(t.mappers()) == {target.pid}
        a = others()
        res = t.collect()
        assert [(e.what, str(a.pid) in e.detail) for e in res.events] == [("mapper-added", True)]
        a.write("shm", [3, 4])
        assert pages(t) == [3, 4]


def test_known_mappers_tracked_without_a_proc_scan(target, others):
    a = others()
    with Tracked(target) as t:
        t.discover_every_s = 3600          # no /proc scan after begin()
        n = t.discovers
        a.write("shm", [12])
        assert pages(t) == [12]
        assert t.discovers == n


def test_mapper_found_through_a_hint_without_a_proc_scan(target, others):
    """A hinted process (a --writers pid) that maps the memory only after begin() is found at the
    next collect by looking at it alone (its address-space size changed)."""
    late = subprocess.Popen([sys.executable, "-c", _MAP_LATER, f"/proc/{target.pid}/fd/{target.info['memfd']}"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert late.stdout.readline() == "ready\n"
        with Tracked(target, hint_pids=[late.pid]) as t:
            t.discover_every_s = 3600
            n = t.discovers
            assert pages(t) == [] and set(t.mappers()) == {target.pid}
            late.stdin.write("map\n")
            late.stdin.flush()
            assert late.stdout.readline() == "mapped\n"
            res = t.collect()
            assert [e.what for e in res.events] == ["mapper-added"] and t.discovers == n
            late.stdin.write("write 33\n")
            late.stdin.flush()
            assert late.stdout.readline() == "written\n"
            assert pages(t) == [33]
    finally:
        late.kill()
        late.wait()


_MAP_LATER = """
import mmap, os, sys
print("ready", flush=True)
m = None
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "map":
        fd = os.open(sys.argv[1], os.O_RDWR)
        m = mmap.mmap(fd, 64 * 4096, mmap.MAP_SHARED)
        print("mapped", flush=True)
    elif cmd[0] == "write":
        m[int(cmd[1]) * 4096] = 1 + m[int(cmd[1]) * 4096] % 255
        print("written", flush=True)
"""


def test_mapper_exit_dropped_cleanly(target, others):
    a = others()
    with Tracked(target) as t:
        a.write("shm", [5])
        a.kill()
        res = t.collect()
        assert ("mapper-gone", a.pid) in [(e.what, int(e.detail.split()[1])) for e in res.events]
        assert a.pid not in t.mappers()
        target.write("shm", [6])
        assert pages(t) == [6]


def test_target_exit_is_a_clear_error(target):
    with Tracked(target) as t:
        target.kill()
        with pytest.raises(TargetGoneError):
            t.collect()


def test_written_then_swapped_out_reported(target, others):
    """PTE markers keep a written shmem page's state through a swap-out, in any mapper."""
    require(swap_active(), "needs active swap (zram) for MADV_PAGEOUT of shmem pages")
    a = others()
    with Tracked(target) as t:
        a.write("shm", [10, 11])
        a.cmd("madvise", region="shm", advice="pageout", first=0, n=64)
        target.cmd("madvise", region="shm", advice="pageout", first=0, n=64)
        assert pages(t) == [10, 11]


def test_pwrite_is_not_a_page_table_write_but_the_ledger_sees_it(target, others):
    a = others()
    pool = UffdPool()
    shm = target.region("shm")
    with CompositeTracker(target.pid, [shm], None, mappers=MapperTracker(target.pid, [shm], pool, discover_every_s=0),
                          pool=pool) as t:
        target.cmd("pwrite", pages=[20])
        a.write("shm", [21])
        res = t.collect()
        assert res.pages["shm"].pages() == [20, 21]
        assert t.name == "wp-mappers+ledger"


def test_untrackable_mapper_reported_and_left_to_the_ledger(target, others):
    """A mapper already traced (here by a process holding PTRACE_SEIZE on it) cannot be injected:
    the tracker says so, and the ledger still sees its writes."""
    a = others()
    with Tracer(a.pid):
        pool = UffdPool()
        shm = target.region("shm")
        mt = MapperTracker(target.pid, [shm], pool, discover_every_s=0)
        with CompositeTracker(target.pid, [shm], None, mappers=mt, pool=pool) as t:
            assert mt.begin_events and mt.begin_events[0].what == "mapper-untracked"
            assert "traced" in mt.mappers()[a.pid]
            a.write("shm", [30])
            assert t.collect().pages["shm"].pages() == [30]



def test_find_mappers_by_device_and_inode(target, others):
    a = others(offset=8, pages=8)
    shm = target.region("shm")
    found = find_mappers({shm.object_key}, skip=[os.getpid()])
    assert set(found) >= {target.pid, a.pid}
    assert [(m.offset, m.end - m.start) for m in found[a.pid]] == [(8 * 4096, 8 * 4096)]


def test_no_uffd_left_after_end(target, others):
    a = others()
    with Tracked(target):
        assert "uw" in _vmflags(a.pid, a.span("shm")[0])
    for c in (target, a):
        wait_until(lambda: "uw" not in _vmflags(c.pid, c.span("shm")[0]), 5,
                   f"process {c.pid}'s mapping to lose its write-protect registration")
        assert not [n for n in os.listdir(f"/proc/{c.pid}/fd")
                    if os.readlink(f"/proc/{c.pid}/fd/{n}") == "anon_inode:[userfaultfd]"]


def _vmflags(pid: int, addr: int) -> list[str]:
    """VmFlags of the VMA at addr: "uw" marks a userfaultfd write-protect registration."""
    return vma_smaps(pid, addr)["VmFlags"].split()



def test_mapper_mapping_replaced_found_by_the_proc_scan(target, others):
    """A mapper maps anonymous memory over part of its mapping of the memfd: the replaced mapping
    is reported gone (writes through it since the last collect are unknown to page tables: the
    ledger's), its remaining parts registered again, and later writes reported exactly."""
    a = others()
    with Tracked(target) as t:
        a.cmd("remap", region="shm", first=20, n=4)
        res = t.collect()
        assert [e.what for e in res.events] == ["mapper-gone", "mapper-added"]
        a.write("shm", [30, 2])
        target.write("shm", [21])
        assert pages(t) == [2, 21, 30]


# --- walks in parallel (MapperTracker._scan_parallel) ---------------------------------------------
# Real collects of 8 GiB walk in parallel (over 256 MiB in all); here the threshold is lowered so
# that an 8 MiB memfd takes the same path, cut at the same 2 MiB boundaries.

@pytest.fixture
def big_target(root):
    yield from _target(2048)


def _parallel(t: MapperTracker, monkeypatch, workers: int = 3) -> None:
    import migrator.tracking.mappers as mappers_mod
    monkeypatch.setattr(mappers_mod, "PARALLEL_MIN_PAGES", 0)
    t.workers = workers


def test_parallel_walks_report_the_exact_union_across_their_cuts(big_target, monkeypatch):
    """Three mappers (5120 pages of walks: three parts of ~1707 pages, cut at multiples of 512
    inside the first and second mappers' spans); pages on both sides of every cut, the same page
    from two mappers, a mapper at an offset.  Each collect reports exactly what was written."""
    a, b = _other(big_target, 0, 2048), _other(big_target, 1024, 1024)
    try:
        with Tracked(big_target) as t:
            _parallel(t, monkeypatch)
            assert pages(t) == []
            big_target.write("shm", [0, 511, 512, 1535, 1536, 1537, 2047])
            a.write("shm", [0, 1, 1023, 1024, 1025, 2047])
            b.write("shm", [0, 511, 512, 1023])        # object pages 1024, 1535, 1536, 2047
            assert pages(t) == [0, 1, 511, 512, 1023, 1024, 1025, 1535, 1536, 1537, 2047]
            assert pages(t) == []
            b.write("shm", [100])
            a.write("shm", [1800])
            assert pages(t) == [1124, 1800]
            assert t._pool is not None                 # (the walks did run in parallel)
    finally:
        a.exit()
        b.exit()


@pytest.mark.parametrize("workers", [1, 2])
def test_walk_of_a_remapped_span_reports_it_whole(big_target, monkeypatch, workers):
    """A mapper replaces part of its mapping with anonymous memory of the same size (its
    address-space size unchanged, so no new look at its maps): the walk fails on it (in parallel
    or not), and the span is walked again the usual way, reported whole, its new mappings
    registered and their writes reported next time (with one worker they were lost until
    2026-12-05: the tracker kept the old mapping as last seen, and dropped the new ones)."""
    a = _other(big_target, 0, 2048)
    try:
        with Tracked(big_target, discover_every_s=3600) as t:
            _parallel(t, monkeypatch, workers=workers)
            assert pages(t) == []                      # (its size is known from now on)
            a.cmd("remap", region="shm", first=700, n=4)
            big_target.write("shm", [5])
            res = t.collect()
            assert "mapper-remapped" in [e.what for e in res.events]
            assert res.pages["shm"].pages() == list(range(2048))
            a.write("shm", [30, 1900])
            big_target.write("shm", [702])
            assert pages(t) == [30, 702, 1900]
    finally:
        a.exit()


def test_parallel_walk_of_a_mapper_gone_reports_it_gone(big_target, monkeypatch):
    a = _other(big_target, 0, 2048)
    with Tracked(big_target, discover_every_s=3600) as t:
        _parallel(t, monkeypatch, workers=2)
        big_target.write("shm", [3, 2000])
        a.kill()
        res = t.collect()
        assert ("mapper-gone", a.pid) in [(e.what, int(e.detail.split()[1])) for e in res.events]
        assert res.pages["shm"].pages() == [3, 2000]
        assert a.pid not in t.mappers()


def test_final_collect_walks_before_the_scan_it_is_given(big_target, monkeypatch):
    """The final collect with the /proc scan given as a function (run beside the walks, as the
    composite does): the known mappers are walked first, then the scan's findings applied. A
    mapper that exited and one that appeared are reported as with the scan first, and the pages
    are exact."""
    a = _other(big_target, 0, 2048)
    b = None
    try:
        with Tracked(big_target, discover_every_s=3600) as t:
            _parallel(t, monkeypatch, workers=2)
            assert pages(t) == []
            big_target.write("shm", [1, 1500])
            a.write("shm", [600])
            a.kill()
            b = _other(big_target, 512, 512)
            b.write("shm", [3])
            calls = []

            def found():
                calls.append(1)
                return find_mappers({big_target.region("shm").object_key}, skip=[os.getpid()])
            res = t.collect(final=True, found=found)
            assert calls == [1] and t._pool is not None   # (walked in parallel, scanned once)
            events = {(e.what, int(e.detail.split()[1])) for e in res.events}
            assert ("mapper-gone", a.pid) in events and ("mapper-untracked", b.pid) in events
            # what a wrote before it exited, and what b wrote, are not page tables' to show
            # (the ledger's: test_sweepgate); the target's writes are exact
            assert res.pages["shm"].pages() == [1, 1500]
    finally:
        a.exit()
        if b is not None:
            b.exit()
