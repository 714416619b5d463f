"""What the running kernel really supports, found by exercising each mechanism on a scratch
mapping in this process (never by version number).  probe() runs every check once."""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
from dataclasses import asdict, dataclass

from .maps import vma_smaps
from .native import PAGE_SIZE, lib
from .pagemap import (PAGE_IS_PRESENT, PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING,
                      PM_SOFT_DIRTY, Pagemap)
from .scratch import Scratch
from .uffd import UFFD_FEATURE_WP_ASYNC, WP_FEATURES, Userfaultfd, create_in_this_process

MADV_PAGEOUT = getattr(mmap, "MADV_PAGEOUT", 21)
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)


@dataclass(frozen=True)
class Feature:
    supported: bool
    detail: str


@dataclass(frozen=True)
class Capabilities:
    soft_dirty: Feature
    pagemap_scan: Feature
    uffd_wp_async_anon: Feature
    uffd_wp_async_shmem: Feature
    pidfd_getfd: Feature
    map_files: Feature
    swap_active: Feature
    thp: Feature

    def to_json(self) -> dict:
        return {k: asdict(v) for k, v in self.__dict__.items()}

    def tracking_problem(self) -> str | None:
        """None when page-table tracking can run here (userfaultfd write-protect with
        PAGEMAP_SCAN, or soft-dirty); else why not, in words."""
        if self.pagemap_scan.supported and self.uffd_wp_async_anon.supported:
            return None
        if self.soft_dirty.supported:
            return None
        return ("neither userfaultfd write-protect with PAGEMAP_SCAN "
                f"({self.uffd_wp_async_anon.detail or self.pagemap_scan.detail}) nor soft-dirty "
                f"({self.soft_dirty.detail}) is available")


def _safe(fn):
    def run() -> Feature:
        try:
            return fn()
        except OSError as e:
            return Feature(False, f"{fn.__name__.removeprefix('probe_')}: {e.strerror or e}")
        except Exception as e:  # a probe must never take the probe command down
            return Feature(False, f"probe failed: {type(e).__name__}: {e}")
    run.__name__ = fn.__name__
    return run


@_safe
def probe_soft_dirty() -> Feature:
    with Scratch(4) as s, Pagemap(os.getpid()) as pm:
        s.write(0)
        s.write(2)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("4")
        before = pm.read(s.addr, 4)
        s.write(1)
        after = pm.read(s.addr, 4)
        sd = [bool(e & PM_SOFT_DIRTY) for e in after]
        if sd[1] and not any(bool(e & PM_SOFT_DIRTY) for e in before[:3]) and not sd[0] and not sd[2]:
            return Feature(True, "clear_refs 4 clears bit 55; a write sets it on exactly that page")
        return Feature(False, "CONFIG_MEM_SOFT_DIRTY absent: after clear_refs 4 and a write, pagemap bit 55 "
                              f"reads {''.join('1' if x else '0' for x in sd)} for pages 0-3 (want 0100)")


@_safe
def probe_pagemap_scan() -> Feature:
    with Scratch(8) as s, Pagemap(os.getpid()) as pm:
        for p in (1, 2, 5):
            s.write(p)
        try:
            regions, walk_end = pm.scan_regions(s.addr, s.addr + s.size, category_mask=PAGE_IS_PRESENT,
                                                return_mask=PAGE_IS_PRESENT)
        except OSError as e:
            if e.errno in (errno.ENOTTY, errno.EINVAL):
                return Feature(False, "ioctl PAGEMAP_SCAN unknown to this kernel (needs Linux 6.7+)")
            raise
        pages = sorted({(a - s.addr) // PAGE_SIZE + i for a, b, _ in regions
                        for i in range((b - a) // PAGE_SIZE)})
        if pages == [1, 2, 5] and walk_end == s.addr + s.size:
            return Feature(True, "ioctl PAGEMAP_SCAN reports exactly the present pages")
        return Feature(False, f"PAGEMAP_SCAN reported pages {pages}, expected [1, 2, 5]")


def _probe_wp(memfd: bool) -> Feature:
    """Register a scratch mapping for async WP, write one page, scan: exactly that page."""
    with Scratch(8, "migrator-probe" if memfd else None) as s:
        s.write(0)                                       # one populated page before arming
        try:
            fd = create_in_this_process()
        except OSError as e:
            return Feature(False, f"userfaultfd(2): {e.strerror}")
        uffd = Userfaultfd(fd, os.getpid())
        try:
            try:
                granted = uffd.api(WP_FEATURES)
            except Exception as e:
                return Feature(False, str(e))
            if not granted & UFFD_FEATURE_WP_ASYNC:
                return Feature(False, "UFFD_FEATURE_WP_ASYNC not granted")
            try:
                uffd.register_wp(s.addr, s.size)
            except OSError as e:
                return Feature(False, f"UFFDIO_REGISTER(MODE_WP) on {'memfd' if memfd else 'anonymous'} memory: {e.strerror}")
            uffd.writeprotect(s.addr, s.size, True)
            s.write(3)
            s.write(6)
            with Pagemap(os.getpid()) as pm:
                bits = bytearray(1)
                pm.scan(s.addr, s.addr + s.size, bits, flags=PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                        category_mask=PAGE_IS_WRITTEN, return_mask=PAGE_IS_WRITTEN)
                again = bytearray(1)
                pm.scan(s.addr, s.addr + s.size, again, flags=PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                        category_mask=PAGE_IS_WRITTEN, return_mask=PAGE_IS_WRITTEN)
            got = [i for i in range(8) if bits[0] >> i & 1]
            if got == [3, 6] and again[0] == 0:
                return Feature(True, "writes to pages 3 and 6 reported exactly, then re-protected")
            return Feature(False, f"wrote pages [3, 6], scan reported {got}, rescan {again[0]:#x}")
        finally:
            uffd.close()


@_safe
def probe_uffd_wp_async_anon() -> Feature:
    return _probe_wp(memfd=False)


@_safe
def probe_uffd_wp_async_shmem() -> Feature:
    return _probe_wp(memfd=True)


@_safe
def probe_pidfd_getfd() -> Feature:
    r, w = os.pipe()
    # a small child that holds the pipe open until we close our end (exec of cat: ~1 ms)
    child = subprocess.Popen(["cat"], stdin=r, stdout=subprocess.DEVNULL, close_fds=True)
    os.close(r)
    try:
        pidfd = lib.mg_pidfd_open(child.pid)
        if pidfd < 0:
            return Feature(False, f"pidfd_open: {os.strerror(-pidfd)}")
        try:
            fd = lib.mg_pidfd_getfd(pidfd, 0)
        finally:
            os.close(pidfd)
        if fd < 0:
            return Feature(False, f"pidfd_getfd: {os.strerror(-fd)}")
        same = os.fstat(fd).st_ino == os.fstat(w).st_ino
        os.close(fd)
        return Feature(same, "took a child's descriptor with pidfd_getfd" if same
                       else "pidfd_getfd returned a different file")
    finally:
        os.close(w)
        child.wait(timeout=5)


@_safe
def probe_map_files() -> Feature:
    with Scratch(2, "migrator-probe") as s:
        path = f"/proc/self/map_files/{s.addr:x}-{s.addr + s.size:x}"
        try:
            fd = os.open(path, os.O_RDONLY)
        except PermissionError:
            return Feature(False, "opening /proc/PID/map_files needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE")
        try:
            s.write(1, b"probe!")
            ok = os.fstat(fd).st_ino == os.fstat(s.fd).st_ino and os.pread(fd, 6, PAGE_SIZE) == b"probe!"
        finally:
            os.close(fd)
        return Feature(ok, "opened a memfd through map_files and read its page cache" if ok
                       else "map_files gave another object")


@_safe
def probe_swap_active() -> Feature:
    with open("/proc/swaps") as f:
        lines = f.read().strip().splitlines()[1:]
    if not lines:
        return Feature(False, "no active swap (e.g. zram: echo 1G > /sys/block/zram0/disksize; "
                              "mkswap /dev/zram0; swapon /dev/zram0)")
    devs = ", ".join(f"{l.split()[0]} ({int(l.split()[2]) // 1024} MiB)" for l in lines)
    return Feature(True, devs)


@_safe
def probe_thp() -> Feature:
    base = "/sys/kernel/mm/transparent_hugepage"
    try:
        enabled = open(f"{base}/enabled").read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return Feature(False, "no transparent hugepages")
    try:
        shmem = open(f"{base}/shmem_enabled").read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        shmem = "?"
    if enabled == "never":
        return Feature(False, f"THP disabled (enabled=never, shmem={shmem})")
    huge = 2 << 20
    with Scratch(2 * huge // PAGE_SIZE, align=huge) as s:
        s.madvise(MADV_HUGEPAGE)
        for p in range(0, huge // PAGE_SIZE, 64):
            s.write(p)
        got = _anon_huge_bytes(s.addr)
    if got == huge:
        return Feature(True, f"anonymous THP on madvise (enabled={enabled}, shmem={shmem})")
    return Feature(False, f"no huge page after MADV_HUGEPAGE (enabled={enabled}, shmem={shmem})")


def _anon_huge_bytes(addr: int) -> int:
    """AnonHugePages of the VMA holding addr, from /proc/self/smaps (bytes)."""
    return int(vma_smaps("self", addr).get("AnonHugePages", "0 kB").split()[0]) * 1024


def probe() -> Capabilities:
    """Exercise every mechanism once (about 10-50 ms)."""
    return Capabilities(
        soft_dirty=probe_soft_dirty(),
        pagemap_scan=probe_pagemap_scan(),
        uffd_wp_async_anon=probe_uffd_wp_async_anon(),
        uffd_wp_async_shmem=probe_uffd_wp_async_shmem(),
        pidfd_getfd=probe_pidfd_getfd(),
        map_files=probe_map_files(),
        swap_active=probe_swap_active(),
        thp=probe_thp(),
    )
