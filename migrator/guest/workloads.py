"""Dirtying workloads: which pages a writer stamps, how fast.  The loop itself runs in C
(mg_run in csrc/guest.c) with the GIL released; this module sets it up and keeps its memory."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import UsageError
from ._native import PAGE_SIZE, check, ffi, lib

# workload kind -> the C loop's kind number
WORKLOADS = {"idle": 0, "random": 1, "hotcold": 2, "sweep": 3, "counter": 4}
SLICE = 0.01            # seconds per rate-control slice


def check_kind(kind: str) -> str:
    """kind itself, or UsageError naming the known kinds."""
    if kind not in WORKLOADS:
        raise UsageError(f"unknown workload {kind!r}: expected one of {', '.join(WORKLOADS)}")
    return kind


@dataclass(frozen=True)
class WorkloadSpec:
    """A seeded, repeatable write pattern.

    kind: idle | random (uniform) | hotcold | sweep (every page in order, wrapping) | counter
        (every page in order, wrapping, as sweep; a page that holds its stamp already keeps its
        body, and only its 32-byte header changes: a counter or a record header updated in
        place, what delta batches send in a few bytes; pages written by pwrite are stamped whole).
    rate: bytes/s of page writes (4 KiB stamped a write, or a header rewritten); < 0 = as fast
        as possible.
    hot_fraction: hotcold: share of the pages in the hot set (a contiguous run at a seeded place).
    hot_share: hotcold: share of the writes that go to the hot set.
    """

    kind: str = "idle"
    rate: float = 0.0
    seed: int = 0
    hot_fraction: float = 0.1
    hot_share: float = 0.9

    def __post_init__(self) -> None:
        check_kind(self.kind)
        if not 0 < self.hot_fraction <= 1:
            raise UsageError(f"hot fraction {self.hot_fraction} must be in (0, 1]")
        if not 0 <= self.hot_share <= 1:
            raise UsageError(f"hot share {self.hot_share} must be in [0, 1]")


@dataclass(frozen=True)
class Target:
    """A run of pages a writer writes: mapped at address (or pwritten into fd at fd_offset)."""

    npages: int
    first_index: int      # region page index of the first page
    region: int           # stamp region id
    address: int = 0      # 0: no mapping, pwrite into fd
    fd: int = -1
    fd_offset: int = 0    # bytes


def hot_range(spec: WorkloadSpec, total: int) -> tuple[int, int]:
    """[start, end) of the hot set in the workload's page space (concatenated targets)."""
    if total == 0:
        return (0, 0)
    n = max(1, min(total, round(total * spec.hot_fraction)))
    start = random.Random(spec.seed).randrange(0, total - n + 1)
    return (start, start + n)


class WriteLoop:
    """A C write loop over targets, stamping as writer `writer`, rate read from ctl_slot."""

    def __init__(self, spec: WorkloadSpec, targets: list[Target], ctl_slot, writer: int,
                 page_size: int = PAGE_SIZE, slice_s: float = SLICE) -> None:
        self.spec = spec
        self._ctargets = ffi.new("struct mg_target[]", max(len(targets), 1))
        for i, t in enumerate(targets):
            c = self._ctargets[i]
            c.base = ffi.cast("uint8_t *", t.address) if t.address else ffi.NULL
            c.fd, c.fd_offset = t.fd, t.fd_offset
            c.npages, c.first_index, c.region = t.npages, t.first_index, t.region
        self.total = sum(t.npages for t in targets)
        self.hot = hot_range(spec, self.total)
        self._scratch = ffi.new("uint8_t[]", page_size)
        w = self._w = ffi.new("struct mg_workload *")
        w.kind = WORKLOADS[spec.kind] if self.total else 0
        w.writer = writer
        w.page_size = page_size
        w.hot_start, w.hot_pages = self.hot[0], self.hot[1] - self.hot[0]
        w.hot_share = spec.hot_share
        w.slice = slice_s
        w.targets, w.ntargets = self._ctargets, len(targets)
        w.ctl = ctl_slot
        w.scratch = self._scratch
        check(lib.mg_workload_init(w, spec.seed & (2**64 - 1)), "mg_workload_init")
        ctl_slot.rate = spec.rate / page_size if spec.rate >= 0 else -1.0

    def run(self, seconds: float) -> int:
        """Write for up to seconds (less if the stop flag is set).  Returns pages written."""
        return check(lib.mg_run(self._w, seconds), "mg_run")


def populate(target: Target, page_size: int = PAGE_SIZE, writer: int = 0) -> int:
    """Stamp every page of a mapped target as the populate writer (seq 0; writer: its id,
    with the text flag if so: stamp.writer_id).  Returns pages."""
    t = ffi.new("struct mg_target *")
    t.base = ffi.cast("uint8_t *", target.address)
    t.fd, t.npages, t.first_index, t.region = -1, target.npages, target.first_index, target.region
    return check(lib.mg_stamp_target(t, page_size, writer), "mg_stamp_target")
