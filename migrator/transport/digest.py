"""Region digests, computed the same way on both sides: xxh3_128 over the region's bytes in page
order (pages never written, or holes, count as zeros), as 32 lower-case hex digits."""

from __future__ import annotations

import os
from typing import Any, Protocol

import xxhash

from .wire import RegionSpec

CHUNK_BYTES = 4 << 20


class PageReader(Protocol):
    """What the sender reads pages from (blocking; called from a worker thread)."""

    def read(self, region_name: str, first_page: int, npages: int) -> Any:
        """npages * page_size bytes (bytes, bytearray or memoryview) from first_page on."""


def digest_bytes(data: Any) -> str:
    """Digest of a whole region held in memory."""
    return xxhash.xxh3_128(data).hexdigest()


def region_digest(reader: PageReader, region: RegionSpec, page_size: int = 4096) -> str:
    """Digest of a region read through a page reader (e.g. a paused source's memory)."""
    npages = region.size // page_size
    step = max(1, CHUNK_BYTES // page_size)
    h = xxhash.xxh3_128()
    for first in range(0, npages, step):
        n = min(step, npages - first)
        buf = reader.read(region.name, first, n)
        if len(buf) != n * page_size:
            raise ValueError(f"reader returned {len(buf)} bytes for {n} pages of {region.name!r}")
        h.update(buf)
    return h.hexdigest()


def file_digest(path: str | os.PathLike, size: int) -> str:
    """Digest of the first `size` bytes of an image file (zeros past its end), read in C."""
    from .._track_c import ffi, lib
    out = ffi.new("uint64_t[2]")
    buf = ffi.new("uint8_t[]", CHUNK_BYTES)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        r = lib.mg_digest_fd(fd, 0, size, buf, CHUNK_BYTES, out)
    finally:
        os.close(fd)
    if r < 0:
        raise OSError(-r, f"reading {os.fspath(path)}: {os.strerror(-r)}")
    return f"{out[0]:016x}{out[1]:016x}"
