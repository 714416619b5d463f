"""Reading the source's memory: the page reader the sender calls, and the populated pages that
round 0 sends.  Shared regions are read from the memory object itself (map_files: the page cache,
without touching the target's page tables); private regions through /proc/PID/mem."""

from __future__ import annotations

import fcntl
import mmap
import os
import threading

from ..errors import MigratorError, TargetGoneError
from ..kernel.maps import Region, RegionKind
from ..kernel.memio import read_runs
from ..kernel.native import PAGE_SIZE
from ..kernel.process import open_proc
from ..kernel.pagemap import PM_PRESENT, PM_SWAP, Pagemap
from ..kernel.shmem import data_extents, open_object
from ..tracking.pageset import PageSet
from ..transport.digest import digest_of_hashes, fd_page_hashes


class SourceMemory:
    """Blocking reads of the tracked regions of a running (or paused) process."""

    def __init__(self, pid: int, regions: list[Region], maps: list | None = None):
        self.pid = pid
        self.regions = {r.name: r for r in regions}
        self._fds: dict[str, int] = {}
        self._maps: dict[str, mmap.mmap | None] = {}
        self._lock = threading.Lock()
        self._mem = open_proc(pid, "mem", MigratorError, " (run as root)")
        for r in regions:
            if r.kind == RegionKind.SHARED:
                self._fds[r.name] = open_object(pid, r, maps)

    def _where(self, region_name: str) -> tuple[int, int, bool]:
        """(fd, byte position of page 0, is the memory object itself) for a region."""
        r = self.regions[region_name]
        fd = self._fds.get(region_name)
        if fd is not None:
            return fd, r.offset, True
        return self._mem, r.start, False

    def _failed(self, region_name: str, err: OSError) -> MigratorError:
        if not os.path.exists(f"/proc/{self.pid}/mem"):
            return TargetGoneError(f"process {self.pid} exited")
        return MigratorError(f"reading region {region_name}: {err.strerror}")

    def read_into(self, region_name: str, runs: list[tuple[int, int]], buf,
                  page_size: int = PAGE_SIZE) -> None:
        """Read the pages of runs [(first_page, npages), ...] of a region into buf, one after
        the other, in one C call."""
        if page_size != PAGE_SIZE:
            raise ValueError(f"a process's memory is read in pages of {PAGE_SIZE} bytes, not {page_size}")
        fd, base, is_object = self._where(region_name)
        total = sum(n for _, n in runs)
        if len(buf) < total * PAGE_SIZE:
            raise ValueError(f"buffer of {len(buf)} bytes for {total} pages")
        try:
            read_runs(fd, base, runs, buf, zero_eof=is_object, pid=self.pid)
        except OSError as e:
            raise self._failed(region_name, e) from None

    def read_runs(self, region_name: str, runs: list[tuple[int, int]]) -> bytearray:
        """The pages of runs [(first_page, npages), ...] of a region, one after the other."""
        out = bytearray(sum(n for _, n in runs) * PAGE_SIZE)
        self.read_into(region_name, runs, out)
        return out

    def mapped(self, region_name: str) -> mmap.mmap | None:
        """The region's memory object mapped read-only into this process, so the sender can find
        zero pages in place and copy only the others; None for private memory, and for an object
        not sealed against shrinking (a shrink under a mapping would kill us with SIGBUS)."""
        with self._lock:      # producer threads may ask at once
            if region_name not in self._maps:
                self._maps[region_name] = self._map(region_name)
            return self._maps[region_name]

    def memory_object(self, region_name: str) -> tuple[int, int] | None:
        """(fd, byte offset of page 0) of a shared region's memory object, whose holes the
        sender packs as zeros without reading; None for private memory."""
        fd = self._fds.get(region_name)
        return None if fd is None else (fd, self.regions[region_name].offset)

    def _map(self, region_name: str) -> mmap.mmap | None:
        fd = self._fds.get(region_name)
        view = None
        if fd is not None:
            r = self.regions[region_name]
            try:
                sealed = fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
                if sealed and os.fstat(fd).st_size >= r.offset + r.size:
                    view = mmap.mmap(fd, r.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=r.offset)
            except OSError:     # not a memfd (no seals), or cannot map: read with pread
                view = None
        return view

    def read(self, region_name: str, first_page: int, npages: int) -> bytearray:
        """npages pages of a region from page first_page."""
        return self.read_runs(region_name, [(first_page, npages)])

    def page_hashes(self, region_name: str) -> bytes:
        """The XXH3-64 of every page of the region as it is now, read in C (8 bytes a page)."""
        r = self.regions[region_name]
        fd, base, _ = self._where(region_name)
        try:
            return bytes(fd_page_hashes(fd, base, r.npages, PAGE_SIZE))
        except OSError as e:
            raise self._failed(region_name, e) from None

    def digest(self, region_name: str) -> str:
        """The region's digest as migrator.transport defines it (XXH3-128 over per-page XXH3-64
        hashes), read now (a migration's digests come from what was sent: precopy/sent.py)."""
        return digest_of_hashes(self.page_hashes(region_name))

    def populated(self, region: Region) -> PageSet:
        """The pages of region that hold data: allocated object pages (swapped ones included) for
        shared memory; present or swapped pages for private memory."""
        s = PageSet(region.npages)
        fd = self._fds.get(region.name)
        if fd is not None:
            for a, b in data_extents(fd, region.offset, region.offset + region.size):
                s.add_range((a - region.offset) // PAGE_SIZE, (b - region.offset + PAGE_SIZE - 1) // PAGE_SIZE)
            return s
        with Pagemap(self.pid) as pm:
            pm.match(region.start, region.npages, PM_PRESENT, PM_PRESENT, s.bits)
            pm.match(region.start, region.npages, PM_SWAP, PM_SWAP, s.bits)
        return s

    def close(self) -> None:
        for m in self._maps.values():
            if m is not None:
                try:
                    m.close()
                except BufferError:   # a batch of a failed send still holds a view of it:
                    pass              # unmapped when that goes (garbage collection)
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._mem >= 0:
            os.close(self._mem)
            self._mem = -1
