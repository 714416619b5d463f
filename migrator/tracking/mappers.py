"""Write-protect tracking of shared memory through every process that maps it.

A shared object (memfd, shared anonymous, tmpfs, SysV) is written through the page tables of each
process that maps it, and a write through one process's mapping never shows in another's.  So
this tracker finds every mapper of the tracked regions' objects (kernel.mappers: /proc scan by
device + inode; the target itself is one), gives each a userfaultfd from the pool (its own, or
injected), registers and write-protects each of its mappings of the objects, and at every collect
scans each mapping with PAGEMAP_SCAN (report + re-protect in one step) and unions the reports by
object page into the target's regions.

Mappers are looked for again at begin and then at most every `discover_every_s` seconds (each
look reads every process's maps: ~10 us a process); in between, and at the final collect, only
the known mappers and the hints are looked at, when their address-space size changed.  A mapper found
later is registered then: its writes before that are unknown to page tables, and so are writes
through a mapping that went away before a collect scanned it (munmap drops the PTEs).  Such
events are reported ("mapper-added", "mapper-gone", "mapper-untracked"); the shmem ledger, which
reads the objects' contents, is what covers them (and writes by write/pwrite/fallocate, DMA, and
mappers that cannot be injected).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

from ..errors import TargetGoneError, UnsupportedError
from ..kernel.mappers import ObjectKey, find_mappers, mappings_of
from ..kernel.maps import Mapping, Region
from ..kernel.native import PAGE_SIZE, ffi, lib
from ..kernel.pagemap import (PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING,
                              Pagemap)
from ..kernel.process import StatReader, process_exists
from ..kernel.uffd import Userfaultfd
from .base import DirtyPages, RegionEvent, Tracker, TrackerStatistics
from .pageset import PageSet
from .uffds import UffdPool

DISCOVER_EVERY_S = 0.1
PMD_PAGES = 512                # pages one page table maps (2 MiB): where parallel walks are cut
PARALLEL_MIN_PAGES = 1 << 16   # walks of fewer pages in all (256 MiB) run in one thread


@dataclass(frozen=True)
class _Span:
    """One mapping (VMA) of a tracked object in a mapper: [start, end) in the mapper's address
    space, object page `first_page` at start."""

    start: int
    end: int
    key: ObjectKey
    first_page: int

    @classmethod
    def of(cls, m: Mapping) -> "_Span":
        return cls(m.start, m.end, (m.dev[0], m.dev[1], m.inode), m.offset // PAGE_SIZE)

    @property
    def npages(self) -> int:
        return (self.end - self.start) // PAGE_SIZE


@dataclass
class _Mapper:
    pid: int
    uffd: Userfaultfd | None = None
    pagemap: Pagemap | None = None
    spans: list[_Span] = field(default_factory=list)   # registered with its uffd
    seen: list[Mapping] = field(default_factory=list)  # its mappings of the objects, last looked at
    why_not: str = ""                     # why its writes are not tracked (uffd is None)


class _Walk(NamedTuple):
    """One page-table walk of a collect: a mapper's span over one region, from address start
    (pages pages), reported at region page `at`."""

    mapper: _Mapper
    span: _Span
    region: Region
    start: int
    pages: int
    at: int


def _walks_of(m: "_Mapper", s: _Span, wanted: list[Region]) -> list[_Walk]:
    """The walks of span s of mapper m: one per wanted region of its object that it maps."""
    out = []
    for r in wanted:
        if r.object_key != s.key:
            continue
        rfirst = r.offset // PAGE_SIZE
        lo, hi = max(rfirst, s.first_page), min(rfirst + r.npages, s.first_page + s.npages)
        if lo < hi:
            out.append(_Walk(m, s, r, s.start + (lo - s.first_page) * PAGE_SIZE, hi - lo, lo - rfirst))
    return out


def _scan_written(pagemap: Pagemap, w: _Walk, bits, vec=None) -> int:
    """The pages of walk w written since its last scan, into bits; write-protects them again."""
    return pagemap.scan(w.start, w.start + w.pages * PAGE_SIZE, bits, vec=vec,
                        flags=PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                        category_mask=PAGE_IS_WRITTEN, return_mask=PAGE_IS_WRITTEN)


def _or_at(dst: PageSet, src: PageSet, at: int) -> None:
    """dst pages at + i |= src pages i (src fits in dst from at)."""
    for p in src:
        dst.add(at + p)


def _or_into(dst: PageSet, src: PageSet, at: int) -> None:
    """As _or_at; in C when at is a multiple of 8 (the bits of src's last byte past its pages
    are zero)."""
    if at % 8 or at // 8 + len(src.bits) > len(dst.bits):
        _or_at(dst, src, at)
        return
    with ffi.from_buffer(memoryview(dst.bits)[at // 8:at // 8 + len(src.bits)]) as d, \
            ffi.from_buffer(src.bits) as sb:
        lib.mg_bitmap_or(d, sb, len(src.bits))


class MapperTracker(Tracker):
    """Shared regions of pid, tracked by write-protect in every process that maps their objects.

    hint_pids: processes known to map them (the target's writers, a cgroup's tasks): looked at
    on every collect, beside the periodic /proc scan."""

    name = "wp-mappers"

    def __init__(self, pid: int, regions: list[Region], pool: UffdPool, *,
                 hint_pids: list[int] | None = None, discover_every_s: float = DISCOVER_EVERY_S):
        super().__init__(pid, regions)
        self.pool = pool
        self.hint_pids = list(hint_pids or [])
        self.discover_every_s = discover_every_s
        self._keys: set[ObjectKey] = {r.object_key for r in regions}
        self._mappers: dict[int, _Mapper] = {}
        self._last_discover = 0.0
        self.discover_s = 0.0                 # time the last /proc scan took
        self.discovers = 0
        self._skip = {os.getpid()}            # migrator's own read-only views of the objects
        self._stats: dict[int, list] = {}     # pid -> [StatReader, address-space size last seen]
        # page-table walks at once (_scan_parallel): one per CPU this process may run on, up to 4
        self.workers = max(1, min(4, len(os.sched_getaffinity(0))))
        self._pool: ThreadPoolExecutor | None = None
        self._vecs: dict[tuple[int, int], object] = {}   # (pid, worker) -> its PAGEMAP_SCAN vec

    def ignore(self, pids: set[int]) -> None:
        """Processes of migrator's own that map the objects read-only (the sweep gate's view
        holder): never mappers."""
        self._skip |= pids
        for pid in pids & set(self._mappers):
            self._close(self._mappers.pop(pid))

    # --- mappers ----------------------------------------------------------------------------
    def _discover(self) -> dict[int, list[Mapping]]:
        t0 = time.perf_counter()
        found = find_mappers(self._keys, skip=self._skip)
        self.discover_s = time.perf_counter() - t0
        self.discovers += 1
        self._last_discover = time.monotonic()
        return found

    def _arm(self, m: _Mapper, spans: list[_Span]) -> None:
        """Register and write-protect the mapper's spans not armed yet."""
        assert m.uffd is not None
        for s in spans:
            if s in m.spans:
                continue
            try:
                m.uffd.register_wp(s.start, s.end - s.start)
                m.uffd.writeprotect(s.start, s.end - s.start, True)
            except OSError as e:
                if e.errno == errno.EPERM:
                    continue          # opened read-only (no VM_MAYWRITE): it cannot write
                if e.errno == errno.EBUSY:
                    raise UnsupportedError(f"its mapping {s.start:#x}-{s.end:#x} is registered with "
                                           "another userfaultfd (in use by someone else)") from None
                raise
            m.spans.append(s)

    def _arm_more(self, m: _Mapper, spans: list[_Span], events: list[RegionEvent], detail: str) -> None:
        """Register more spans of a tracked mapper; one that cannot be is reported (the ledger
        covers it), never an error of the collect."""
        try:
            self._arm(m, spans)
            what = "mapper-added"
        except (UnsupportedError, OSError) as e:
            what, detail = "mapper-untracked", f"process {m.pid}: a new mapping of it cannot be write-protected ({e})"
        for r in self._regions_of(spans):
            events.append(RegionEvent(r.name, what, detail))

    def _add(self, pid: int, maps: list[Mapping], events: list[RegionEvent], initial: bool,
             arm: bool = True) -> None:
        m = _Mapper(pid, seen=maps)
        self._mappers[pid] = m
        spans = [_Span.of(x) for x in maps]
        try:
            if not arm:
                raise UnsupportedError("found at the final collect (source paused): not injected")
            m.uffd = self.pool.get(pid)
            m.pagemap = Pagemap(pid)
            self._arm(m, spans)
        except (UnsupportedError, TargetGoneError, OSError) as e:
            if pid == self.pid and isinstance(e, TargetGoneError):
                self._close(m)
                del self._mappers[pid]
                raise
            m.why_not = str(e)
            self._close(m)
            m.uffd = None
        if pid == self.pid and initial and m.uffd is not None:
            return
        what = "mapper-untracked" if m.uffd is None else "mapper-added"
        detail = (f"process {pid} maps it and cannot be write-protected ({m.why_not})" if m.uffd is None
                  else f"process {pid} maps it" + ("" if initial else " since the last collect")
                  + "; writes through it before it was registered are unknown to page tables")
        for r in self._regions_of(spans):
            events.append(RegionEvent(r.name, what, detail))

    def _close(self, m: _Mapper) -> None:
        if m.pagemap is not None:
            m.pagemap.close()
            m.pagemap = None
        if m.uffd is not None and m.pid != self.pid:
            self.pool.drop(m.pid)        # (the target's uffd also serves its private regions)
        m.uffd = None

    def _gone(self, pid: int, events: list[RegionEvent], why: str) -> None:
        m = self._mappers.pop(pid)
        spans = m.spans
        self._close(m)
        for r in self._regions_of(spans):
            events.append(RegionEvent(r.name, "mapper-gone", f"process {pid} {why}"))

    def _regions_of(self, spans: list[_Span]) -> list[Region]:
        keys = {s.key for s in spans}
        return [r for r in self.regions if r.object_key in keys]

    def _refresh(self, events: list[RegionEvent], force: bool, arm: bool = True,
                 found: dict[int, list[Mapping]] | None = None) -> None:
        """Find new mappers, mappers gone and mappings changed; arm=False: register no new
        mapper (the final collect: what it wrote before is unknown to page tables anyway, and
        a frozen process cannot be ptrace-stopped).  found: every mapper and its mappings of
        the objects, from a /proc scan the caller just made (used instead of one of ours)."""
        if found is not None:
            found = {p: m for p, m in found.items() if p not in self._skip and m}
            self._last_discover = time.monotonic()
        elif force or time.monotonic() - self._last_discover >= self.discover_every_s:
            found = self._discover()
        else:
            found = {}
            for pid in {self.pid, *self.hint_pids, *self._mappers}:
                maps = self._look(pid)
                if maps:
                    found[pid] = maps
        if self.pid not in found:
            if not process_exists(self.pid):
                raise TargetGoneError(f"process {self.pid} exited")
            found[self.pid] = []           # (the target's own layout checks report the unmapping)
        for pid in [p for p in self._mappers if p not in found]:
            self._gone(pid, events, "no longer maps it (exited or unmapped)")
        for pid, maps in found.items():
            m = self._mappers.get(pid)
            if m is None:
                self._add(pid, maps, events, initial=False, arm=arm)
                continue
            m.seen = maps
            spans = [_Span.of(x) for x in maps]
            lost = [s for s in m.spans if s not in spans]
            if lost:
                m.spans = [s for s in m.spans if s in spans]
                for r in self._regions_of(lost):
                    events.append(RegionEvent(r.name, "mapper-gone", f"process {pid} unmapped "
                                              "part of it: writes through that mapping since the "
                                              "last collect are unknown to page tables"))
            if m.uffd is not None and arm:
                fresh = [s for s in spans if s not in m.spans]
                if fresh:
                    self._arm_more(m, fresh, events, f"process {pid} mapped it again; earlier "
                                   "writes through it unknown")

    def _look(self, pid: int) -> list[Mapping]:
        """pid's mappings of the objects: read again only when its address-space size changed
        since the last look (/proc/PID/stat kept open: a few us), else as last seen.  A mapping
        replaced by one of the same size is found by the periodic /proc scan, or by the scan
        failing on it (see _scan_span)."""
        st = self._stats.get(pid)
        try:
            if st is None:
                st = self._stats[pid] = [StatReader(pid), -1]
            size = st[0].vsize()
        except TargetGoneError:
            if st is not None:
                st[0].close()
            self._stats.pop(pid, None)
            return []
        m = self._mappers.get(pid)
        if size == st[1] and m is not None:
            return m.seen
        st[1] = size
        return mappings_of(pid, self._keys)

    # --- Tracker ----------------------------------------------------------------------------
    def begin(self) -> None:
        events: list[RegionEvent] = []
        try:
            found = self._discover()
            own = found.pop(self.pid, None)
            if own is None:
                raise TargetGoneError(f"process {self.pid} no longer maps the tracked shared memory")
            self._add(self.pid, own, events, initial=True)
            for pid, maps in found.items():
                self._add(pid, maps, events, initial=True)
        except BaseException:
            self.end()
            raise
        self.begin_events = events

    def collect(self, final: bool = False, exclude: frozenset[str] = frozenset(),
                found: dict[int, list[Mapping]] | Callable[[], dict[int, list[Mapping]]] | None = None
                ) -> DirtyPages:
        """Pages written through any mapper since the previous collect.  exclude: regions not
        reported (a sender compares them as it sends: see LedgerTracker.known_hashes); found:
        a fresh /proc scan's mappers (see _refresh), e.g. the sweep gate's; or, at the final
        collect, a function giving them once that scan (running beside) is done: the known
        mappers' walks are made first.  That order is sound there, the source being paused:
        the final collect arms nothing, a mapper or mapping gone since is reported gone either
        way (its walk's pages are extra), and a walk that fails is made again after."""
        t0 = time.perf_counter()
        wanted = [r for r in self.regions if r.name not in exclude]
        out = DirtyPages(pages={r.name: PageSet(r.npages) for r in wanted})
        if not wanted:           # (the final collect of regions a sender scans as it sends)
            return self._account(out)
        # the final collect (source paused) looks for no new mapper with a /proc scan: that
        # would lengthen the pause, and what a mapper found now wrote is unknown to page
        # tables anyway (the ledger's); the periodic scans ran until the last live collect
        if final and callable(found):
            failed = self._scan_parallel(wanted, out)
            self._refresh(out.events, force=False, arm=False, found=found())
        else:
            self._refresh(out.events, force=False, arm=not final,
                          found=found() if callable(found) else found)
            failed = self._scan_parallel(wanted, out)
        for pid in list(self._mappers):
            m = self._mappers[pid]
            if m.uffd is None or m.pagemap is None or (failed is not None and pid not in failed):
                continue
            try:
                for s in m.spans:
                    if failed is None or s in failed[pid]:
                        self._scan_span(m, s, wanted, out)
            except TargetGoneError:
                if pid == self.pid:
                    raise
                self._gone(pid, out.events, "exited")
        out.cost_s = time.perf_counter() - t0
        return self._account(out)

    def _scan_parallel(self, wanted: list[Region], out: DirtyPages) -> dict[int, set[_Span]] | None:
        """The walks of every mapper's spans, cut in `workers` parts of about equal size (in
        multiples of 2 MiB from a walk's start) and run at once, each into bitmaps of its own
        (two mappers of one object report the same pages: bits set from two threads into one
        byte would race); the page-table walk is the collect's cost that grows with memory, and
        the kernel takes a process's mmap_lock shared for it.  None when the walks are too
        small to be worth a thread (they are then made by the caller, one after the other);
        else the spans whose walk failed, for the caller to walk again the usual way
        (_scan_span: a remapped span is reported whole, a mapper gone is reported gone).  What
        a failed walk reported before it failed is kept."""
        walks = [w for m in self._mappers.values() if m.uffd is not None and m.pagemap is not None
                 for s in m.spans for w in _walks_of(m, s, wanted)]
        total = sum(w.pages for w in walks)
        if self.workers < 2 or total < PARALLEL_MIN_PAGES:
            return None
        # the walks in `workers` parts of about total / workers pages each, a walk cut in two
        # where a part ends within it
        share = -(-total // self.workers)
        parts: list[list[_Walk]] = [[]]
        room = share
        for w in walks:
            while w.pages > room and len(parts) < self.workers:
                cut = room // PMD_PAGES * PMD_PAGES
                if cut:
                    parts[-1].append(w._replace(pages=cut))
                    w = w._replace(start=w.start + cut * PAGE_SIZE, pages=w.pages - cut, at=w.at + cut)
                parts.append([])
                room = share
            parts[-1].append(w)
            room -= w.pages
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers - 1, thread_name_prefix="wp-walk")
            self._vecs = {}

        def walk(index: int, part: list[_Walk]) -> list[tuple[_Walk, PageSet, BaseException | None]]:
            done = []
            for w in part:
                pagemap = w.mapper.pagemap
                vec = self._vecs.get((w.mapper.pid, index))
                if vec is None:
                    vec = self._vecs[(w.mapper.pid, index)] = pagemap.new_vec()
                bits = PageSet(w.pages)
                try:
                    _scan_written(pagemap, w, bits.bits, vec)
                    done.append((w, bits, None))
                except (OSError, TargetGoneError) as e:
                    done.append((w, bits, e))
            return done

        futures = [self._pool.submit(walk, i, part) for i, part in enumerate(parts[1:], 1)]
        results = walk(0, parts[0])
        for f in futures:
            results += f.result()
        failed: dict[int, set[_Span]] = {m.pid: set() for m in self._mappers.values()}
        for w, bits, err in results:
            _or_into(out.pages[w.region.name], bits, w.at)
            if err is not None:
                failed[w.mapper.pid].add(w.span)
        return failed

    def _scan_span(self, m: _Mapper, s: _Span, wanted: list[Region], out: DirtyPages) -> None:
        assert m.pagemap is not None
        for w in _walks_of(m, s, wanted):
            dst = out.pages[w.region.name]
            # the scan sets bits from a byte boundary: straight into the region's set when the
            # span starts at a multiple of 8 of its pages (the usual case), else through a copy
            tmp = None if w.at % 8 == 0 else PageSet(w.pages)
            try:
                n = _scan_written(m.pagemap, w, memoryview(dst.bits)[w.at // 8:] if tmp is None else tmp.bits)
            except OSError as e:
                if e.errno != errno.EPERM:
                    raise
                # the span is no longer the registered VMA: what it reported before failing is
                # lost, so report it whole and look at the mapper's mappings again
                n = 0
                dst.add_range(w.at, w.at + w.pages)
                out.events.append(RegionEvent(w.region.name, "mapper-remapped",
                                              f"process {m.pid}: a mapping changed; its pages reported"))
                m.spans = [x for x in m.spans if x != s]
                maps = m.seen = mappings_of(m.pid, self._keys)   # (_look's copy is stale)
                if maps:
                    self._arm_more(m, [_Span.of(x) for x in maps], out.events,
                                   f"process {m.pid}: its new mapping registered")
            if n and tmp is not None:
                _or_into(dst, tmp, w.at)

    def end(self) -> None:
        for m in list(self._mappers.values()):
            if m.uffd is not None:
                for s in m.spans:
                    try:
                        m.uffd.writeprotect(s.start, s.end - s.start, False)
                        m.uffd.unregister(s.start, s.end - s.start)
                    except OSError:
                        pass        # exited, or unmapped: nothing left to disarm
            self._close(m)
        self._mappers.clear()
        for st in self._stats.values():
            st[0].close()
        self._stats.clear()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._vecs.clear()

    # --- reports ----------------------------------------------------------------------------
    def mappers(self) -> dict[int, str]:
        """pid -> how its writes are tracked ("own uffd", "injected ...") or why not."""
        out = {}
        for pid, m in sorted(self._mappers.items()):
            if m.uffd is None:
                out[pid] = f"not tracked: {m.why_not}"
            else:
                o = self.pool.origins.get(pid)
                out[pid] = o.detail if o else "tracked"
        return out

    def writer_pids(self) -> set[int]:
        return set(self._mappers) - {self.pid}

    def untracked(self) -> dict[ObjectKey, str]:
        """Objects mapped by a process whose writes are not write-protect tracked, and why."""
        out: dict[ObjectKey, str] = {}
        for pid, m in self._mappers.items():
            if m.uffd is None:
                for x in m.seen:
                    out.setdefault((x.dev[0], x.dev[1], x.inode),
                                   f"process {pid} maps it and is not write-protect tracked ({m.why_not})")
        return out

    def statistics(self) -> TrackerStatistics:
        base = super().statistics()
        detail = "; ".join(f"pid {p}: {how}" for p, how in self.mappers().items())
        return TrackerStatistics(**{**base.__dict__, "detail": detail})
