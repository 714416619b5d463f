"""Binding of migrator._kernel_c (csrc/build.py): pagemap and PAGEMAP_SCAN, userfaultfd and
pidfd calls, uffd injection, the /proc holder scan, memory reads (memio.c), the ledger's content
sweeps and bitmaps.  Owned by migrator.kernel: only kernel/ and tracking/ modules use `lib`
(precopy/source.py's memory reads too, through kernel/memio.py); others call their functions.
pages.h's functions are exported here as mgk_* (the stream module has the mg_* names)."""

from .._binding import PAGE_SIZE, check
from .._kernel_c import ffi, lib

__all__ = ["ffi", "lib", "check", "PAGE_SIZE"]
