"""Shared memory objects (memfd, shmem, shared anonymous) seen from outside the target.

The page cache is the truth for shmem: the object is opened through /proc/PID/map_files (needs
CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE), read with pread, which never touches the target's page
tables, and its holes are found with SEEK_DATA/SEEK_HOLE.
"""

from __future__ import annotations

import errno
import os

from ..errors import TargetGoneError, UnsupportedError
from .maps import Region, mappings_in, read_maps


def open_object(pid: int, region: Region, maps: list | None = None) -> int:
    """A read-only descriptor of the memory object behind a shared region (maps: the process's
    mappings if the caller just read them; the object's inode is checked either way)."""
    if maps is None:
        maps = read_maps(pid)
    vmas = [m for m in mappings_in(maps, region.start, region.end)
            if (m.dev, m.inode) == (region.dev, region.inode)]
    if not vmas:
        raise TargetGoneError(f"region {region.name} is no longer mapped in process {pid}")
    m = vmas[0]
    path = f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TargetGoneError(f"{path} vanished (process {pid} exited or unmapped it)") from None
    except PermissionError:
        raise UnsupportedError(f"cannot open {path}: needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE (run as root)") from None
    st = os.fstat(fd)
    if st.st_ino != region.inode:
        os.close(fd)
        raise TargetGoneError(f"region {region.name}: object changed under {path}")
    return fd


def data_extents(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """Byte ranges [a, b) within [start, end) that hold data (not holes).  Swapped pages are data."""
    out = []
    pos = start
    while pos < end:
        try:
            a = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:      # no data after pos
                break
            raise
        if a >= end:
            break
        b = os.lseek(fd, a, os.SEEK_HOLE)
        out.append((a, min(b, end)))
        pos = b
    return out
