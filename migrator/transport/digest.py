"""Region digests, computed the same way on both sides.

A region's digest is built from the little-endian XXH3-64 hashes of its pages, in page order
(pages never written, and holes, count as zero pages): the table of those hashes is cut into
leaves of LEAF_PAGES (256) pages (2 KiB of hashes; the last one shorter), each leaf is hashed with
XXH3-64 (8 bytes, big-endian: xxhash's canonical form), and the digest is XXH3-128 over those leaf
hashes in order, as 32 lower-case hex digits.  Hashing page by page lets each side keep the
per-page hashes it already has: the receiver updates them as pages arrive, the sender as it sends,
so verifying a migration needs no second pass over the memory during the downtime.  The leaves let
each side keep the digest up to date (TableDigest): a digest then costs the leaves whose pages
changed since the last one, not the region's size (8 GiB has 8192 leaves: 64 KiB hashed for
the top, plus 2 KiB for each leaf changed).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

import xxhash

from ._native import ffi, lib
from .pagehash import page_hashes, zero_page_hash
from .wire import RegionSpec

__all__ = ["page_hashes", "zero_page_hash", "digest_of_hashes", "TableDigest", "digest_bytes", "region_digest",
           "fd_page_hashes", "file_digest", "PageReader", "BufferReader"]

CHUNK_BYTES = 4 << 20
LEAF_SHIFT = 8
LEAF_PAGES = 1 << LEAF_SHIFT          # pages a leaf of the digest covers (2 KiB of hashes)


def _leaves(hashes: Any, npages: int, stale: Any, out: bytearray) -> int:
    with ffi.from_buffer(hashes) as h, ffi.from_buffer(out) as o:
        r = lib.mg_hash_leaves(h, npages, LEAF_SHIFT, ffi.NULL if stale is None else ffi.from_buffer(stale), o)
    if r < 0:
        raise ValueError("bad leaf size")
    return r


def digest_of_hashes(hashes: Any) -> str:
    """The region digest from its per-page hashes (bytes-like, 8 bytes a page)."""
    with memoryview(hashes) as mv, mv.cast("B") as b:
        npages = len(b) // 8
        leaves = bytearray(8 * ((npages + LEAF_PAGES - 1) >> LEAF_SHIFT))
        _leaves(b, npages, None, leaves)
    return xxhash.xxh3_128(leaves).hexdigest()


class TableDigest:
    """The digest of a per-page hash table (8 bytes a page) kept up to date as the table
    changes: touch() marks the leaves whose pages changed, and digest() rehashes only those
    (refresh() does it ahead, e.g. after a round, so the switch-over's digest costs only the
    pages of its last rounds).  digest() equals digest_of_hashes() of the table.

    touch() may be called from several threads at once; refresh() and digest() must not run
    while the table changes (a leaf is marked clean before it is hashed, so a change racing
    a refresh leaves it marked, never clean and wrong)."""

    def __init__(self, table: Any, npages: int):
        """table: a writable buffer of at least 8 * npages bytes (kept until close())."""
        self.npages = npages
        self._table = memoryview(table).cast("B")
        if len(self._table) < 8 * npages:
            self._table.release()
            raise ValueError(f"a hash table of {len(self._table)} bytes for {npages} pages")
        n = (npages + LEAF_PAGES - 1) >> LEAF_SHIFT
        self._leaves = bytearray(8 * n)
        self._stale = bytearray(b"\x01") * n

    def touch(self, flat: Sequence[int]) -> None:
        """The pages of flat (first, count) runs changed.  ValueError for a run outside the table."""
        if flat:
            self.touch_c(ffi.new("uint64_t[]", list(flat)), len(flat) // 2)

    def touch_c(self, runs: Any, nruns: int) -> None:
        """touch() of runs already in a uint64_t cdata array (nruns (first, count) pairs)."""
        if nruns and lib.mg_mark_chunks(runs, nruns, self.npages, LEAF_SHIFT, ffi.from_buffer(self._stale)) < 0:
            raise ValueError("pages outside the table")

    def touch_all(self) -> None:
        """Every leaf to be hashed again."""
        self._stale[:] = b"\x01" * len(self._stale)

    def refresh(self) -> int:
        """Rehash the leaves marked changed (in C, without the GIL); returns how many."""
        return _leaves(self._table, self.npages, self._stale, self._leaves)

    def digest(self) -> str:
        self.refresh()
        return xxhash.xxh3_128(self._leaves).hexdigest()

    def close(self) -> None:
        self._table.release()


class PageReader(Protocol):
    """What the sender reads pages from: blocking calls from worker threads, possibly several at
    once (one per producer).  BufferReader gives every method but read() a plain default."""

    def read(self, region_name: str, first_page: int, npages: int) -> Any:
        """npages * page_size bytes (bytes, bytearray or memoryview) from first_page on."""

    def read_into(self, region_name: str, runs: list[tuple[int, int]], buf: Any,
                  page_size: int) -> None:
        """The pages of runs [(first_page, npages), ...] into buf, one after the other."""

    def mapped(self, region_name: str) -> Any | None:
        """A read-only buffer of the whole region (zero pages are then found in place and only
        the others copied), or None."""

    def memory_object(self, region_name: str) -> tuple[int, int] | None:
        """(fd, byte offset of page 0) of the object behind mapped(), whose holes are then
        packed as zeros without being read, or None."""


class BufferReader:
    """A PageReader needing only read(): pages are read run by run, nothing is mapped."""

    def read(self, region_name: str, first_page: int, npages: int) -> Any:
        raise NotImplementedError

    def read_into(self, region_name: str, runs: list[tuple[int, int]], buf: Any,
                  page_size: int) -> None:
        pos = 0
        for first, n in runs:
            got = self.read(region_name, first, n)
            if len(got) != n * page_size:
                raise ValueError(f"page reader returned {len(got)} bytes for {n} pages of "
                                 f"region {region_name!r}")
            buf[pos:pos + n * page_size] = got
            pos += n * page_size

    def mapped(self, region_name: str) -> Any | None:
        return None

    def memory_object(self, region_name: str) -> tuple[int, int] | None:
        return None


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
