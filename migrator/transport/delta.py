"""Delta batches: pages sent again as the bytes that changed, against the copy the destination
holds (XBZRLE's idea in QEMU; the C loops and the format are in csrc/delta.h).

The sender keeps a cache of pages as sent (DeltaCache): direct-mapped, `delta_cache` bytes of
virtual memory that costs RSS only for the pages cached.  Round 0 (the bulk copy) caches nothing;
a later round caches the pages it sends when the controller asks (the guest rewrites what it was
sent: docs/architecture.md), so a page the guest keeps rewriting is in it from its second send
on.  Each data page of a later round is encoded as it is packed: against its copy when it has
one from a round the receiver acknowledged (written there), else whole (one literal record); the
batch goes as deltas (BATCH codec wire.DELTA) when that is at least 1/8 smaller than the pages,
otherwise as it would have.  A copy is replaced by another page's only if it was not sent in
this round or the last one (two pages the guest both rewrites would evict each other).

The receiver patches its image in place through a shared mapping of the image file (so a pause
of small changes costs a hash of each page, not two copies), after checking the whole batch's
format and that each page holds data from an earlier round (a page holding none may only come
whole, and is written with pwrite: a file system may need space for it), then proves the
result: the batch hash covers the XXH3-64 of every new page, which the receiver computes from
the patched pages.  A mismatch (a delta against another copy than the sender's) fails the
session: its images are then not complete.  Pages patched this way stay mapped by the receiver
until the session ends (page cache, shared with the image file: they count in its RSS as file
or shmem pages).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import MigratorError, ProtocolError
from ._native import ffi, lib
from .wire import RegionSpec

MIN_CACHE = 256 << 20         # bytes: the smallest automatic cache (or the regions, if smaller)
MAX_CACHE = 1 << 30           # bytes: the largest automatic cache
MIN_SAVING = 1 / 8            # deltas must be this much smaller than the pages they replace


def auto_cache_bytes(total_bytes: int, page_size: int = 4096) -> int:
    """The default cache size for regions of total_bytes: 1/4 of them, within [256 MiB, 1 GiB],
    at most the regions (virtual memory: RSS grows only with the pages cached, those of the
    rounds the guest rewrote)."""
    n = min(max(total_bytes // 4, MIN_CACHE), MAX_CACHE, max(total_bytes, page_size))
    return max(page_size, n - n % page_size)


@dataclass
class DeltaTotals:
    batches: int = 0          # batches sent as deltas
    raw_bytes: int = 0        # their pages' bytes
    wire_bytes: int = 0       # their deltas' bytes
    hits: int = 0             # pages encoded against a copy (in batches that went as deltas or not)
    misses: int = 0           # pages sent after round 0 without a usable copy


class DeltaCache:
    """The sender's copies of pages as last sent (thread-safe: slots are locked one at a time)."""

    def __init__(self, regions: Sequence[RegionSpec], page_size: int, nbytes: int):
        if page_size % 8 or nbytes < page_size:
            raise ValueError(f"delta cache of {nbytes} bytes for {page_size}-byte pages")
        self.page_size = page_size
        self.nslots = nbytes // page_size
        self.key_base: list[int] = []        # each region's first key
        k = 0
        for r in regions:
            self.key_base.append(k)
            k += r.size // page_size
        self._maps = [mmap.mmap(-1, self.nslots * page_size), mmap.mmap(-1, 8 * self.nslots),
                      mmap.mmap(-1, 4 * self.nslots), mmap.mmap(-1, self.nslots)]
        c = self.c = ffi.new("struct mg_delta_cache *")
        self._keep = [ffi.from_buffer(m) for m in self._maps]
        c.pages = self._keep[0]
        c.keys = ffi.cast("uint64_t *", self._keep[1])
        c.rounds = ffi.cast("uint32_t *", self._keep[2])
        c.busy = self._keep[3]
        c.nslots = self.nslots
        c.page_size = page_size
        self.totals = DeltaTotals()
        self._lock = threading.Lock()
        self.used = False             # anything cached yet (else a send that caches nothing
                                      # encodes nothing)

    @property
    def nbytes(self) -> int:
        return self.nslots * self.page_size

    def encode(self, region: int, src: Any, contiguous: bool, runs: Any, nruns: int, npages: int,
               round_no: int, base_round: int, out: Any, out_cap: int, keep: bool = True) -> int | None:
        """The batch's data pages (runs: a uint64_t[] of nruns (first, count) pairs, npages pages
        in all; contents at src: see mg_delta_encode) as deltas into out (out_cap: at least the
        pages' size, more than any deltas sent can take), their length; None if
        the batch does not go as deltas.  keep: cache the pages as they are now (else their
        copies are dropped: they will not be sent again)."""
        st = ffi.new("struct mg_delta_stats *")
        n = lib.mg_delta_encode(src, int(contiguous), runs, nruns, self.key_base[region], round_no,
                                max(base_round, 0), int(keep), self.c, out, out_cap, st)
        self.used = self.used or keep
        if n < 0:
            raise ValueError(f"delta encoding failed: {n}")
        return self.count(st.hits, st.misses, n, npages, base_round)

    def count(self, hits: int, misses: int, nbytes: int, npages: int, base_round: int) -> int | None:
        """A batch of npages data pages was encoded (mg_pack_pages with a delta job): hits and
        misses among them, nbytes of deltas.  Returns nbytes if the batch goes as deltas, else
        None (see encode)."""
        raw = npages * self.page_size
        ok = base_round >= 0 and npages > 0 and nbytes <= raw * (1 - MIN_SAVING)
        with self._lock:
            t = self.totals
            t.hits += hits
            t.misses += misses
            if ok:
                t.batches += 1
                t.raw_bytes += raw
                t.wire_bytes += nbytes
        return nbytes if ok else None

    def forget(self, region: int, flat: Sequence[int] | None) -> None:
        """Drop the copies of the pages of flat (first, count) runs (a batch never sent)."""
        if flat and self.used:
            lib.mg_delta_forget(ffi.new("uint64_t[]", list(flat)), len(flat) // 2, self.key_base[region], self.c)

    def close(self) -> None:
        for k in self._keep:
            ffi.release(k)
        for m in self._maps:
            m.close()


class ImagePatcher:
    """The receiver's side for one image: applies delta batches through a shared mapping of the
    image file (made at the first one)."""

    def __init__(self, fd: int, size: int):
        self._fd = fd
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._ptr = ffi.from_buffer(self._map)

    def apply(self, what: str, npages: int, stamps: Any, img_hashes: Any, data: Any,
              data_flat: Sequence[int], round_no: int, page_size: int) -> bytes:
        """Patch the pages of data_flat with the deltas in data; returns the new pages' XXH3-64
        (8 bytes each, in order).  ProtocolError (nothing changed) for malformed deltas, or a
        page the image holds no earlier copy of that is not sent whole; MigratorError if a page
        sent whole could not be written."""
        n = sum(data_flat[1::2])
        hashes = ffi.new("uint64_t[]", max(n, 1))
        runs = ffi.new("uint64_t[]", list(data_flat))
        bad = ffi.new("uint64_t *")
        with ffi.from_buffer(data) as d:
            r = lib.mg_apply_delta(self._fd, self._ptr, npages, stamps, img_hashes, d, len(data), runs,
                                   len(data_flat) // 2, round_no, page_size, hashes, bad)
        if r == -errno.ESTALE:
            raise ProtocolError(f"{what}: a delta for page {bad[0]}, of which the image holds no copy "
                                f"from an earlier round to patch")
        if r == -errno.EINVAL:
            raise ProtocolError(f"{what}: malformed deltas (at data page {bad[0]} of the batch)")
        if r < 0:
            raise MigratorError(f"{what}: writing the image: {os.strerror(-r)}")
        return bytes(ffi.buffer(hashes, 8 * n))

    def populate(self, flat: Sequence[int], page_size: int) -> None:
        """Fault in (writable) the pages of flat (first, count) runs (best effort: an older
        kernel without MADV_POPULATE_WRITE leaves them to fault on use)."""
        for first, count in zip(flat[0::2], flat[1::2]):
            if lib.mg_populate(self._ptr + first * page_size, count * page_size, 1) < 0:
                return

    def close(self) -> None:
        ffi.release(self._ptr)
        self._map.close()


__all__ = ["DeltaCache", "DeltaTotals", "ImagePatcher", "auto_cache_bytes"]
