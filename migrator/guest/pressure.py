"""Swap pressure applied from outside the guest, on demand: push a range of one of its regions
out with process_madvise(MADV_PAGEOUT), as the pager writer does on a timer.  Used by scenario
events ("page out the shared RAM 0.5 s into the migration", "after each round")."""

from __future__ import annotations

import os

from ..errors import TargetGoneError, UsageError
from ..kernel.resources import Closing, close_fd
from ._native import PAGE_SIZE, check, ffi, lib
from .launcher import Guest


class PageOut(Closing):
    """process_madvise(MADV_PAGEOUT) into one guest; holds a pidfd for the guest's life."""

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        try:
            self._pidfd = os.pidfd_open(guest.pid)
        except ProcessLookupError:
            raise TargetGoneError(f"guest {guest.pid} is gone") from None

    def range_of(self, region: str, offset: int = 0, length: int = 0) -> tuple[int, int]:
        """(address, bytes) of [offset, offset + length) in a region (length 0: to the end of
        its populated part), page aligned."""
        r = self.guest.region(region)
        off = offset // PAGE_SIZE * PAGE_SIZE
        end = r.populated if not length else off + -(-length // PAGE_SIZE) * PAGE_SIZE
        if off >= end or end > r.size:
            raise UsageError(f"pageout range {region}:{offset}:{length} is outside the region "
                             f"({r.size} bytes, {r.populated} populated)")
        return r.start + off, end - off

    def __call__(self, region: str, offset: int = 0, length: int = 0) -> int:
        """Advise the range out; returns the bytes the kernel accepted (pages still mapped by
        another process, e.g. a vhost writer, are skipped by the kernel)."""
        addr, n = self.range_of(region, offset, length)
        addrs = ffi.new("uint64_t[]", [addr])
        lens = ffi.new("uint64_t[]", [n])
        return check(lib.mg_pageout(self._pidfd, addrs, lens, 1), "process_madvise", pid=self.guest.pid)

    def close(self) -> None:
        self._pidfd = close_fd(self._pidfd)
