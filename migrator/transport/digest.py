"""Region digests, computed the same way on both sides.

A region's digest is XXH3-128 over the little-endian XXH3-64 hashes of its pages, in page order
(pages never written, and holes, count as zero pages), as 32 lower-case hex digits.  Hashing page
by page lets each side keep the per-page hashes it already has: the receiver updates them as pages
arrive, the source's shmem ledger holds them after its final sweep, so verifying a migration does
not need a second pass over the whole memory during the downtime.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import xxhash

from .._track_c import ffi, lib
from .pagehash import page_hashes, zero_page_hash
from .wire import RegionSpec

__all__ = ["page_hashes", "zero_page_hash", "digest_of_hashes", "digest_bytes", "region_digest",
           "fd_page_hashes", "file_digest", "PageReader"]

CHUNK_BYTES = 4 << 20


def digest_of_hashes(hashes: Any) -> str:
    """The region digest from its per-page hashes (bytes-like, 8 bytes a page)."""
    return xxhash.xxh3_128(hashes).hexdigest()


class PageReader(Protocol):
    """What the sender reads pages from: blocking calls from worker threads, possibly several at
    once (one per producer).  Optional methods, used when present:

    - read_into(region_name, [(first_page, npages), ...], buf): those pages into buf, in order;
    - mapped(region_name): a read-only buffer of the whole region (zero pages are then found in
      place and only the others copied), or None;
    - memory_object(region_name): (fd, byte offset of page 0) of the object behind mapped(),
      whose holes are then packed as zeros without being read, or None.
    """

    def read(self, region_name: str, first_page: int, npages: int) -> Any:
        """npages * page_size bytes (bytes, bytearray or memoryview) from first_page on."""


def digest_bytes(data: Any, page_size: int = 4096) -> str:
    """Digest of a whole region held in memory."""
    return digest_of_hashes(page_hashes(data, page_size))


def region_digest(reader: PageReader, region: RegionSpec, page_size: int = 4096) -> str:
    """Digest of a region read through a page reader (e.g. a paused source's memory)."""
    npages = region.size // page_size
    step = max(1, CHUNK_BYTES // page_size)
    hashes = bytearray()
    for first in range(0, npages, step):
        n = min(step, npages - first)
        buf = reader.read(region.name, first, n)
        if len(buf) != n * page_size:
            raise ValueError(f"reader returned {len(buf)} bytes for {n} pages of {region.name!r}")
        hashes += page_hashes(buf, page_size)
    return digest_of_hashes(hashes)


def fd_page_hashes(fd: int, offset: int, npages: int, page_size: int = 4096) -> bytearray:
    """Per-page hashes of npages pages of a file (or /proc/PID/mem) from byte offset, read in C;
    pages past the end of a file count as zeros."""
    out = bytearray(8 * max(npages, 1))
    buf = ffi.new("uint8_t[]", CHUNK_BYTES)
    r = lib.mg_sweep_fd(fd, offset, npages, page_size, buf, CHUNK_BYTES,
                        ffi.from_buffer("uint64_t[]", out), ffi.NULL, 0, ffi.NULL, 0)
    if r < 0:
        raise OSError(-r, os.strerror(-r))
    return out[:8 * npages]


def file_digest(path: str | os.PathLike, size: int, page_size: int = 4096) -> str:
    """Digest of the first `size` bytes of an image file (zeros past its end)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        hashes = fd_page_hashes(fd, 0, size // page_size, page_size)
    except OSError as e:
        raise OSError(e.errno, f"reading {os.fspath(path)}: {e.strerror}") from None
    finally:
        os.close(fd)
    return digest_of_hashes(hashes)
