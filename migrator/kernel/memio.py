"""Reads of runs of pages of a memory object or of /proc/PID/mem in one C call (csrc/memio.c),
for callers outside the kernel layer (precopy/source.py)."""

from __future__ import annotations

from typing import Any

from .native import PAGE_SIZE, check, ffi, lib


def read_runs(fd: int, base: int, runs: list[tuple[int, int]], buf: Any, *, zero_eof: bool,
              pid: int | None = None) -> None:
    """Read the pages of runs [(first_page, npages), ...] at byte base + page * PAGE_SIZE of fd
    into buf (writable, at least their size), one after the other, in one C call.  Bytes past the
    end of the file read as zeros if zero_eof, else OSError(ENXIO); other failures are an
    OSError naming pread (and pid)."""
    flat = ffi.new("uint64_t[]", [x for run in runs for x in run] or [0])
    check(lib.mg_read_runs(fd, base, flat, len(runs), PAGE_SIZE, ffi.from_buffer(buf), int(zero_eof)),
          "pread", pid=pid)
