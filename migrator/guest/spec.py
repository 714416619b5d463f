"""What a guest is made of (GuestSpec) and where each writer writes in it (Layout)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from ..errors import UsageError
from ._native import PAGE_SIZE
from .workloads import WorkloadSpec

TARGETS = ("shared", "anon", "both")
SIDE_SHARE = 8          # a side writer's default area: 1/8 of the populated shared pages


@dataclass(frozen=True)
class PageoutRange:
    """A range the pager pushes out: region name or kind, offset and length in bytes
    (length 0 = to the end of the region's populated part)."""

    region: str
    offset: int = 0
    length: int = 0


@dataclass(frozen=True)
class GuestSpec:
    """A guest: sizes in bytes, rates in bytes/s, intervals in seconds.

    The vcpu workload writes the shared block (except the side writers' areas and the tail)
    and/or the anonymous block (except its tail), as `target` says.  vhost and pwrite side writers
    each own a disjoint area of the shared block (vhost_size/pwrite_size bytes, default 1/8 of
    its populated part), so no page ever has two writers at once and every page stays
    consistent.  The pager pushes pager_ranges (default: both populated parts) out every
    pager_interval seconds.
    """

    shared_ram: int = 64 << 20
    anon_ram: int = 16 << 20
    name: str = "guest-ram"
    shared_tail: int = 0          # bytes at the end of the shared block never touched
    anon_tail: int = 0
    workload: WorkloadSpec = WorkloadSpec()
    target: str = "both"
    vhost: WorkloadSpec | None = None
    vhost_size: int = 0
    pwrite: WorkloadSpec | None = None
    pwrite_size: int = 0
    pager_interval: float | None = None
    pager_ranges: tuple[PageoutRange, ...] = ()
    uffd: bool = False
    content: str = "stamp"        # page bodies: "stamp" (incompressible) or "text" (compressible)

    def __post_init__(self) -> None:
        if self.content not in ("stamp", "text"):
            raise UsageError(f"unknown page content {self.content!r}: expected stamp or text")
        if self.target not in TARGETS:
            raise UsageError(f"unknown target {self.target!r}: expected one of {', '.join(TARGETS)}")
        if not self.name or "/" in self.name:
            raise UsageError(f"bad memfd name {self.name!r}")
        if self.pager_interval is not None and self.pager_interval <= 0:
            raise UsageError(f"pager interval {self.pager_interval} must be > 0 seconds")
        lay = Layout.of(self)       # raises on sizes that do not fit
        sizes = {self.name: lay.shared_pages, "shared": lay.shared_pages, "anon": lay.anon_pages}
        for pr in self.pager_ranges:
            if pr.region not in sizes or (pr.region == "anon" and not lay.anon_pages):
                raise UsageError(f"pageout range names region {pr.region!r}: expected "
                                 f"{self.name}, shared or anon")
            if pr.offset < 0 or pr.length < 0 or pr.offset + pr.length > sizes[pr.region] * PAGE_SIZE:
                raise UsageError(f"pageout range {pr.region}:{pr.offset}:{pr.length} is outside "
                                 f"the region ({sizes[pr.region] * PAGE_SIZE} bytes)")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "GuestSpec":
        d = json.loads(text)
        for k in ("workload", "vhost", "pwrite"):
            if d[k] is not None:
                d[k] = WorkloadSpec(**d[k])
        d["pager_ranges"] = tuple(PageoutRange(**r) for r in d["pager_ranges"])
        return cls(**d)


def _pages(nbytes: int, what: str, page_size: int) -> int:
    if nbytes < 0:
        raise UsageError(f"{what} must not be negative")
    return -(-nbytes // page_size)


@dataclass(frozen=True)
class Layout:
    """Page index ranges [start, end) inside each block."""

    shared_pages: int
    anon_pages: int
    vcpu: tuple[int, int]        # shared block
    vhost: tuple[int, int]       # shared block
    pwrite: tuple[int, int]      # shared block
    shared_tail: tuple[int, int]
    anon_populated: tuple[int, int]
    anon_tail: tuple[int, int]

    @classmethod
    def of(cls, spec: GuestSpec, page_size: int = PAGE_SIZE) -> "Layout":
        sp = _pages(spec.shared_ram, "shared RAM size", page_size)
        ap = _pages(spec.anon_ram, "anon RAM size", page_size)
        if sp == 0:
            raise UsageError("shared RAM size must be at least one page")
        st = _pages(spec.shared_tail, "shared tail", page_size)
        at = _pages(spec.anon_tail, "anon tail", page_size)
        if st > sp or at > ap:
            raise UsageError("a never-touched tail is larger than its block")
        pop = sp - st

        def side(ws: WorkloadSpec | None, size: int, what: str) -> int:
            if ws is None:
                return 0
            n = _pages(size, what, page_size) if size else max(1, pop // SIDE_SHARE)
            return n

        nv = side(spec.vhost, spec.vhost_size, "vhost area size")
        npw = side(spec.pwrite, spec.pwrite_size, "pwrite area size")
        if nv + npw > pop:
            raise UsageError(f"side writer areas ({nv + npw} pages) exceed the populated shared "
                             f"RAM ({pop} pages)")
        a = pop - nv - npw
        return cls(shared_pages=sp, anon_pages=ap, vcpu=(0, a), vhost=(a, a + nv),
                   pwrite=(a + nv, pop), shared_tail=(pop, sp), anon_populated=(0, ap - at),
                   anon_tail=(ap - at, ap))
