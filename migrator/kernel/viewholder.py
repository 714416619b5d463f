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

The holder is this module run as a program (`python -m migrator.kernel.viewholder`): one command
a line on stdin, one reply a line on stdout; it ends at the end of its input, so with migrator
however migrator ends (PR_SET_PDEATHSIG would not do: it fires when the parent *thread* ends, and
the holder is started from a worker thread).  Its page tables are read from outside
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
                [sys.executable, "-m", "migrator.kernel.viewholder", str(os.getpid())],
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


def _serve(parent: int) -> None:
    """The holder's loop (in the holder process), until the end of its input."""
    import mmap

    from .native import ffi, lib
    if os.getppid() != parent:          # (the parent is gone already)
        return
    views = []
    nohuge = getattr(mmap, "MADV_NOHUGEPAGE", 15)
    for line in sys.stdin:
        cmd, *args = line.split()
        try:
            if cmd == "ping":
                reply = "ok"
            elif cmd == "map":
                fd, offset, length = map(int, args)
                v = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ, offset=offset)
                try:
                    v.madvise(nohuge)     # (no collapse into huge pages behind our count)
                except OSError:
                    pass
                views.append(v)
                with ffi.from_buffer(v) as c:
                    reply = f"ok {int(ffi.cast('uintptr_t', c))}"
            elif cmd == "populate":
                nums = list(map(int, args))
                failed = 0
                for addr, n in zip(nums[::2], nums[1::2]):
                    if lib.mgk_populate(ffi.cast("uint8_t *", addr), n, 0) < 0:
                        failed += 1
                reply = f"ok {failed}"
            else:
                reply = f"error unknown command {cmd!r}"
        except (OSError, ValueError) as e:
            reply = f"error {cmd}: {e}"
        sys.stdout.write(reply + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
