"""Scratch mappings in this process, for probing the kernel and for tests: anonymous or memfd."""

from __future__ import annotations

import ctypes
import mmap
import os

from .native import PAGE_SIZE
from .resources import Closing, close_fd


def address_of(m: mmap.mmap) -> int:
    """The virtual address of an mmap object's mapping."""
    c = ctypes.c_char.from_buffer(m)
    addr = ctypes.addressof(c)
    del c                       # release the buffer export so the mmap can be closed
    return addr


class Scratch(Closing):
    """An anonymous private (memfd_name=None) or memfd shared mapping of npages pages."""

    def __init__(self, npages: int, memfd_name: str | None = None, align: int = PAGE_SIZE):
        self.npages = npages
        self.size = npages * PAGE_SIZE
        self.fd = -1
        self._skip = 0            # bytes before the exposed window (an aligned one, for THP)
        if memfd_name is not None:
            self.fd = os.memfd_create(memfd_name, os.MFD_CLOEXEC)
            os.ftruncate(self.fd, self.size)
            self.map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        elif align > PAGE_SIZE:
            # over-allocate and use an aligned window (for THP): keep the big map, expose a view
            self._big = mmap.mmap(-1, self.size + align, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            base = address_of(self._big)
            self._skip = (-base) % align
            self.map = self._big
        else:
            self.map = mmap.mmap(-1, self.size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.addr = address_of(self.map) + self._skip

    def write(self, page: int, data: bytes = b"\x01", at: int = 0) -> None:
        off = self._skip + page * PAGE_SIZE + at
        self.map[off:off + len(data)] = data

    def read(self, page: int, n: int = 1) -> bytes:
        off = self._skip + page * PAGE_SIZE
        return self.map[off:off + n * PAGE_SIZE]

    def madvise(self, advice: int, first: int = 0, npages: int | None = None) -> None:
        n = self.npages - first if npages is None else npages
        self.map.madvise(advice, self._skip + first * PAGE_SIZE, n * PAGE_SIZE)

    def close(self) -> None:
        self.map.close()
        self.fd = close_fd(self.fd)
