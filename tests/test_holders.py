"""The /proc pass that finds who holds a shared memory object (kernel/holders.py, csrc/procscan.c),
on real processes: the exact mappings each holder has (the maps lines the C pass hands back), a
holder by descriptor only, an aio ring, the fallback when the lines do not fit, and processes
that hold nothing."""

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import require
import migrator.kernel.holders as holders_mod
from migrator.kernel.holders import scan_holders

PAGE = 4096

# a process that maps the memfd (descriptor argv[2]) at two offsets, or only holds it, or sets up an aio ring;
# it says "ready" and waits for stdin to close
_HOLDER = textwrap.dedent("""
    import ctypes, mmap, os, sys
    what, fd = sys.argv[1], int(sys.argv[2])
    keep = []
    if what == "maps":
        keep.append(mmap.mmap(fd, 4 * 4096, mmap.MAP_SHARED, offset=0))
        keep.append(mmap.mmap(fd, 2 * 4096, mmap.MAP_SHARED, mmap.PROT_READ, offset=8 * 4096))
        os.close(fd)
    elif what == "aio":
        keep.append(mmap.mmap(fd, 4096, mmap.MAP_SHARED, offset=0))
        os.close(fd)
        ctx = ctypes.c_ulong(0)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(206, 8, ctypes.byref(ctx)) != 0:      # io_setup
            raise OSError(ctypes.get_errno(), "io_setup")
    print("ready", flush=True)
    sys.stdin.read()
""")


@pytest.fixture
def memfd():
    fd = os.memfd_create("holders-test")
    os.ftruncate(fd, 16 * PAGE)
    st = os.fstat(fd)
    yield fd, (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    os.close(fd)


@pytest.fixture
def holder(memfd):
    started = []

    def start(what: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", _HOLDER, what, str(memfd[0])],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(memfd[0],))
        started.append(p)
        assert p.stdout.readline() == b"ready\n"
        return p
    yield start
    for p in started:
        p.stdin.close()
        p.wait(10)


def test_every_mapping_of_a_holder_and_a_holder_by_descriptor_only(memfd, holder):
    fd, key = memfd
    m, h = holder("maps"), holder("hold")
    scan = scan_holders({key}, skip={os.getpid()})
    assert set(scan.holders) == {m.pid, h.pid}
    maps = scan.holders[m.pid].maps
    assert [(x.offset, x.end - x.start, x.perms[:2]) for x in maps] == [(0, 4 * PAGE, "rw"), (8 * PAGE, 2 * PAGE, "r-")]
    assert scan.holders[m.pid].writable == {key}   # (Python's mmap keeps a dup of the descriptor)
    assert scan.holders[h.pid].maps == [] and scan.holders[h.pid].writable == {key}
    assert {m.pid, h.pid, os.getpid(), 1} <= scan.pids
    # kernel threads (kthreadd, pid 2) are seen, and hold nothing
    assert 2 in scan.pids and 2 not in scan.holders


def test_an_aio_ring_is_named(memfd, holder):
    _, key = memfd
    a, m = holder("aio"), holder("maps")
    scan = scan_holders({key}, skip={os.getpid()})
    assert scan.holders[a.pid].async_io == "aio"
    assert scan.holders[m.pid].async_io == ""


def test_lines_that_do_not_fit_are_read_again(memfd, holder, monkeypatch):
    """With no room for the maps lines, the holders' maps are read by the Python side: the same
    result."""
    _, key = memfd
    m, a = holder("maps"), holder("aio")
    full = scan_holders({key}, skip={os.getpid()})
    monkeypatch.setattr(holders_mod, "TEXT_ROOM", 1)
    tight = scan_holders({key}, skip={os.getpid()})
    for pid in (m.pid, a.pid):
        assert tight.holders[pid].maps == full.holders[pid].maps and tight.holders[pid].maps
        assert tight.holders[pid].async_io == full.holders[pid].async_io


def _syscw() -> int:
    with open("/proc/self/io", "rb") as f:
        return int(next(line for line in f.read().splitlines() if line.startswith(b"syscw:")).split()[1])


def test_which_write_calls_move_syscw(memfd):
    """The sweep gate's condition 2 rests on /proc/PID/io syscw counting every system call that
    can write an object by descriptor: each of these moves it by exactly one; fallocate does
    not, which is why holes are found another way (the view holder)."""
    fd, _ = memfd
    sfd = os.memfd_create("holders-test-src")
    os.write(sfd, b"x" * PAGE)
    try:
        calls = {
            "write": lambda: os.write(fd, b"a"),
            "pwrite": lambda: os.pwrite(fd, b"b", PAGE),
            "writev": lambda: os.writev(fd, [b"c", b"d"]),
            "pwritev": lambda: os.pwritev(fd, [b"e"], 2 * PAGE),
            "sendfile": lambda: os.sendfile(fd, sfd, 0, PAGE),
            "copy_file_range": lambda: os.copy_file_range(sfd, fd, PAGE, 0, 3 * PAGE),
        }
        moved = {}
        for name, call in calls.items():
            before = _syscw()
            call()
            moved[name] = _syscw() - before
        assert moved == {name: 1 for name in calls}
        before = _syscw()
        os.posix_fallocate(fd, 0, PAGE)
        assert _syscw() - before == 0
    finally:
        os.close(sfd)


def test_this_process_is_read_as_any_other(memfd, holder):
    """migrator's own process (a holder: the ledger's descriptors, the sender's views) is read
    directly (fstat, F_GETFL), with the same result as through /proc for another process."""
    import ctypes
    fd, key = memfd
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    h = holder("hold")
    ring = -1
    try:
        mine = scan_holders({key}).holders[os.getpid()]
        assert mine.writable == {key} and mine.async_io == ""
        assert holders_mod._fd_details(str(h.pid), {key}) == ({key}, "", 0)
        libc = ctypes.CDLL(None, use_errno=True)
        ring = libc.syscall(425, 4, ctypes.create_string_buffer(120))       # io_uring_setup
        require(ring >= 0, f"io_uring_setup: {os.strerror(ctypes.get_errno())}")
        assert scan_holders({key}).holders[os.getpid()].async_io == "io_uring"
    finally:
        os.close(ro)
        if ring >= 0:
            os.close(ring)
