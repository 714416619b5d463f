"""Reading the source's memory: the page reader the sender calls, and the populated pages that
round 0 sends.  Shared regions are read from the memory object itself (map_files: the page cache,
without touching the target's page tables); private regions through /proc/PID/mem."""

from __future__ import annotations

import errno
import os

from ..errors import MigratorError, TargetGoneError
from ..kernel.maps import Region, RegionKind
from ..kernel.native import PAGE_SIZE
from ..kernel.pagemap import PM_PRESENT, PM_SWAP, Pagemap
from ..kernel.shmem import data_extents, open_object
from ..tracking.pageset import PageSet


class SourceMemory:
    """Blocking reads of the tracked regions of a running (or paused) process."""

    def __init__(self, pid: int, regions: list[Region]):
        self.pid = pid
        self.regions = {r.name: r for r in regions}
        self._fds: dict[str, int] = {}
        try:
            self._mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TargetGoneError(f"process {pid} does not exist (or exited)") from None
        except PermissionError:
            raise MigratorError(f"cannot open /proc/{pid}/mem: permission denied (run as root)") from None
        for r in regions:
            if r.kind == RegionKind.SHARED:
                self._fds[r.name] = open_object(pid, r)

    def read(self, region_name: str, first_page: int, npages: int) -> bytes:
        """npages pages of a region from page first_page (bytes)."""
        r = self.regions[region_name]
        n = npages * PAGE_SIZE
        fd = self._fds.get(region_name)
        pos = r.offset + first_page * PAGE_SIZE if fd is not None else r.start + first_page * PAGE_SIZE
        if fd is None:
            fd = self._mem
        out = bytearray()
        while len(out) < n:
            try:
                chunk = os.pread(fd, n - len(out), pos + len(out))
            except OSError as e:
                if e.errno in (errno.EIO, errno.ESRCH) and not os.path.exists(f"/proc/{self.pid}"):
                    raise TargetGoneError(f"process {self.pid} exited") from None
                raise MigratorError(f"reading region {region_name} page {first_page}+{npages}: {e.strerror}") from None
            if not chunk:
                if fd != self._mem:             # past the end of the object: zeros
                    out += bytes(n - len(out))
                    break
                raise TargetGoneError(f"process {self.pid} exited while its memory was read")
            out += chunk
        return bytes(out)

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
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._mem >= 0:
            os.close(self._mem)
            self._mem = -1
