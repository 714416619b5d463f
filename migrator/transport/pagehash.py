"""XXH3-64 of every page of a buffer, in C: the unit both the batch hash and the region digest
are built from (so each side hashes a page once)."""

from __future__ import annotations

from typing import Any

from ._native import ffi, lib


def zero_page_hash(page_size: int = 4096) -> int:
    """XXH3-64 of a page of zeros."""
    return lib.mg_hash_zero_page(page_size)


def page_hashes(data: Any, page_size: int = 4096) -> bytes:
    """The XXH3-64 of every page of data (a whole number of pages), little-endian, 8 bytes each."""
    n = len(data) // page_size
    if n * page_size != len(data):
        raise ValueError(f"{len(data)} bytes is not a whole number of {page_size}-byte pages")
    out = bytearray(8 * n)
    if n:
        lib.mg_hash_mem_pages(ffi.from_buffer(data), n, page_size, ffi.from_buffer("uint64_t[]", out))
    return bytes(out)
