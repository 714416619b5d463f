"""Which processes map a shared memory object: a scan of /proc/*/maps by device + inode.

A memfd, a shared anonymous region, a tmpfs file or a SysV segment is one object however many
processes map it, and a write through any of their mappings changes it without touching the other
processes' page tables.  Tracking it by page tables therefore means tracking every mapper.  The
scan reads each process's maps file and parses only the lines that name one of the objects (a
byte search for " MAJ:MIN INODE " first), so it costs about 10 us a process, whatever the memory
size.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from .maps import Mapping, parse_maps_text

ObjectKey = tuple[int, int, int]          # (major, minor, inode), as Region.object_key


def _needles(keys: Iterable[ObjectKey]) -> list[bytes]:
    return [f" {ma:02x}:{mi:02x} {ino} ".encode() for ma, mi, ino in keys]


def _matching(text: bytes, needles: list[bytes], keys: set[ObjectKey]) -> list[Mapping]:
    """The shared mappings of the objects in the text of a maps file: only the lines holding a
    needle are cut out and parsed (a maps file can have thousands of lines)."""
    lines: dict[int, bytes] = {}
    for n in needles:
        i = text.find(n)
        while i >= 0:
            a = text.rfind(b"\n", 0, i) + 1
            b = text.find(b"\n", i)
            b = len(text) if b < 0 else b
            lines[a] = text[a:b]
            i = text.find(n, b)
    if not lines:
        return []
    maps = parse_maps_text(b"\n".join(lines[a] for a in sorted(lines)).decode(errors="replace"))
    return [m for m in maps if m.shared and (m.dev[0], m.dev[1], m.inode) in keys]


def _read(pid: int | str) -> bytes | None:
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            return f.read()
    except OSError:
        return None                        # exited, or a kernel thread we cannot read


def mappings_of(pid: int, keys: set[ObjectKey]) -> list[Mapping]:
    """The shared mappings of process pid that map one of the objects ([] when it is gone)."""
    text = _read(pid)
    return _matching(text, _needles(keys), keys) if text else []


def find_mappers(keys: set[ObjectKey], *, skip: Iterable[int] = ()) -> dict[int, list[Mapping]]:
    """Every process (thread groups from /proc, minus those in skip) that maps one of the
    objects, with those mappings."""
    skipped = set(skip)
    needles = _needles(keys)
    out: dict[int, list[Mapping]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skipped:
            continue
        text = _read(name)
        found = _matching(text, needles, keys) if text else []
        if found:
            out[int(name)] = found
    return out
