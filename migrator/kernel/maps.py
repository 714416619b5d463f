"""/proc/PID/maps as typed mappings, and the regions users select from them.

A Region is what the engine tracks and moves: a contiguous address range of one kind, named so a
user can pick it (`guest-ram` for `/memfd:guest-ram (deleted)`, `[heap]`, or `anon@7f12...`).
Shared regions carry the identity of their memory object (device, inode, offset), which is what the
shmem ledger keys on.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass

from ..errors import RegionError, TargetGoneError, UsageError
from .native import PAGE_SIZE


class RegionKind(str, enum.Enum):
    ANON = "anon"        # private anonymous (incl. [heap], [stack])
    SHARED = "shared"    # shmem: memfd, shared anonymous (/dev/zero), SysV, tmpfs files
    FILE = "file"        # file-backed (private or shared)
    SPECIAL = "special"  # [vvar], [vdso], [vsyscall]: never migrated


_SPECIAL = {"[vvar]", "[vdso]", "[vsyscall]", "[vvar_vclock]", "[uprobes]"}
_SHMEM_PREFIXES = ("/memfd:", "/dev/zero", "/SYSV", "/dev/shm/")
_LINE = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+)\s+([rwxsp-]{4})\s+([0-9a-f]+)\s+([0-9a-f]+):([0-9a-f]+)\s+(\d+)\s*(.*)$"
)


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/PID/maps (one VMA).  Addresses and offset in bytes."""

    start: int
    end: int
    perms: str
    offset: int
    dev: tuple[int, int]
    inode: int
    path: str

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def kind(self) -> RegionKind:
        p = self.path
        if p in _SPECIAL:
            return RegionKind.SPECIAL
        if self.shared and (p.startswith(_SHMEM_PREFIXES) or (self.inode and self.dev[0] == 0 and not p.startswith("/"))):
            return RegionKind.SHARED
        if p == "" or (p.startswith("[") and p.endswith("]")) or p.startswith("[anon:"):
            return RegionKind.SHARED if self.shared else RegionKind.ANON
        return RegionKind.FILE

    @property
    def name(self) -> str:
        """The name a user selects this mapping by."""
        p = self.path
        if p.startswith("/memfd:"):
            p = p[len("/memfd:"):]
            return p[: -len(" (deleted)")] if p.endswith(" (deleted)") else p
        if p == "":
            return f"anon@{self.start:x}"
        if p.endswith(" (deleted)"):
            p = p[: -len(" (deleted)")]
        return p

    @property
    def identity(self) -> tuple:
        """What stays the same while this VMA is the same mapping of the same object."""
        return (self.start, self.end, self.dev, self.inode, self.offset, self.perms[3])


@dataclass(frozen=True)
class Region:
    """A tracked range [start, end) of one kind, in bytes.  Page i is at start + i * page_size.

    For SHARED regions, dev/inode name the memory object and offset is the byte offset of `start`
    inside it; the ledger hashes object pages [offset / page_size, ... + npages).
    """

    name: str
    kind: RegionKind
    start: int
    end: int
    dev: tuple[int, int] = (0, 0)
    inode: int = 0
    offset: int = 0
    path: str = ""

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def npages(self) -> int:
        return self.size // PAGE_SIZE

    @property
    def object_key(self) -> tuple[int, int, int]:
        """(major, minor, inode) of the shared memory object."""
        return (self.dev[0], self.dev[1], self.inode)

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind.value, "start": self.start, "end": self.end,
                "size": self.size}


def parse_maps_text(text: str) -> list[Mapping]:
    """Parse the text of a maps file.  Lines that do not parse raise ValueError (a kernel change)."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        m = _LINE.match(line)
        if not m:
            raise ValueError(f"unparsable maps line: {line!r}")
        out.append(Mapping(
            start=int(m.group(1), 16), end=int(m.group(2), 16), perms=m.group(3),
            offset=int(m.group(4), 16), dev=(int(m.group(5), 16), int(m.group(6), 16)),
            inode=int(m.group(7)), path=m.group(8).strip(),
        ))
    return out


def read_maps(pid: int) -> list[Mapping]:
    """The mappings of process pid.  Raises TargetGoneError if it does not exist."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            text = f.read()
    except FileNotFoundError:
        raise TargetGoneError(f"process {pid} does not exist (or exited)") from None
    except ProcessLookupError:
        raise TargetGoneError(f"process {pid} exited") from None
    except PermissionError:
        raise RegionError(f"cannot read /proc/{pid}/maps: permission denied (run as root or as the process owner)") from None
    if not text and not os.path.exists(f"/proc/{pid}/exe"):
        raise TargetGoneError(f"process {pid} exited")
    return parse_maps_text(text)


def _region_of(group: list[Mapping], name: str | None = None) -> Region:
    first = group[0]
    return Region(
        name=name or first.name, kind=first.kind, start=first.start, end=group[-1].end,
        dev=first.dev, inode=first.inode, offset=first.offset, path=first.path,
    )


def _merge_adjacent(maps: list[Mapping]) -> list[list[Mapping]]:
    """Group adjacent VMAs that are one region: same kind and object, contiguous (mprotect splits)."""
    groups: list[list[Mapping]] = []
    for m in maps:
        if groups:
            last = groups[-1][-1]
            same_object = (last.kind == m.kind and last.dev == m.dev and last.inode == m.inode
                           and last.path == m.path and last.shared == m.shared)
            contiguous = last.end == m.start and (
                m.kind == RegionKind.ANON or m.offset == last.offset + (last.end - last.start))
            if same_object and contiguous:
                groups[-1].append(m)
                continue
        groups.append([m])
    return groups


_RANGE = re.compile(r"^(?:0x)?([0-9a-fA-F]+)-(?:0x)?([0-9a-fA-F]+)$")
_KIND = re.compile(r"^kind:(anon|shared|file)$")


def select_regions(maps: list[Mapping], selectors: list[str]) -> list[Region]:
    """Regions chosen by selectors, each one of:
    - a mapping name: `guest-ram` (memfd), `[heap]`, a file path;
    - an address range `START-END` in hex (mappings inside it, clipped to it);
    - `kind:anon`, `kind:shared` or `kind:file`.
    Raises RegionError for a selector that matches nothing, UsageError for a malformed one.
    """
    groups = _merge_adjacent([m for m in maps if m.kind != RegionKind.SPECIAL])
    chosen: dict[tuple[int, int], Region] = {}
    for sel in selectors:
        found: list[Region] = []
        rm = _RANGE.match(sel)
        km = _KIND.match(sel)
        if rm:
            lo, hi = int(rm.group(1), 16), int(rm.group(2), 16)
            if lo >= hi or lo % PAGE_SIZE or hi % PAGE_SIZE:
                raise UsageError(f"bad address range {sel!r}: START < END, both page-aligned hex")
            for g in groups:
                a, b = max(lo, g[0].start), min(hi, g[-1].end)
                if a < b:
                    r = _region_of(g)
                    off = r.offset + (a - r.start) if r.kind != RegionKind.ANON else 0
                    name = r.name if (a, b) == (r.start, r.end) else f"{r.name}+{a - r.start:x}"
                    if r.kind == RegionKind.ANON and not r.name.startswith("["):
                        name = f"anon@{a:x}"
                    found.append(Region(name=name, kind=r.kind, start=a, end=b, dev=r.dev,
                                        inode=r.inode, offset=off, path=r.path))
        elif km:
            found = [_region_of(g) for g in groups if g[0].kind.value == km.group(1)]
        else:
            found = [_region_of(g) for g in groups if g[0].name == sel]
            if len(found) > 1:
                # the same object mapped at several places: name them apart by address
                found = [Region(**{**r.__dict__, "name": f"{r.name}@{r.start:x}"}) for r in found]
        if not found:
            raise RegionError(f"no mapping matches {sel!r} (try `migrator regions --pid PID` to list them)")
        for r in found:
            chosen.setdefault((r.start, r.end), r)
    regions = sorted(chosen.values(), key=lambda r: r.start)
    for a, b in zip(regions, regions[1:]):
        if a.end > b.start:
            raise RegionError(f"selected regions overlap: {a.name} and {b.name}")
    names = [r.name for r in regions]
    if len(set(names)) != len(names):
        raise RegionError(f"selected region names are not unique: {names}")
    return regions


def mappings_in(maps: list[Mapping], start: int, end: int) -> list[Mapping]:
    """The VMAs overlapping [start, end)."""
    return [m for m in maps if m.start < end and m.end > start]


def vma_smaps(pid: int | str, addr: int) -> dict[str, str]:
    """The /proc/PID/smaps fields of the VMA holding addr (e.g. "AnonHugePages": "2048 kB",
    "VmFlags": "rd wr mr mw me ac uw"); {} when no VMA holds it.  pid may be "self"."""
    out: dict[str, str] = {}
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and ":" not in head:
                if inside:
                    break
                a, b = (int(x, 16) for x in head.split("-"))
                inside = a <= addr < b
            elif inside:
                key, _, value = line.partition(":")
                out[key] = value.strip()
    return out
