"""Composite tracker (the default): a PTE-based tracker for private memory, write-protect on every
mapper of the shared memory where the kernel allows it, and the shmem ledger for shared memory.
The PTE tracker is exact for private memory (every write goes through the target's page tables);
for shared objects PTE information can be lost (a mapper found late, a mapping gone, pwrite,
fallocate, DMA), so they also go to the ledger, which looks at the contents.  The union is exact
for every write path."""

from __future__ import annotations

import time

from ..kernel.maps import Region, RegionKind
from .base import DirtyPages, Tracker, TrackerStatistics
from .ledger import LedgerRegistry, LedgerTracker
from .mappers import MapperTracker


def is_shared(r: Region) -> bool:
    return r.kind == RegionKind.SHARED


class CompositeTracker(Tracker):
    def __init__(self, pid: int, regions: list[Region], private: Tracker | None,
                 registry: LedgerRegistry | None = None, *, mappers: Tracker | None = None,
                 pool=None, notes: list[str] | None = None):
        """mappers: page-table tracking of the shared regions (MapperTracker); pool: the
        UffdPool the parts took their userfaultfds from (closed by end()); notes: why a
        mechanism was not used (for the report's tracker_detail)."""
        super().__init__(pid, regions)
        shared = [r for r in regions if is_shared(r)]
        self.private = private
        self.mappers = mappers
        self.pool = pool
        self.notes = list(notes or [])
        self.ledger = LedgerTracker(pid, shared, registry) if shared else None
        self.name = "+".join([p.name for p in self.parts()]) or "none"

    def parts(self) -> list[Tracker]:
        return [p for p in (self.private, self.mappers, self.ledger) if p is not None]

    def use_views(self, views: dict) -> None:
        """Mappings of shared regions for the ledger to sweep from (LedgerTracker.use_views)."""
        if isinstance(self.ledger, LedgerTracker):
            self.ledger.use_views(views)

    def begin(self) -> None:
        self._begin(from_sends=False)

    def begin_from_sends(self) -> set[str]:
        """begin(), with the ledger armed by LedgerTracker.begin_from_sends: returns the regions
        whose baseline record_sent() must be given (what round 0 sends)."""
        return self._begin(from_sends=True)

    def _begin(self, from_sends: bool) -> set[str]:
        started: list[Tracker] = []
        lazy: set[str] = set()
        try:
            for p in self.parts():
                if from_sends and isinstance(p, LedgerTracker):
                    lazy = p.begin_from_sends()
                else:
                    p.begin()
                started.append(p)
        except BaseException:
            for p in started:
                p.end()
            if self.pool is not None:
                self.pool.close()
            raise
        return lazy

    def record_sent(self, region_name: str, data_flat, zero_flat, hashes: bytes) -> None:
        if isinstance(self.ledger, LedgerTracker):
            self.ledger.record_sent(region_name, data_flat, zero_flat, hashes)

    def rewritten_fraction(self, samples: dict[str, list[int]]) -> float | None:
        """The ledger's (LedgerTracker.rewritten_fraction)."""
        return self.ledger.rewritten_fraction(samples) if isinstance(self.ledger, LedgerTracker) else None

    def known_hashes(self) -> dict[str, object]:
        """The ledger's (LedgerTracker.known_hashes)."""
        return self.ledger.known_hashes() if isinstance(self.ledger, LedgerTracker) else {}

    def collect(self, final: bool = False, exclude: frozenset[str] = frozenset()) -> DirtyPages:
        t0 = time.perf_counter()
        out = DirtyPages(pages={})
        for p in self.parts():
            out.merge(p.collect(final, exclude) if isinstance(p, (LedgerTracker, MapperTracker))
                      else p.collect(final))
        out.cost_s = time.perf_counter() - t0
        return self._account(out)

    def final_collect_estimate_s(self) -> float:
        return sum(p.final_collect_estimate_s() for p in self.parts())

    def end(self) -> None:
        for p in self.parts():
            p.end()
        if self.pool is not None:
            self.pool.close()

    def memory_bytes(self) -> int:
        return sum(p.memory_bytes() for p in self.parts())

    def writer_pids(self) -> set[int]:
        return set().union(*(p.writer_pids() for p in self.parts()))

    def statistics(self) -> TrackerStatistics:
        base = super().statistics()
        lines = []
        for p in self.parts():
            d = p.statistics().detail       # e.g. where a write-protect part's uffd came from
            lines.append(f"{p.name}: {', '.join(r.name for r in p.regions)}" + (f" ({d})" if d else ""))
        return TrackerStatistics(**{**base.__dict__, "detail": "; ".join([*lines, *self.notes])})
