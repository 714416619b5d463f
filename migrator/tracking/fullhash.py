"""Full-hash tracker: content hashes of a process's memory read with process_vm_readv.

For a target that cannot be write-protected (it does not cooperate by creating a userfaultfd) on
a kernel without soft-dirty.  Exact by content for every write path, at the price of reading all
tracked memory every collect (8 bytes of state a page).  Reading faults pages in (swapped-out
private pages come back), so it is the last resort for private memory.
"""

from __future__ import annotations

import errno
import time

from ..errors import TargetGoneError
from ..kernel.maps import Region, read_maps
from ..kernel.native import PAGE_SIZE, check, ffi, lib
from .base import DirtyPages, Tracker
from .layout import unmapped_events
from .pageset import PageSet

READ_BUFFER = 256 * 1024


class FullHashTracker(Tracker):
    name = "hash"

    def __init__(self, pid: int, regions: list[Region]):
        super().__init__(pid, regions)
        self._hashes = {r.name: ffi.new("uint64_t[]", max(r.npages, 1)) for r in regions}
        self._buf = ffi.new("uint8_t[]", READ_BUFFER)
        self.unreadable_pages = 0

    def _sweep(self, r: Region, bitmap) -> int:
        bad = ffi.new("uint64_t *")
        try:
            n = check(lib.mg_sweep_remote(self.pid, r.start, r.npages, PAGE_SIZE, self._buf,
                                          READ_BUFFER, self._hashes[r.name], bitmap, 0, bad),
                      "process_vm_readv", pid=self.pid)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise TargetGoneError(f"process {self.pid} exited") from None
            raise
        self.unreadable_pages += bad[0]
        return n

    def begin(self) -> None:
        read_maps(self.pid)             # fails clearly if the process is gone
        for r in self.regions:
            self._sweep(r, ffi.NULL)

    def collect(self, final: bool = False) -> DirtyPages:
        t0 = time.perf_counter()
        out = DirtyPages(pages={})
        maps = read_maps(self.pid)
        for r in self.regions:
            s = PageSet(r.npages)
            out.events.extend(unmapped_events(r, maps))   # new mappings show up as content
            self._sweep(r, ffi.from_buffer(s.bits))
            out.pages[r.name] = s
        out.cost_s = time.perf_counter() - t0
        return self._account(out)

    def memory_bytes(self) -> int:
        return sum(r.npages * 8 for r in self.regions) + READ_BUFFER
