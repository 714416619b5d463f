"""Binding of migrator._stream_c (csrc/stream.c and csrc/pages.c, csrc/build.py): socket I/O,
packing and applying batches, page hashes, sweeps of page-hash tables, digest leaves, page
population.  Owned by migrator.transport: only transport/ modules use `lib`; others call their
functions (transport/pagehash.py, transport/digest.py)."""

from .._binding import PAGE_SIZE, check
from .._stream_c import ffi, lib

__all__ = ["ffi", "lib", "check", "PAGE_SIZE"]
