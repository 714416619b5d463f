"""Warm guest-physical memory before a measured run, and say what it cost.

Under a hypervisor that backs a VM's memory lazily (Firecracker/KVM here: guest RAM is host
memory mapped on first touch, and virtio-balloon free page reporting hands freed memory back),
the first write to a physical frame the guest has never used costs a host-side fault and a
host-side zeroing: measured here ~3 s per GiB, against ~0.7 s once the frame is backed.  A
receiver allocating its images, or a target filling its memory, pays that on whichever frames
the kernel gives it, so one run pays it and the next does not, and no run measures migrator.

warm_frames() writes fresh anonymous memory (MADV_POPULATE_WRITE, one call) and releases it at
once: the kernel hands those frames out again first (its free lists are last in, first out), so
the measured run that follows allocates frames the host has backed.  The seconds it took are the
benchmark's record of the host's cost: bare metal has no such cost, and the warm-up takes ~0.7 s
per GiB there.
"""

from __future__ import annotations

import mmap
import time

from ..transport._native import ffi, lib, check


def warm_frames(nbytes: int) -> float:
    """Write nbytes of fresh anonymous memory and release it.  Returns seconds per GiB the write
    took (~3 here when the frames were never backed by the host, ~0.7 when they were)."""
    if nbytes <= 0:
        return 0.0
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        t0 = time.perf_counter()
        with ffi.from_buffer(m) as p:
            check(lib.mg_populate(p, nbytes, 1), "MADV_POPULATE_WRITE")
        return (time.perf_counter() - t0) / (nbytes / (1 << 30))
    finally:
        m.close()
