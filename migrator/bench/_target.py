"""A non-cooperating target for the benchmarks: maps memory, populates it, then writes on command.

It never creates a userfaultfd (the benchmarks inject one).  Run as
`python -m migrator.bench._target [--anon SIZE] [--shm SIZE | --shm-from PATH]`.  It prints one
JSON line ({"pid", "memfd", "regions": {"anon": [start, end], "shm": [start, end]}}), then reads
commands from stdin, one a line, and answers each with one line ("ok N" or "error ..."):

  w REGION HEX                write one byte into each page whose index is in HEX (the bytes of an
                              array('I') of page indices, hex-encoded)
  s REGION FIRST STEP COUNT   write one byte into pages FIRST, FIRST+STEP, ... (COUNT pages), in
                              one strided slice assignment (no Python loop)
  q                           exit

Every write command stores a new byte value, so contents change each time.

Its address-space size stays the same while it serves commands (the write-protect tracker runs a
layout check, a second walk, whenever a target's size changes): malloc is told to keep freed heap
and to serve blocks below 32 MiB from it, and the heap is grown once at start (started with
PYTHONMALLOC=malloc, Python's small objects come from that heap too).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import sys
from array import array

from ..kernel.native import PAGE_SIZE
from ..kernel.scratch import address_of
from ..units import parse_size


M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def _steady_heap() -> None:
    """Keep the heap from growing or shrinking while commands are served (see the module)."""
    libc = ctypes.CDLL(None)
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    libc.mallopt(M_TOP_PAD, 64 << 20)
    grow = bytearray(16 << 20)          # brk once: 16 MiB + the 64 MiB pad, never trimmed
    del grow


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m migrator.bench._target")
    ap.add_argument("--anon", default="0", help="private anonymous memory (0: none)")
    ap.add_argument("--shm", default="0", help="a new memfd of this size, mapped shared")
    ap.add_argument("--shm-from", metavar="PATH", help="map an existing memfd (/proc/PID/fd/N) instead")
    ap.add_argument("--name", default="bench-shared", help="memfd name")
    ap.add_argument("--no-populate", action="store_true")
    a = ap.parse_args(argv)
    _steady_heap()
    maps: dict[str, mmap.mmap] = {}
    memfd = None
    anon = parse_size(a.anon)
    if anon:
        maps["anon"] = mmap.mmap(-1, anon, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if a.shm_from:
        memfd = os.open(a.shm_from, os.O_RDWR | os.O_CLOEXEC)
        maps["shm"] = mmap.mmap(memfd, os.fstat(memfd).st_size, mmap.MAP_SHARED)
    elif parse_size(a.shm):
        memfd = os.memfd_create(a.name, os.MFD_CLOEXEC)
        os.ftruncate(memfd, parse_size(a.shm))
        maps["shm"] = mmap.mmap(memfd, parse_size(a.shm), mmap.MAP_SHARED)
    value = 1
    if not a.no_populate:
        for m in maps.values():
            m[::PAGE_SIZE] = bytes([value]) * (len(m) // PAGE_SIZE)
    info = {"pid": os.getpid(), "memfd": memfd, "page_size": PAGE_SIZE,
            "regions": {k: [address_of(m), address_of(m) + len(m)] for k, m in maps.items()}}
    out = sys.stdout
    out.write(json.dumps(info) + "\n")
    out.flush()
    for line in sys.stdin.buffer:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == b"q":
            break
        try:
            m = maps[parts[1].decode()]
            value = value % 255 + 1
            if parts[0] == b"w":
                pages = array("I", bytes.fromhex(parts[2].decode()) if len(parts) > 2 else b"")
                for p in pages:
                    m[p * PAGE_SIZE] = value
                n = len(pages)
            elif parts[0] == b"s":
                first, step, n = int(parts[2]), int(parts[3]), int(parts[4])
                if n:
                    lo = first * PAGE_SIZE
                    m[lo:lo + (n - 1) * step * PAGE_SIZE + 1:step * PAGE_SIZE] = bytes([value]) * n
            else:
                raise ValueError(f"unknown command {parts[0]!r}")
            out.write(f"ok {n}\n")
        except Exception as e:            # noqa: BLE001 - reported to the driver
            out.write(f"error {type(e).__name__}: {e}\n".replace("\n", " ").rstrip() + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
