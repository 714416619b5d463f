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
from ..kernel.maps import Region, read_maps
from ..kernel.native import PAGE_SIZE
from ..kernel.pagemap import (DEFAULT_VEC_LEN, PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC,
                              PM_SCAN_WP_MATCHING, Pagemap)
from ..kernel.uffd import Userfaultfd
from .base import DirtyPages, Tracker
from .layout import diff_layout, pages_of, vma_identities
from .pageset import PageSet


class WriteProtectTracker(Tracker):
    name = "wp"

    def __init__(self, pid: int, regions: list[Region], *, uffd_fd: int | None = None,
                 vec_len: int = DEFAULT_VEC_LEN, check_layout: bool = True):
        super().__init__(pid, regions)
        self.uffd_fd = uffd_fd
        self.vec_len = vec_len
        self.check_layout = check_layout
        self.uffd: Userfaultfd | None = None
        self.pagemap: Pagemap | None = None
        self._layout: dict[str, dict] = {}

    def begin(self) -> None:
        self.uffd = Userfaultfd.take(self.pid, self.uffd_fd)
        try:
            self.uffd.api()
            self.pagemap = Pagemap(self.pid, self.vec_len)
            maps = read_maps(self.pid)
            for r in self.regions:
                self._arm(r.start, r.end, r.name)
                self._layout[r.name] = vma_identities(maps, r)
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
            raise
        self.uffd.writeprotect(start, end - start, True)

    def collect(self) -> DirtyPages:
        assert self.pagemap is not None, "collect() before begin()"
        t0 = time.perf_counter()
        out = DirtyPages(pages={})
        maps = read_maps(self.pid) if self.check_layout else None
        for r in self.regions:
            bits = bytearray((r.npages + 7) // 8)
            extra: list[tuple[int, int]] = []
            if maps is not None:
                now = vma_identities(maps, r)
                if now.keys() != self._layout[r.name].keys():
                    new_ranges, events = diff_layout(r, self._layout[r.name], now)
                    out.events.extend(events)
                    for a, b in new_ranges:
                        self._arm(a, b, r.name)       # track the new mapping from now on
                    extra = pages_of(r, new_ranges, PAGE_SIZE)
                    self._layout[r.name] = now
            self.pagemap.scan(r.start, r.end, bits,
                              flags=PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                              category_mask=PAGE_IS_WRITTEN, return_mask=PAGE_IS_WRITTEN)
            s = PageSet(r.npages, bits)
            for a, b in extra:
                s.add_range(a, b)
            out.pages[r.name] = s
        out.cost_s = time.perf_counter() - t0
        return self._account(out)

    def end(self) -> None:
        if self.uffd is not None:
            for r in self.regions:
                try:
                    self.uffd.writeprotect(r.start, r.size, False)
                    self.uffd.unregister(r.start, r.size)
                except OSError:
                    pass            # target gone or region unmapped: nothing left to disarm
            self.uffd.close()
            self.uffd = None
        if self.pagemap is not None:
            self.pagemap.close()
            self.pagemap = None
