"""Who holds a shared memory object, and what each holder did: one pass over /proc.

A memfd, shared anonymous region or tmpfs file is changed only by the processes that hold it: by
a mapping (a store through page tables), by a descriptor opened for writing (write, pwrite,
fallocate, ...), or by the kernel on their behalf (direct I/O into a mapping).  scan_holders()
finds every such process by device + inode in /proc/*/maps and /proc/*/fd, and reads for each
the counters that say whether it can have written the object without its page tables seeing it:

- syscw (/proc/PID/io): write-type system calls completed (write, pwrite64, writev, pwritev,
  sendfile, copy_file_range; tests/test_holders.py checks which);
- syscr: read-type calls completed (a direct-I/O read lands in pinned pages, without a fault);
- cminflt (/proc/PID/stat): faults of reaped children (every child that ran adds some), with
  the live children found by their parent pid: a fork inherits mappings and descriptors;
- VmPin (/proc/PID/status): long-term pinned pages (RDMA, VFIO): written by devices;
- asynchronous I/O (an io_uring descriptor, an aio ring mapping): completes at any time;
- descriptors opened with O_DIRECT.

Reading another process's /proc/PID/io needs ptrace rights (root here).  The pass over every
process (its maps, its fd table and a stat of each descriptor) runs in C, whatever the memory
size, and hands back the holders' maps lines naming an object; only the holders' descriptors
and counters are read here.  A process whose maps file is empty or unreadable (a kernel thread;
one exited; one out of migrator's rights, as a container's supervisor) has its fd table passed
over: nothing readable there could be a holder.
"""

from __future__ import annotations

import fcntl
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from .maps import Mapping
from .mappers import ObjectKey, _matching, _needles, _read
from .native import check, ffi, lib

O_ACCMODE = 0o3
O_DIRECT = 0o40000
TEXT_ROOM = 256 * 1024          # bytes for the holders' maps lines naming an object, per scan


@dataclass
class Holder:
    """One process holding tracked objects, as one scan saw it."""

    pid: int
    ppid: int = 0
    maps: list[Mapping] = field(default_factory=list)      # its shared mappings of the objects
    writable: set[ObjectKey] = field(default_factory=set)  # objects it has open for writing
    syscw: int = -1
    syscr: int = -1
    cminflt: int = -1
    vm_pin_kb: int = 0
    async_io: str = ""          # "io_uring" / "aio" when it has such an instance
    direct_fds: int = 0         # descriptors opened with O_DIRECT

    @property
    def mapped(self) -> set[ObjectKey]:
        return {(m.dev[0], m.dev[1], m.inode) for m in self.maps}


@dataclass
class HolderScan:
    """Every holder of the objects (pid -> Holder), and every process seen."""

    holders: dict[int, Holder]
    pids: set[int]
    scan_s: float = 0.0


def _ppid(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _fd_details(pid: str, keys: set[ObjectKey]) -> tuple[set[ObjectKey], str, int]:
    """(objects open for writing, async I/O kind, O_DIRECT descriptors) of a holder."""
    if int(pid) == os.getpid():
        return _own_fd_details(keys)
    writable: set[ObjectKey] = set()
    async_io = ""
    direct = 0
    try:
        it = os.scandir(f"/proc/{pid}/fd")
    except OSError:
        return writable, async_io, direct
    with it:
        for e in it:
            try:
                link = os.readlink(e.path)
            except OSError:
                continue
            if link == "anon_inode:[io_uring]":
                async_io = "io_uring"
                continue
            if not link.startswith("/"):
                continue          # pipes, sockets, other anonymous inodes
            flags = _fd_flags(pid, e.name)
            if flags is None:
                continue
            if flags & O_DIRECT:
                direct += 1
            if flags & O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                try:
                    st = os.stat(e.path)
                except OSError:
                    continue
                key = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
                if key in keys:
                    writable.add(key)
    return writable, async_io, direct


def _own_fd_details(keys: set[ObjectKey]) -> tuple[set[ObjectKey], str, int]:
    """_fd_details of this process: its descriptors asked directly (fstat, F_GETFL) instead of
    through /proc/PID/fdinfo (~20 us each; migrate holds dozens, and is a holder: its views and
    the ledger's descriptors)."""
    writable: set[ObjectKey] = set()
    async_io = ""
    direct = 0
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            st = os.fstat(fd)
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[io_uring]":
                async_io = "io_uring"
                continue
        except OSError:
            continue                  # (closed meanwhile, or the listing's own descriptor)
        if not stat.S_ISREG(st.st_mode):
            continue
        if flags & O_DIRECT:
            direct += 1
        key = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
        if key in keys and flags & O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
            writable.add(key)
    return writable, async_io, direct


def _fd_flags(pid: str, fd: str) -> int | None:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
            for line in f.read().splitlines():
                if line.startswith(b"flags:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        return None
    return None


def read_counters(h: Holder) -> None:
    """Fill h's syscw/syscr, cminflt, VmPin (left at -1/0 when unreadable: the process
    exited, or no rights)."""
    pid = h.pid
    try:
        with open(f"/proc/{pid}/io", "rb") as f:
            for line in f.read().splitlines():
                k, _, v = line.partition(b":")
                if k == b"syscw":
                    h.syscw = int(v)
                elif k == b"syscr":
                    h.syscr = int(v)
    except (OSError, ValueError):
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        h.ppid, h.cminflt = int(fields[1]), int(fields[8])
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f.read().splitlines():
                if line.startswith(b"VmPin:"):
                    h.vm_pin_kb = int(line.split()[1])
                    break
    except (OSError, ValueError, IndexError):
        pass


def scan_holders(keys: Iterable[ObjectKey], *, skip: Iterable[int] = ()) -> HolderScan:
    """Every process (minus those in skip) that maps one of the objects or has one open, with
    its counters; and every process seen (a new one's parent is found with parent_of).  The
    pass over /proc runs in C (csrc/procscan.c, without the GIL); each holder found is then read
    in detail here."""
    t0 = time.perf_counter()
    keyset = set(keys)
    skipped = set(skip)
    flat = ffi.new("uint64_t[]", [x for k in sorted(keyset) for x in k] or [0])
    room = 1024
    text = ffi.new("char[]", TEXT_ROOM)
    while True:
        pids = ffi.new("int32_t[]", room)
        flags = ffi.new("uint8_t[]", room)
        offs = ffi.new("uint32_t[]", room)
        lens = ffi.new("uint32_t[]", room)
        seen = ffi.new("uint64_t *")
        check(lib.mg_proc_holders(flat, len(keyset), pids, flags, room, seen, text, TEXT_ROOM,
                                  offs, lens), "scan /proc")
        if seen[0] <= room:
            break
        room = seen[0] + 256          # (processes started meanwhile: room to spare)
    needles = _needles(keyset)
    holders: dict[int, Holder] = {}
    all_pids: set[int] = set()
    for i in range(seen[0]):
        pid = pids[i]
        all_pids.add(pid)
        f = flags[i]
        if not f & 3 or pid in skipped:
            continue
        if f & 16:                    # (its lines did not fit: read them here)
            lines = _read(pid)
        else:
            lines = ffi.unpack(text + offs[i], lens[i])
        maps = _matching(lines, needles, keyset) if lines else []
        writable, async_io, direct = _fd_details(str(pid), keyset)
        if not maps and not (f & 2):
            continue                  # (unmapped it since)
        if f & 4 or (f & 16 and lines and b"/[aio]" in lines):
            async_io = async_io or "aio"
        h = Holder(pid, maps=maps, writable=writable, async_io=async_io, direct_fds=direct)
        read_counters(h)
        holders[pid] = h
    return HolderScan(holders, all_pids, time.perf_counter() - t0)


def parent_of(pid: int) -> int:
    """pid's parent pid (0 when gone)."""
    return _ppid(str(pid))
