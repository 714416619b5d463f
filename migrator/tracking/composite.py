"""Composite tracker (the default): a PTE-based tracker for private memory, write-protect on every
mapper of the shared memory where the kernel allows it, and the shmem ledger for shared memory.
The PTE tracker is exact for private memory (every write goes through the target's page tables);
for shared objects PTE information can be lost (a mapper found late, a mapping gone, pwrite,
fallocate, DMA), so the ledger, which looks at the contents, sweeps an object whenever the sweep
gate (sweepgate.py) cannot show that every write to it since the previous collect went through
tracked page tables.  Without write-protect tracking of the mappers, it sweeps every object at
every collect.  The union is exact for every write path; each sweep is reported with its reason
(DirtyPages.sweeps)."""

from __future__ import annotations

import time
from typing import Mapping

from ..kernel.maps import Region, RegionKind
from .base import DirtyPages, RegionEvent, Tracker, TrackerStatistics
from .ledger import LedgerRegistry, LedgerTracker
from .mappers import MapperTracker
from .sweepgate import Sweep, SweepGate


def is_shared(r: Region) -> bool:
    return r.kind == RegionKind.SHARED


class PartsTracker(Tracker):
    """A tracker made of parts, each tracking some of the regions: begin, end, memory, writers
    and statistics over the parts; collect() and parts() are the subclass's."""

    def __init__(self, pid: int, regions: list[Region], pool=None, notes: list[str] | None = None):
        """pool: the UffdPool the parts took their userfaultfds from (closed by end()); notes:
        why a mechanism was not used (for the report's tracker_detail)."""
        super().__init__(pid, regions)
        self.pool = pool
        self.notes = list(notes or [])

    def parts(self) -> list[Tracker]:
        raise NotImplementedError

    def begin(self) -> None:
        started: list[Tracker] = []
        try:
            for p in self.parts():
                p.begin()
                started.append(p)
        except BaseException:
            self._abort(started)
            raise

    def _abort(self, started: list[Tracker]) -> None:
        """A begin failed: end the parts begun, free the pool."""
        for p in started:
            p.end()
        if self.pool is not None:
            self.pool.close()

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


class PairTracker(PartsTracker):
    """A tracker of private memory beside full hashing of the shared regions, where their
    objects cannot be opened (no /proc/PID/map_files access): no ledger, no sweep gate."""

    def __init__(self, pid: int, regions: list[Region], private: Tracker, hashed: Tracker,
                 pool=None, notes: list[str] | None = None):
        super().__init__(pid, regions, pool, notes)
        self.private, self.hashed = private, hashed
        self.name = f"{private.name}+{hashed.name}"

    def parts(self) -> list[Tracker]:
        return [self.private, self.hashed]

    def collect(self, final: bool = False) -> DirtyPages:
        t0 = time.perf_counter()
        out = DirtyPages(pages={})
        for p in self.parts():
            out.merge(p.collect(final))
        out.cost_s = time.perf_counter() - t0
        return self._account(out)

    def final_collect_estimate_s(self) -> float:
        return sum(p.final_collect_estimate_s() for p in self.parts())


class CompositeTracker(PartsTracker):
    def __init__(self, pid: int, regions: list[Region], private: Tracker | None,
                 registry: LedgerRegistry | None = None, *, mappers: Tracker | None = None,
                 pool=None, notes: list[str] | None = None,
                 no_syscall_writes: set[int] | None = None):
        """mappers: page-table tracking of the shared regions (MapperTracker); pool: the
        UffdPool the parts took their userfaultfds from (closed by end()); notes: why a
        mechanism was not used (for the report's tracker_detail); no_syscall_writes: processes
        known never to write the shared objects by system call (SweepGate)."""
        super().__init__(pid, regions, pool, notes)
        shared = [r for r in regions if is_shared(r)]
        self.private = private
        self.mappers = mappers
        self.ledger: LedgerTracker | None = LedgerTracker(pid, shared, registry) if shared else None
        self.shared = shared
        # without page-table tracking of every mapper, nothing can show an object unchanged
        self.gate = SweepGate(shared, {}, no_syscall_writes=no_syscall_writes) \
            if shared and mappers is not None else None
        self.name = "+".join([p.name for p in self.parts()]) or "none"

    def parts(self) -> list[Tracker]:
        return [p for p in (self.private, self.mappers, self.ledger) if p is not None]

    def content_baseline(self) -> "CompositeTracker | None":
        """Itself where it has shared regions (the ledger's content baseline: base.ContentBaseline)."""
        return self if self.ledger is not None else None

    def use_views(self, views: Mapping[str, object]) -> None:
        """Mappings of shared regions for the ledger to sweep from (LedgerTracker.use_views).
        (The sweep gate keeps views of its own, in a holder process: see SweepGate._open_views.)"""
        if self.ledger is not None:
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
                if from_sends and p is self.ledger:
                    lazy = self.ledger.begin_from_sends()
                else:
                    p.begin()
                started.append(p)
            if self.gate is not None and self.ledger is not None:
                self.gate.fds = self.ledger.object_fds()
                self.gate.start()
                if isinstance(self.mappers, MapperTracker):
                    self.mappers.ignore(self.gate.helper_pids)
        except BaseException:
            self._abort(started)
            raise
        return lazy

    def record_sent(self, region_name: str, data_flat, zero_flat, hashes: bytes) -> None:
        if self.ledger is not None:
            self.ledger.record_sent(region_name, data_flat, zero_flat, hashes)

    def mark_reading(self, region_name: str, flat) -> None:
        if self.ledger is not None:
            self.ledger.mark_reading(region_name, flat)

    def rewritten_fraction(self, samples: dict[str, list[int]]) -> float | None:
        """The ledger's (LedgerTracker.rewritten_fraction)."""
        return self.ledger.rewritten_fraction(samples) if self.ledger is not None else None

    def known_hashes(self) -> dict[str, object]:
        """The ledger's (LedgerTracker.known_hashes)."""
        return self.ledger.known_hashes() if self.ledger is not None else {}

    def collect(self, final: bool = False, exclude: frozenset[str] = frozenset(),
                defer: frozenset[str] = frozenset()) -> DirtyPages:
        """exclude: regions not collected at all; defer: shared regions whose sweep, if one
        is needed, the caller does (a sender comparing every page with known_hashes() as it
        sends): they are listed in the result's `unswept` instead."""
        t0 = time.perf_counter()
        out = DirtyPages(pages={})
        parts: dict[str, float] = {}

        def lap(name: str) -> None:
            parts[name] = round((time.perf_counter() - t0) * 1000 - sum(parts.values()), 2)

        if self.gate is not None:
            self.gate.begin_holes_check(final)
        # the final collect scans /proc for holders beside the page-table walks (the source is
        # paused: MapperTracker.collect); a live one first, as new mappers found are armed
        beside = final and self.gate is not None and isinstance(self.mappers, MapperTracker)
        pending = self.gate.observe_beside() if beside else None
        scan = self.gate.observe() if self.gate is not None and not beside else None
        lap("holders")
        if self.private is not None:
            out.merge(self.private.collect(final))
            lap(self.private.name)
        if isinstance(self.mappers, MapperTracker):
            def found() -> dict | None:
                nonlocal scan
                if pending is not None:
                    scan = pending.result()
                return {pid: h.maps for pid, h in scan.holders.items() if h.maps} if scan else None
            out.merge(self.mappers.collect(final, exclude, found=found))
        elif self.mappers is not None:
            out.merge(self.mappers.collect(final))
        if self.mappers is not None:
            lap(self.mappers.name)
        if self.ledger is None:
            out.cost_s = time.perf_counter() - t0
            out.parts_ms = parts
            return self._account(out)
        sweeps = self._sweeps(scan, out)
        lap("gate")
        swept = {name for s in sweeps for name in s.regions}
        # an object not swept whole still has its pages out of sight of page tables hashed:
        # those absent from migrator's view of it (SweepGate.unseen)
        unseen = self.gate.unseen if self.gate is not None else {}
        swept_keys = {r.object_key for r in self.shared if r.name in swept}
        only = {r.object_key: unseen[r.object_key] for r in self.shared
                if r.object_key not in swept_keys and unseen.get(r.object_key)}
        skip = {r.name for r in self.shared if r.name not in swept and r.object_key not in only}
        deferred = (swept & defer) - exclude
        mine = scan.holders.get(self.pid) if scan is not None else None
        out.merge(self.ledger.collect(final, exclude | skip | deferred,
                                      maps=mine.maps if mine is not None else None, only=only))
        if self.gate is not None:
            for r in self.shared:
                n = self.gate.left_view.get(r.object_key, 0)
                if n and r.name not in swept and r.name not in exclude:
                    out.events.append(RegionEvent(r.name, "pages-left-view", (
                        f"{n} of its pages left migrator's view of it (punched, removed, "
                        "truncated or reclaimed): hashed alone")))
        lap(self.ledger.name)
        if pending is not None and scan is not None:     # (within the walks' time: not added)
            parts["holders, beside the walks"] = round(scan.scan_s * 1000, 2)
        out.sweeps.extend(sweeps)
        out.unswept |= deferred
        out.cost_s = time.perf_counter() - t0
        out.parts_ms = parts
        return self._account(out)

    def _sweeps(self, scan, out: DirtyPages) -> list[Sweep]:
        """The objects the ledger must sweep in this collect, with why."""
        if self.gate is None or scan is None:
            why = "; ".join(self.notes) or "the processes that map it are not write-protect tracked"
            keys: dict = {}
            for r in self.shared:
                keys.setdefault(r.object_key, []).append(r)
            return [Sweep(k, tuple(r.name for r in rs), sum(r.size for r in rs),
                          f"no page-table tracking of its mappers ({why})") for k, rs in keys.items()]
        uncovered: dict = {}
        if isinstance(self.mappers, MapperTracker):
            uncovered.update(self.mappers.untracked())
        by_name = {r.name: r.object_key for r in self.shared}
        for e in out.events:
            if e.what.startswith("mapper-") and e.region in by_name:
                uncovered.setdefault(by_name[e.region], f"{e.what}: {e.detail}")
        if self.ledger is not None:
            self.gate.fds = self.ledger.object_fds()     # (a grown ledger reopens its object)
        return list(self.gate.decide(scan, uncovered).values())

    def final_collect_estimate_s(self) -> float:
        """The page-table parts' last cost, the gate's /proc scan, and a sweep of each object
        the previous collect had to sweep (a sender's scanning send included)."""
        est = sum(p.final_collect_estimate_s() for p in (self.private, self.mappers) if p is not None)
        if self.ledger is None:
            return est
        if self.gate is None:
            return est + self.ledger.sweep_estimate_s(None)
        return est + self.gate.scan_s + self.ledger.sweep_estimate_s(set(self.gate.last))

    def end(self) -> None:
        if self.gate is not None:
            self.gate.close()
        super().end()
