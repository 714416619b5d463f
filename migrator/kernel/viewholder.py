"""A process that holds read-only views of shared memory objects, and nothing else.

The sweep gate (tracking/sweepgate.py) finds pages dropped from a shmem object without a write
(punched, removed, truncated, reclaimed) as pages absent from a view of the object: the kernel
unmaps such a page from every mapping.  Kept in a process of its own, the view has two more
properties that migrator's own address space cannot give:
- nothing else faults pages into it (migrator's sender and ledger read their own views), and
- the process's RssShmem (/proc/PID/status) counts exactly the pages present in it, so a check
  whose count did not move since the previous one needs no walk of the view's page tables: no
  page left it (RssShmem moves with every zap, at once, where the kernel sums its per-CPU RSS
  counters when it reports them: probe_rss_exact() checks that, else every check walks).

The holder is a small standard-library program (HOLDER_PROGRAM, run by `python -I -S -c`): one
command a line on stdin, one reply a line on stdout; it ends at the end of its input, so with
migrator however migrator ends (PR_SET_PDEATHSIG would not do: it fires when the parent *thread*
ends, and the holder is started from a worker thread).  Its page tables are read from outside
(/proc/PID/pagemap, PAGEMAP_SCAN).
"""

from __future__ import annotations

import os
import subprocess
import sys

from ..errors import MigratorError
from .resources import Closing

PROBE_PAGES = 32
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2


def _punch(fd: int, offset: int, length: int) -> None:
    """A hole punch (fallocate) of [offset, offset + length) of fd."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class ViewHolder(Closing):
    """The holder process.  fds: descriptors of the objects to map (passed to it)."""

    def __init__(self, fds: list[int]):
        self.fds = list(fds)
        probe = os.memfd_create("migrator-rss-probe", os.MFD_CLOEXEC)
        try:
            self._p = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", HOLDER_PROGRAM, HOLDER_TAG, str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=[*self.fds, probe], text=True, bufsize=1)
            self.pid = self._p.pid
            self._call("ping")
            self.rss_exact = self._probe_rss(probe)
        except BaseException:
            if hasattr(self, "_p"):
                self.close()
            raise
        finally:
            os.close(probe)

    def _probe_rss(self, fd: int, npages: int = PROBE_PAGES) -> bool:
        """Whether the holder's RssShmem drops by exactly one page at once when a page of a
        view is punched, from either CPU (the kernel sums its per-CPU counters when it reports
        them: 6.18 does; where it reads only the shared count, a change can hide in a CPU's
        batch).  The probe object's pages are all punched again afterwards."""
        ps = os.sysconf("SC_PAGE_SIZE")
        os.ftruncate(fd, npages * ps)
        for p in range(npages):
            os.pwrite(fd, b"\1", p * ps)
        addr = self.map(fd, 0, npages * ps)
        base = self.rss_shmem_pages()
        if self.populate([(addr, npages * ps)]) or self.rss_shmem_pages() != base + npages:
            return False
        cpus = sorted(os.sched_getaffinity(0))
        exact = True
        try:
            for p in range(npages):
                os.sched_setaffinity(0, {cpus[p % len(cpus)]})
                _punch(fd, p * ps, ps)
                if self.rss_shmem_pages() != base + npages - p - 1:
                    exact = False
                    break
        finally:
            os.sched_setaffinity(0, cpus)
            _punch(fd, 0, npages * ps)
        return exact and self.rss_shmem_pages() == base

    def _call(self, *args: object) -> list[str]:
        p = self._p
        if p.stdin is None or p.stdout is None:
            raise MigratorError("the view holder is closed")
        try:
            p.stdin.write(" ".join(map(str, args)) + "\n")
            p.stdin.flush()
            line = p.stdout.readline()
        except (BrokenPipeError, ValueError):
            line = ""
        if not line:
            err = p.stderr.read() if p.stderr is not None and p.poll() is not None else ""
            raise MigratorError(f"the view holder (process {self.pid}) ended: {err.strip()[-300:]}")
        out = line.split()
        if out[0] != "ok":
            raise MigratorError(f"the view holder: {line.strip()}")
        return out[1:]

    def map(self, fd: int, offset: int, length: int) -> int:
        """Map [offset, offset + length) of object fd read-only in the holder; its address."""
        return int(self._call("map", fd, offset, length)[0])

    def populate(self, ranges: list[tuple[int, int]]) -> int:
        """Fault in (MADV_POPULATE_READ) the holder's pages of (address, length) ranges; how
        many failed (EFAULT past a truncation: they stay absent)."""
        failed = 0
        for i in range(0, len(ranges), 256):
            part = ranges[i:i + 256]
            failed += int(self._call("populate", *(x for r in part for x in r))[0])
        return failed

    def rss_shmem_pages(self) -> int:
        """The holder's RssShmem, in pages: the pages present in its views."""
        try:
            with open(f"/proc/{self.pid}/status", "rb") as f:
                for line in f.read().splitlines():
                    if line.startswith(b"RssShmem:"):
                        return int(line.split()[1]) * 1024 // os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            pass
        raise MigratorError(f"cannot read RssShmem of the view holder (process {self.pid})")

    def close(self) -> None:
        p = self._p
        if p.poll() is None:
            try:
                if p.stdin is not None:
                    p.stdin.close()
                p.wait(timeout=2)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                p.kill()
                p.wait()
        for s in (p.stdin, p.stdout, p.stderr):
            if s is not None and not s.closed:
                try:
                    s.close()
                except OSError:
                    pass


# The holder's program, run as `python -I -S -c HOLDER_PROGRAM migrator-view-holder PARENT_PID`:
# standard library only (no site, no migrator import), so it starts in ~15 ms, not ~45.  Commands:
# "ping"; "map FD OFFSET LENGTH" -> the view's address; "populate ADDR LEN ..." -> how many ranges
# failed (MADV_POPULATE_READ).  It ends at the end of its input.
HOLDER_PROGRAM = r"""
import ctypes, os, sys
if os.getppid() != int(sys.argv[2]):
    sys.exit(0)
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PROT_READ, MAP_SHARED, MADV_NOHUGEPAGE, MADV_POPULATE_READ = 1, 1, 15, 22
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "ping":
        reply = "ok"
    elif cmd == "map" and len(args) == 3:
        fd, offset, length = map(int, args)
        addr = libc.mmap(None, length, PROT_READ, MAP_SHARED, fd, offset)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            reply = "error map: " + os.strerror(ctypes.get_errno())
        else:
            libc.madvise(addr, length, MADV_NOHUGEPAGE)     # (no collapse behind the count)
            reply = "ok %d" % addr
    elif cmd == "populate":
        nums = [int(x) for x in args]
        failed = sum(libc.madvise(a, n, MADV_POPULATE_READ) != 0 for a, n in zip(nums[::2], nums[1::2]))
        reply = "ok %d" % failed
    else:
        reply = "error unknown command %r" % line.strip()
    sys.stdout.write(reply + "\n")
    sys.stdout.flush()
"""
HOLDER_TAG = "migrator-view-holder"      # in the holder's command line (bench faults looks for it)
