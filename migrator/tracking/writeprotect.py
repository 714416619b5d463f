"""Write-protect tracker: userfaultfd async write-protect + PAGEMAP_SCAN.

begin() registers every region with the target's userfaultfd (taken with pidfd_getfd) and
write-protects it, unpopulated pages included (UFFD_FEATURE_WP_UNPOPULATED).  A write then lifts
the protection of its page in the kernel, without any fault reaching us (WP_ASYNC).  collect() is
one PAGEMAP_SCAN walk per region with PM_SCAN_WP_MATCHING: it reports the pages whose protection
was lifted (PAGE_IS_WRITTEN) and re-protects them in the same kernel step, so no write between
report and re-arm can be lost.

Sees: every write through the target's own page tables, anonymous pages dropped by MADV_DONTNEED
(they now read as zeros), and - thanks to PTE markers - shmem pages written before a swap-out.
Misses: writes to shared memory through any other mapping or by write/pwrite/fallocate, which
never touch the target's PTEs: the shmem ledger covers those.
"""

from __future__ import annotations

import errno
import time

from ..errors import UnsupportedError
from ..kernel.maps import Region
from ..kernel.native import PAGE_SIZE
from ..kernel.pagemap import (DEFAULT_VEC_LEN, PAGE_IS_WPALLOWED, PAGE_IS_WRITTEN,
                              PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING, Pagemap)
from ..kernel.process import StatReader
from ..kernel.resources import closed
from ..kernel.uffd import Userfaultfd
from .base import DirtyPages, RegionEvent, Tracker, TrackerStatistics
from .layout import coverage_gaps, pages_of
from .pageset import PageSet
from .uffds import UffdPool


class WriteProtectTracker(Tracker):
    name = "wp"

    def __init__(self, pid: int, regions: list[Region], *, uffd_fd: int | None = None,
                 vec_len: int = DEFAULT_VEC_LEN, pool: UffdPool | None = None):
        """uffd_fd: the target's own userfaultfd (found in /proc/PID/fd when None).  pool: where
        the target's uffd comes from instead (its own or an injected one; the pool owns it)."""
        super().__init__(pid, regions)
        self.uffd_fd = uffd_fd
        self.vec_len = vec_len
        self.pool = pool
        self.uffd: Userfaultfd | None = None
        self.pagemap: Pagemap | None = None
        self._vsize = -1
        self._stat: StatReader | None = None
        self.layout_checks = 0

    def begin(self) -> None:
        if self.pool is not None:
            self.uffd = self.pool.get(self.pid)
        else:
            self.uffd = Userfaultfd.take(self.pid, self.uffd_fd)
        try:
            if self.pool is None:
                self.uffd.api()
            self.pagemap = Pagemap(self.pid, self.vec_len)
            self._stat = StatReader(self.pid)
            self._vsize = self._stat.vsize()
            for r in self.regions:
                self._arm(r.start, r.end, r.name)
        except BaseException:
            self.end()
            raise

    def _arm(self, start: int, end: int, name: str) -> None:
        assert self.uffd is not None
        try:
            self.uffd.register_wp(start, end - start)
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise UnsupportedError(
                    f"region {name}: userfaultfd write-protect cannot register {start:#x}-{end:#x} "
                    "(mapping type not supported for WP on this kernel)") from None
            if e.errno == errno.EBUSY:
                raise UnsupportedError(
                    f"region {name}: {start:#x}-{end:#x} is registered with another userfaultfd "
                    "of the process (e.g. QEMU's postcopy)") from None
            raise
        self.uffd.writeprotect(start, end - start, True)

    def _check_layout(self, r: Region, dirty: PageSet, events: list[RegionEvent]) -> None:
        """Find the parts of r that are unmapped (event) or mapped by a VMA not registered with
        our userfaultfd (a new mapping: register it, report all its pages)."""
        assert self.pagemap is not None
        self.layout_checks += 1
        covered, fresh = [], []
        pos = r.start
        while pos < r.end:
            found, walk_end = self.pagemap.scan_regions(pos, r.end, return_mask=PAGE_IS_WPALLOWED)
            for a, b, cat in found:
                covered.append((a, b))
                if not cat & PAGE_IS_WPALLOWED:
                    fresh.append((a, b))
            if walk_end <= pos:
                break
            pos = walk_end
        for a, b in coverage_gaps(r, covered):
            events.append(RegionEvent(r.name, "unmapped", f"{a:#x}-{b:#x} is no longer mapped"))
        for a, b in fresh:
            events.append(RegionEvent(r.name, "remapped",
                                      f"new mapping at {a:#x}-{b:#x}: all its pages reported"))
            self._arm(a, b, r.name)
        for a, b in pages_of(r, fresh, PAGE_SIZE):
            dirty.add_range(a, b)

    def _scan(self, r: Region, s: PageSet) -> None:
        assert self.pagemap is not None
        self.pagemap.scan(r.start, r.end, s.bits, flags=PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                          category_mask=PAGE_IS_WRITTEN, return_mask=PAGE_IS_WRITTEN)

    def collect(self, final: bool = False) -> DirtyPages:
        """Pages written since the previous collect.  Mapping changes are looked for when the
        target's address space size changed, when the scan meets an unregistered mapping, and
        always when final is true."""
        assert self.pagemap is not None, "collect() before begin()"
        t0 = time.perf_counter()
        out = DirtyPages(pages={})
        assert self._stat is not None
        size_now = self._stat.vsize()
        layout_changed = final or size_now != self._vsize
        self._vsize = size_now
        for r in self.regions:
            s = PageSet(r.npages)
            if layout_changed:
                self._check_layout(r, s, out.events)
            try:
                self._scan(r, s)
            except OSError as e:
                if e.errno != errno.EPERM:
                    raise
                # A VMA in the range is not registered: a new mapping replaced part of the
                # region.  The failed walk may already have re-protected written pages before
                # it stopped, so their report is lost: report the whole region instead.
                s.add_range(0, r.npages)
                out.events.append(RegionEvent(r.name, "remapped",
                                              "a mapping under the region changed: whole region reported"))
                self._check_layout(r, s, out.events)
                self._scan(r, s)
            out.pages[r.name] = s
        out.cost_s = time.perf_counter() - t0
        return self._account(out)

    def statistics(self) -> TrackerStatistics:
        base = super().statistics()
        origin = self.pool.origins.get(self.pid) if self.pool is not None else None
        detail = origin.detail if origin is not None else "its own userfaultfd"
        return TrackerStatistics(**{**base.__dict__, "detail": detail})

    def end(self) -> None:
        if self.uffd is not None:
            for r in self.regions:
                try:
                    self.uffd.writeprotect(r.start, r.size, False)
                    self.uffd.unregister(r.start, r.size)
                except OSError:
                    pass            # target gone or region unmapped: nothing left to disarm
            if self.pool is None:
                self.uffd.close()
            self.uffd = None
        self.pagemap = closed(self.pagemap)
        self._stat = closed(self._stat)
