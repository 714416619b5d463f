"""/proc/PID/pagemap: 8-byte entries per page, and the PAGEMAP_SCAN ioctl (Linux 6.7+).

Constants are defined here because the distribution's linux-libc-dev headers may predate them.
"""

from __future__ import annotations

import errno
import os
import threading

from ..errors import TargetGoneError
from .native import PAGE_SIZE, check, ffi, lib
from .process import open_proc
from .resources import Closing, close_fd

# pagemap entry bits
PM_SOFT_DIRTY = 1 << 55
PM_EXCLUSIVE = 1 << 56
PM_UFFD_WP = 1 << 57
PM_GUARD = 1 << 58
PM_FILE = 1 << 61
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63

# PAGEMAP_SCAN flags and categories
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7

DEFAULT_VEC_LEN = 4096          # page_region entries per ioctl (96 KiB of vec)
_READ_WINDOW = 65536            # pagemap entries per pread (512 KiB)


class Pagemap(Closing):
    """An open /proc/PID/pagemap.  Close it (or use `with`) when done."""

    def __init__(self, pid: int, vec_len: int = DEFAULT_VEC_LEN):
        self.pid = pid
        self.fd = open_proc(pid, "pagemap")
        self.vec_len = vec_len
        self._vec = ffi.new("struct mg_page_region[]", vec_len)
        self._buf = ffi.new("uint64_t[]", _READ_WINDOW)
        self.ioctl_calls = 0
        self._count_lock = threading.Lock()     # (scan() may run in several threads at once)

    def close(self) -> None:
        self.fd = close_fd(self.fd)

    def _gone_check(self, err: OSError) -> None:
        if err.errno in (errno.ESRCH, errno.ENOENT) or not os.path.exists(f"/proc/{self.pid}"):
            raise TargetGoneError(f"process {self.pid} exited") from None

    def read(self, start: int, npages: int) -> list[int]:
        """Raw entries for npages pages from address start (for tests and small ranges)."""
        out = ffi.new("uint64_t[]", max(npages, 1))
        try:
            n = check(lib.mg_pagemap_read(self.fd, start, npages, PAGE_SIZE, out), "pread pagemap", pid=self.pid)
        except OSError as e:
            self._gone_check(e)
            raise
        return list(out[0:n])

    def match(self, start: int, npages: int, mask: int, want: int, bitmap: bytearray) -> int:
        """Set bitmap bit i for each page i whose entry has (entry & mask) == want; C-decoded."""
        try:
            return check(lib.mg_pagemap_match_range(
                self.fd, start, npages, PAGE_SIZE, mask, want, self._buf, _READ_WINDOW,
                ffi.from_buffer(bitmap)), "pread pagemap", pid=self.pid)
        except OSError as e:
            self._gone_check(e)
            raise

    def scan(self, start: int, end: int, bitmap: bytearray, *, flags: int,
             category_mask: int, return_mask: int, vec=None) -> int:
        """PAGEMAP_SCAN over [start, end) to the end (continuing at walk_end when the vec fills);
        sets bitmap bit (addr - start) / PAGE_SIZE of each reported page.  Returns pages reported.
        vec: a buffer of its own (new_vec()) for a scan running beside another on this pagemap
        (the walks of one process's page tables run in parallel: mmap_lock is taken shared)."""
        calls = ffi.new("uint64_t *")
        try:
            n = check(lib.mg_pagemap_scan_bitmap(
                self.fd, start, end, flags, category_mask, return_mask, PAGE_SIZE,
                self._vec if vec is None else vec, self.vec_len, ffi.from_buffer(bitmap), calls),
                "ioctl(PAGEMAP_SCAN)", pid=self.pid)
        except OSError as e:
            self._gone_check(e)
            raise
        finally:
            with self._count_lock:
                self.ioctl_calls += calls[0]
        return n

    def new_vec(self):
        """A vec buffer for scan(vec=...) (vec_len page_region entries)."""
        return ffi.new("struct mg_page_region[]", self.vec_len)

    def scan_regions(self, start: int, end: int, *, flags: int = 0, category_mask: int = 0,
                     category_anyof_mask: int = 0, category_inverted: int = 0,
                     return_mask: int, max_pages: int = 0) -> tuple[list[tuple[int, int, int]], int]:
        """One PAGEMAP_SCAN call: ([(start, end, categories)], walk_end)."""
        walk_end = ffi.new("uint64_t *")
        try:
            n = check(lib.mg_pagemap_scan(self.fd, start, end, flags, category_inverted,
                                          category_mask, category_anyof_mask, return_mask, max_pages,
                                          self._vec, self.vec_len, walk_end),
                      "ioctl(PAGEMAP_SCAN)", pid=self.pid)
        except OSError as e:
            self._gone_check(e)
            raise
        self.ioctl_calls += 1
        return [(self._vec[i].start, self._vec[i].end, self._vec[i].categories) for i in range(n)], walk_end[0]


def decode_match_py(entries: list[int], mask: int, want: int) -> list[int]:
    """Pure-Python reference decoder: indices whose entry matches.  The C path must agree."""
    return [i for i, e in enumerate(entries) if e & mask == want]
