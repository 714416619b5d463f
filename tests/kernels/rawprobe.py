"""What the running kernel can do for dirty-page tracking, found by exercising it with raw system
calls (no migrator code): the reference the matrix holds `migrator probe` and the kernel classes
against, and the matrix's stand-in probe (`--probe standin`).

    python tests/kernels/rawprobe.py      # prints JSON in the shape report.parse_probe reads
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import struct

PAGE = mmap.PAGESIZE
PM_SOFT_DIRTY = 1 << 55
PM_SWAPPED = 1 << 62
PM_PRESENT = 1 << 63
MADV_PAGEOUT = getattr(mmap, "MADV_PAGEOUT", 21)
SYS_userfaultfd = 323                      # x86_64
UFFDIO_API = 0xC018AA3F                    # _IOWR(0xAA, 0x3F, struct uffdio_api)
UFFD_API = 0xAA
UFFD_FEATURE_WP_ASYNC = 1 << 15
PAGEMAP_SCAN = 0xC0606610                  # _IOWR('f', 16, struct pm_scan_arg)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def address(m: mmap.mmap) -> int:
    """Start address of an mmap object (the temporary buffer export is released at once)."""
    buf = (ctypes.c_char * 1).from_buffer(m)
    try:
        return ctypes.addressof(buf)
    finally:
        del buf


def pagemap(addr: int, npages: int) -> list[int]:
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        data = os.pread(fd, 8 * npages, addr // PAGE * 8)
    finally:
        os.close(fd)
    return list(struct.unpack(f"{npages}Q", data))


def clear_soft_dirty() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("4")


def soft_dirty_pages(addr: int, npages: int) -> set[int]:
    return {i for i, e in enumerate(pagemap(addr, npages)) if e & PM_SOFT_DIRTY}


def has_soft_dirty() -> bool:
    m = mmap.mmap(-1, 4 * PAGE)
    try:
        for i in range(4):
            m[i * PAGE] = 1
        clear_soft_dirty()
        m[2 * PAGE] = 2
        return soft_dirty_pages(address(m), 4) == {2}
    finally:
        m.close()


def has_uffd_wp_async() -> bool:
    fd = _libc.syscall(SYS_userfaultfd, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        return False
    try:
        fcntl.ioctl(fd, UFFDIO_API, bytearray(struct.pack("QQQ", UFFD_API, UFFD_FEATURE_WP_ASYNC, 0)))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def has_pagemap_scan() -> bool:
    m = mmap.mmap(-1, PAGE)
    try:
        m[0] = 1
        a = address(m)
        arg = bytearray(struct.pack("12Q", 96, 0, a, a + PAGE, 0, 0, 0, 0, 0, 0, 0, 0))
        with open("/proc/self/pagemap", "rb") as f:
            fcntl.ioctl(f.fileno(), PAGEMAP_SCAN, arg)
        return True
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    finally:
        m.close()


def features() -> dict[str, bool]:
    """Named as `migrator probe --json` names them (the async-WP check here is the API
    handshake only: the feature bit granted)."""
    return {"soft_dirty": has_soft_dirty(), "uffd_wp_async_anon": has_uffd_wp_async(),
            "pagemap_scan": has_pagemap_scan()}


def probe() -> dict:
    """The stand-in for `migrator probe --json`: the same flat shape, fewer keys."""
    return {k: {"supported": v, "detail": "tests/kernels/rawprobe.py"} for k, v in features().items()}


if __name__ == "__main__":
    print(json.dumps(probe()))
