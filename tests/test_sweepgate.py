"""The sweep gate (tracking/sweepgate.py): the shmem ledger sweeps an object only when page tables
cannot prove it unchanged.  Real processes share a real memfd, each write-protected through an
injected userfaultfd; every test asserts the exact pages a collect reports and, where the ledger
must sweep, the reason it gives."""

import contextlib
import os

import pytest

from child import Child
from conftest import require_feature
from migrator.kernel.probe import probe_uffd_wp_async_shmem
from migrator.tracking.choose import make_tracker


@pytest.fixture
def target(root):
    require_feature("uffd_wp_async_shmem", probe_uffd_wp_async_shmem().supported)
    c = Child("--shm-pages", "64", "--anon-pages", "4")
    yield c
    c.exit()


@pytest.fixture
def others(target):
    """Start more processes mapping the memfd, opened through a read-only descriptor this test
    keeps (a read-only holder cannot write it: the gate passes over it)."""
    keeper = os.open(f"/proc/{target.pid}/fd/{target.info['memfd']}", os.O_RDONLY)
    started = []

    def start(*extra: str) -> Child:
        c = Child("--shm-from", f"/proc/{os.getpid()}/fd/{keeper}", "--shm-pages", "64",
                  "--anon-pages", "1", "--no-populate", *extra)
        started.append(c)
        return c
    yield start
    for c in started:
        c.exit()
    os.close(keeper)


class Tracked:
    """The default tracker of the target's shared region (write-protect on every mapper + the
    ledger behind the sweep gate)."""

    def __init__(self, target: Child, **kw):
        self.t = make_tracker(target.pid, [target.region("shm")], **kw)

    def __enter__(self):
        self.t.begin()
        assert self.t.name == "wp-mappers+ledger"
        return self

    def __exit__(self, *exc) -> None:
        self.t.end()

    def collect(self, final: bool = False):
        self.last = d = self.t.collect(final=final)
        return d.pages["shm"].pages(), [s.reason for s in d.sweeps]

    def left_view(self) -> list[str]:
        """The last collect's pages-left-view events."""
        return [e.detail for e in self.last.events if e.what == "pages-left-view"]

    def bytes_read(self) -> int:
        return sum(led.bytes_read for led in self.t.ledger.registry.ledgers())


def mapper_only(target: Child, others) -> Child:
    """The target and one more process map the memfd; neither holds a descriptor of it."""
    b = others("--close-memfd")
    target.cmd("close_memfd")
    return b


def test_page_tables_alone_when_every_writer_is_a_tracked_mapper(target, others):
    b = mapper_only(target, others)
    with Tracked(target) as t:
        target.write("shm", [1, 2])
        b.write("shm", [40])
        assert t.collect() == ([1, 2, 40], [])
        assert t.collect() == ([], [])
        b.write("shm", [63])
        assert t.collect(final=True) == ([63], [])


def test_write_calls_by_a_holder_make_it_sweep(target, others):
    mapper_only(target, others)
    writer = others()                  # maps it and holds a descriptor open for writing
    with Tracked(target) as t:
        assert t.collect() == ([], [])
        writer.cmd("pwrite", pages=[5, 17])        # no page table sees these
        pages, why = t.collect()
        assert pages == [5, 17]
        assert len(why) == 1 and f"process {writer.pid} made" in why[0] and "write calls" in why[0]
        assert t.collect() == ([], [])             # (its counters did not move since)


def test_a_holder_found_since_the_last_collect_makes_it_sweep(target, others):
    mapper_only(target, others)
    with Tracked(target) as t:
        late = others()
        late.cmd("pwrite", pages=[9])
        pages, why = t.collect()
        assert pages == [9]
        assert any(f"process {late.pid} opened it for writing since the last collect" in w for w in why)


def test_a_child_that_wrote_and_was_reaped_makes_it_sweep(target, others):
    """A fork inherits the mapping without write-protection: its writes are in no tracked page
    table.  The child is gone by the collect; its parent's reaped-children faults moved."""
    mapper_only(target, others)
    with Tracked(target) as t:
        target.cmd("fork_exit", region="shm", child_pages=[7, 8])
        pages, why = t.collect()
        assert pages == [7, 8]
        assert any(f"process {target.pid} reaped a child" in w for w in why), why
        assert t.collect() == ([], [])


def test_a_live_child_makes_it_sweep(target, others):
    mapper_only(target, others)
    with Tracked(target) as t:
        child = target.cmd("fork", region="shm", child_pages=[11])["child"]
        pages, why = t.collect()
        assert pages == [11]
        assert any(f"process {target.pid} forked process {child}" in w for w in why), why


def test_punched_pages_are_hashed_alone(target):
    """Pages punched through the memfd's own descriptor by a process vouched for (no write call
    to give it away, no fault) leave the view the gate's holder process keeps of the object:
    the ledger hashes those pages alone (holes: nothing read), with no sweep of the object.
    A check whose holder RssShmem did not move skips the view's page-table walk."""
    with Tracked(target, no_syscall_writes={target.pid}) as t:
        gate = t.t.gate
        assert t.collect() == ([], [])
        read, skipped = t.bytes_read(), gate.scans_skipped
        assert skipped >= 1 or not gate._holder.rss_exact
        target.cmd("punch", first=20, n=2)
        assert t.collect() == ([20, 21], [])
        assert t.left_view() == ["2 of its pages left migrator's view of it (punched, removed, "
                                 "truncated or reclaimed): hashed alone"]
        assert t.bytes_read() == read and gate.scans_skipped == skipped
        assert t.collect() == ([], []) and t.left_view() == [] and t.bytes_read() == read
        target.write("shm", [20])                   # a hole written again: hashed (1 page read)
        assert t.collect() == ([20], []) and t.bytes_read() == read + 4096
        # the next check faults it back into the view, and hashes the pages of the view in its
        # 2 MiB block of the holder's address space (the kernel's fault-around maps neighbours
        # too), the hole (21) as zeros unread
        [(addr, _)] = gate._views.values()
        block = (addr + 20 * 4096) & ~((2 << 20) - 1)
        first, end = max(0, (block - addr) // 4096), min(64, (block + (2 << 20) - addr) // 4096)
        block_read = (end - first - (first <= 21 < end)) * 4096
        assert t.collect() == ([], []) and t.bytes_read() == read + 4096 + block_read
        n = gate.scans_skipped
        assert t.collect() == ([], []) and t.bytes_read() == read + 4096 + block_read
        assert gate.scans_skipped == n + 1 or not gate._holder.rss_exact


def test_direct_io_reads_make_it_sweep(target, others, tmp_path):
    """A mapper reading a file with O_DIRECT into the shared memory: the device writes pages
    pinned before a collect may have re-protected them, without a fault."""
    b = mapper_only(target, others)
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(4096))
    with Tracked(target) as t:
        b.cmd("direct_read", region="shm", path=str(path), page=30)
        pages, why = t.collect()
        assert pages == [30]
        assert any(f"process {b.pid} completed" in w and "O_DIRECT" in w for w in why), why
        b.write("shm", [31])       # (its O_DIRECT descriptor is still open, its reads go on)
        pages, why = t.collect()
        assert pages == [31] and why and "O_DIRECT" in why[0]


def test_async_io_makes_it_sweep(target, others):
    b = mapper_only(target, others)
    with Tracked(target) as t:
        b.cmd("io_uring")
        b.write("shm", [2])
        pages, why = t.collect()
        assert pages == [2]
        assert any(f"process {b.pid} has asynchronous I/O (io_uring)" in w for w in why), why


def test_process_vouched_for_makes_write_calls_without_a_sweep(target, others):
    """no_syscall_writes (QEMU): its write calls (eventfds, logs) are not writes to the memory."""
    with Tracked(target, no_syscall_writes={target.pid}) as t:
        target.write("shm", [3])                   # (its reply to each command is a write call)
        assert t.collect() == ([3], [])


def test_without_write_protect_every_collect_sweeps(target, others):
    mapper_only(target, others)
    t = make_tracker(target.pid, [target.region("shm")], inject=False)
    with t:
        assert t.name == "ledger"
        target.write("shm", [4])
        d = t.collect()
        assert d.pages["shm"].pages() == [4]
        [s] = d.sweeps
        assert s.regions == ("shm",) and s.nbytes == 64 * 4096
        assert s.reason.startswith("no page-table tracking of its mappers")


@contextlib.contextmanager
def tracked_with_a_faulted_view(target):
    """Tracked(target), the target vouched for, with a read-only view of its memfd given to the
    ledger (as a migration of a sealed memfd gives it the sender's) and faulted in whole: the
    ledger and the sender read through that view, the sweep gate keeps views of its own."""
    import mmap

    from migrator.precopy.source import SourceMemory
    region = target.region("shm")
    src = SourceMemory(target.pid, [region])
    assert src.mapped("shm") is None       # (the test memfd is not sealed: map it ourselves)
    view = mmap.mmap(src.memory_object("shm")[0], region.size, mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        with Tracked(target, no_syscall_writes={target.pid}) as t:
            t.t.use_views({"shm": view})
            assert sum(view[i * 4096] for i in range(64)) >= 0      # fault the view in
            yield t
    finally:
        view.close()
        src.close()


def test_holes_found_whatever_faults_the_senders_view(target):
    """A punched page leaves the gate's view: found even when the punch is made through the
    memfd's own descriptor (no inotify event) by a process vouched for (no write call to give
    it away), and even when the page is faulted back in at once."""
    with tracked_with_a_faulted_view(target) as t:
        assert t.collect() == ([], [])
        target.cmd("punch", first=20, n=2)
        target.cmd("read", region="shm", page=20)           # faulted back in by the guest
        assert t.collect() == ([20, 21], [])
        assert t.left_view() == ["2 of its pages left migrator's view of it (punched, removed, "
                                 "truncated or reclaimed): hashed alone"]


def test_a_writer_through_a_proc_path_gone_before_the_collect(target, others):
    """A process that reopens the memfd through /proc/PID/fd, writes it and exits between two
    collects holds it at no scan; the inotify watch on the object sees the write."""
    import subprocess
    import sys
    mapper_only(target, others)
    keeper_path = next(f"/proc/{os.getpid()}/fd/{fd}" for fd in map(int, os.listdir("/proc/self/fd"))
                       if _is_memfd_of(fd, target))
    with Tracked(target) as t:
        assert t.collect() == ([], [])
        subprocess.run([sys.executable, "-c", "import os, sys\n"
                        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
                        "os.pwrite(fd, b'written by a passer-by', 9 * 4096)\n"
                        "os.close(fd)\n", keeper_path], check=True)
        pages, why = t.collect()
        assert pages == [9]
        assert why == ["it was written through a file opened by path (inotify: a tmpfs path, "
                       "/proc/PID/fd or map_files)"], why


def _is_memfd_of(fd: int, target) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:test-shm") and \
            os.fstat(fd).st_ino == target.region("shm").inode
    except OSError:
        return False


def test_a_page_punched_again_after_it_left_migrators_view(target):
    """A page that left the gate's view (punched once, as a balloon frees guest RAM) and was
    written again through a tracked mapping is back in the view by the next collect: a second
    punch of it, faulted back in by a read (no write for any page table to see), is found too."""
    with tracked_with_a_faulted_view(target) as t:
        assert t.collect() == ([], [])
        target.cmd("punch", first=20, n=1)
        assert t.collect() == ([20], [])
        target.write("shm", [20])                   # the guest uses the page again
        assert t.collect() == ([20], [])
        target.cmd("punch", first=20, n=1)
        target.cmd("read", region="shm", page=20)   # faulted back in, as zeros
        # (the check faults page 20 back into the view before its scan, and hashes its 2 MiB
        # block: the zeros are found there)
        assert t.collect() == ([20], [])


def test_a_punched_page_faulted_back_by_a_read_without_a_view(target):
    """Without a view of the memfd (not sealed), a punched page that the guest reads back at
    once (a zero page: data again, so the data extents look unchanged) is found."""
    with Tracked(target, no_syscall_writes={target.pid}) as t:
        assert t.collect() == ([], [])
        target.cmd("punch", first=30, n=1)
        target.cmd("read", region="shm", page=30)
        assert t.collect() == ([30], [])


def test_a_mapper_new_at_the_final_collect_makes_it_sweep(target, others):
    """A process that maps the memfd after the last live collect and writes through it: the
    final collect's /proc scan finds it, registers nothing (the source is paused), and the
    ledger sweeps, with the reason; its write is reported."""
    with Tracked(target, no_syscall_writes={target.pid}) as t:
        assert t.collect() == ([], [])
        late = others()
        late.write("shm", [7])
        target.write("shm", [3])
        pages, why = t.collect(final=True)
        assert pages == [3, 7]
        assert why == [f"process {late.pid} maps it and is not write-protect tracked (found at the final "
                       f"collect (source paused): not injected); process {late.pid} opened it for "
                       "writing since the last collect"]
