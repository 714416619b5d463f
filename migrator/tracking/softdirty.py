"""Soft-dirty tracker: clear_refs "4" and pagemap bit 55 (kernels with CONFIG_MEM_SOFT_DIRTY).

Reading the bits and clearing them are two steps (clear_refs acts on the whole process), so a
write between them would be lost for good.  The tracker therefore stops the target (SIGSTOP, until
/proc says it is stopped) for the read + clear of each collect, then lets it go, unless the caller
already holds it paused.  Cost: one pagemap read of the tracked range while paused.

Known losses (the kernel thread): a shmem page that is swapped out or zapped loses its PTE, so
its entry reads as none (no soft-dirty); after swap-in the bit is gone too; writes to shared memory
through other mappings or by pwrite never set it.  New VMAs come up all soft-dirty (false
positives, reported once).  Use it with the shmem ledger (the composite tracker) for shared memory.
"""

from __future__ import annotations

import os
import signal
import time

from ..errors import TargetGoneError, UnsupportedError
from ..kernel.maps import Region
from ..kernel.pagemap import PM_SOFT_DIRTY, Pagemap
from ..kernel.process import is_stopped, wait_stopped
from .base import DirtyPages, Tracker
from .pageset import PageSet

NO_SOFT_DIRTY = ("this kernel has no soft-dirty tracking (CONFIG_MEM_SOFT_DIRTY is not set: "
                 "pagemap bit 55 never sets after clear_refs); use --tracker wp or hash")


def decode_soft_dirty(entries: list[int] | bytes, npages: int) -> PageSet:
    """Pages whose pagemap entry has the soft-dirty bit, decoded in C.  entries: raw entries
    (ints, or the bytes of a pagemap read)."""
    from ..kernel.native import ffi, lib
    if isinstance(entries, (bytes, bytearray, memoryview)):
        arr = ffi.from_buffer("uint64_t[]", entries)
    else:
        arr = ffi.new("uint64_t[]", list(entries))
    s = PageSet(npages)
    lib.mg_pagemap_match(arr, npages, PM_SOFT_DIRTY, PM_SOFT_DIRTY, ffi.from_buffer(s.bits), 0)
    return s


def clear_soft_dirty(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("4")
    except FileNotFoundError:
        raise TargetGoneError(f"process {pid} exited") from None


class SoftDirtyTracker(Tracker):
    name = "soft-dirty"

    def __init__(self, pid: int, regions: list[Region], *, supported: bool | None = None,
                 freeze: bool = True):
        super().__init__(pid, regions)
        if supported is None:
            from ..kernel.probe import probe_soft_dirty
            supported = probe_soft_dirty().supported
        if not supported:
            raise UnsupportedError(NO_SOFT_DIRTY)
        self.freeze = freeze
        self.pagemap: Pagemap | None = None

    def begin(self) -> None:
        self.pagemap = Pagemap(self.pid)
        clear_soft_dirty(self.pid)

    def collect(self, final: bool = False) -> DirtyPages:
        assert self.pagemap is not None, "collect() before begin()"
        t0 = time.perf_counter()
        out = DirtyPages(pages={})
        stopped = False
        if self.freeze and not is_stopped(self.pid):     # already paused by the caller: keep it so
            try:
                os.kill(self.pid, signal.SIGSTOP)
            except ProcessLookupError:
                raise TargetGoneError(f"process {self.pid} exited") from None
            stopped = True
            wait_stopped(self.pid)
        try:
            for r in self.regions:
                s = PageSet(r.npages)
                self.pagemap.match(r.start, r.npages, PM_SOFT_DIRTY, PM_SOFT_DIRTY, s.bits)
                out.pages[r.name] = s
            clear_soft_dirty(self.pid)
        finally:
            if stopped:
                try:
                    os.kill(self.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        out.cost_s = time.perf_counter() - t0
        return self._account(out)

    def end(self) -> None:
        if self.pagemap is not None:
            self.pagemap.close()
            self.pagemap = None
