"""The central shmem dirty ledger: page-cache content hashes per shared memory object.

For shared memory the page tables are not the truth: a swapped-out or zapped shmem page loses its
PTE, and writes through another process's mapping or by write/pwrite/fallocate never touch the
target's PTEs.  The ledger looks at the object itself: one ShmemLedger per object (keyed by
device + inode, not per process), holding an XXH3-64 hash and a change generation per page
(12 bytes a page).  A sweep preads the object's data extents (SEEK_DATA/SEEK_HOLE; holes count as
zero pages) through /proc/PID/map_files, without touching any process's page tables, and bumps
the generation of every page whose hash changed.  Each consumer (a LedgerTracker of one process)
remembers the generation it last saw, so several trackers can share one ledger.

A migration's own ledger can start without the initial sweep (LedgerTracker.begin_from_sends):
every page counts as a zero page (what the destination holds before anything is sent), and the
hashes of the pages round 0 packs and sends become the baseline (record_sent; the sender hashes
each page it sends anyway), so the first collect reports exactly the pages whose contents differ
from what the destination holds, and the set-up does not read the whole object once more.

Where the migration maps the object itself (the source's read-only mapping of a memfd sealed
against shrinking, which the sender packs from), a ledger of its own hashes the data extents
straight from that mapping (use_view): no copy, and the sweeps fill the page tables the sender's
later rounds use instead of leaving that to the final round.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import TargetGoneError
from ..kernel.maps import Region, RegionKind, read_maps
from ..kernel.native import PAGE_SIZE, check, ffi, lib
from ..kernel.shmem import data_extents, open_object
from .base import DirtyPages, Tracker
from .layout import unmapped_events
from .pageset import PageSet

SWEEP_BUFFER = 256 * 1024     # bytes read per pread: small enough to stay in L2
SWEEP_CHUNK = 32 << 20        # bytes of object a sweeping thread takes at a time
SWEEP_THREADS = max(1, min(4, os.cpu_count() or 1))
ASSUMED_SWEEP_RATE = 2e9      # bytes/s a sweep is assumed to hash before one was measured
                              # (measured here: 5-10 GB/s with two threads)


def zero_page_hash() -> int:
    """XXH3-64 of a page of zeros (PAGE_SIZE bytes): the hash of a page never written."""
    return lib.mgk_hash_zero_page(PAGE_SIZE)


def zero_hash_table(npages: int) -> tuple[Any, Any]:
    """A table of npages 8-byte page hashes (uint64_t cdata of at least one entry), each a zero
    page's hash, and a writable buffer of its 8 * npages bytes: what record_runs() fills."""
    table = ffi.new("uint64_t[]", max(npages, 1))
    lib.mgk_sweep_hole(npages, zero_page_hash(), table, ffi.NULL, 0, ffi.NULL, 0)
    return table, ffi.buffer(table, 8 * npages)


def record_runs(table, npages: int, data_flat, zero_flat, hashes: bytes, zero_hash: int) -> None:
    """Set table[p] (a uint64_t cdata array of npages) for the pages of flat (first, count) runs:
    data runs take the page hashes in order, zero runs the zero page's hash (what a sender's
    on_packed hook hands over).  ValueError for a run outside the table."""
    for flat, values, fill in ((data_flat, hashes, 0), (zero_flat, None, zero_hash)):
        if flat:
            vals = ffi.from_buffer("uint64_t[]", values) if values is not None else ffi.NULL
            if lib.mgk_set_hashes(table, npages, ffi.new("uint64_t[]", list(flat)), len(flat) // 2,
                                 vals, fill) < 0:
                raise ValueError("pages recorded outside the table")


def _populate(addr: int, nbytes: int) -> None:
    """Fill the page tables of a mapped range in one call (read faults, without the GIL);
    where the kernel lacks it, the hashing faults the pages in one by one."""
    lib.mgk_populate(ffi.cast("uint8_t *", addr), nbytes, 0)


# the hash a page in flight has in a ledger: being read by a sender, not reported sent yet (see
# LedgerTracker.mark_reading); a sweep finds any page's contents differ from it
IN_FLIGHT = 0x9E3779B97F4A7C15


def _within(runs: list[tuple[int, int]], led: "ShmemLedger") -> list[tuple[int, int]]:
    """The parts of byte ranges runs that lie in the ledger's object range."""
    lo, hi = led.first_page * PAGE_SIZE, led.end_page * PAGE_SIZE
    return [(max(a, lo), min(b, hi)) for a, b in runs if min(b, hi) > max(a, lo)]


class ShmemLedger:
    """Hashes and change generations of object pages [first_page, end_page) of one shmem object."""

    def __init__(self, key: tuple[int, int, int], fd: int, first_page: int, end_page: int):
        self.key = key
        self.fd = fd
        self.first_page = first_page
        self.end_page = end_page
        n = end_page - first_page
        self.hashes = ffi.new("uint64_t[]", max(n, 1))
        self.gens = ffi.new("uint32_t[]", max(n, 1))
        self.generation = 0
        self.sweeps = 0
        self.last_sweep_s = 0.0
        self.bytes_read = 0
        self._local = threading.local()       # one read buffer per sweeping thread
        self._pool: ThreadPoolExecutor | None = None
        self._zero = zero_page_hash()
        self._view = None                     # object pages [first_page, end_page) mapped

    def use_view(self, view) -> None:
        """Sweep from view (a read-only buffer of the object pages [first_page, end_page), kept
        valid until close()) instead of pread: only data extents are read, as pread does (a
        read fault on a shmem hole would allocate the page)."""
        if len(view) < self.npages * PAGE_SIZE:
            raise ValueError(f"view of {len(view)} bytes for {self.npages} pages")
        self._view = ffi.from_buffer(view)

    @property
    def npages(self) -> int:
        return self.end_page - self.first_page

    def memory_bytes(self) -> int:
        return self.npages * 12 + SWEEP_BUFFER * SWEEP_THREADS

    def sweep(self, runs: list[tuple[int, int]] | None = None) -> int:
        """Hash every page of the object range, or only those of runs (object byte ranges
        [a, b) within it, ascending: pages out of sight of page tables, see sweepgate.py);
        returns how many changed since the last sweep.  Data extents are cut into chunks
        hashed by SWEEP_THREADS threads (the C loop runs without the GIL), so a sweep can use
        every core, e.g. while the guest is paused."""
        t0 = time.perf_counter()
        self.generation += 1
        g = self.generation
        lo, hi = self.first_page * PAGE_SIZE, self.end_page * PAGE_SIZE
        changed = 0
        chunks: list[tuple[int, int]] = []        # (byte offset, pages) of data to read
        for rlo, rhi in [(lo, hi)] if runs is None else runs:
            if not lo <= rlo <= rhi <= hi:
                raise ValueError("pages swept outside the ledger")
            pos = rlo
            for a, b in data_extents(self.fd, rlo, rhi) + [(rhi, rhi)]:
                if a > pos:    # hole [pos, a): reads as zeros
                    i = (pos - lo) // PAGE_SIZE
                    changed += lib.mgk_sweep_hole((a - pos) // PAGE_SIZE, self._zero, self.hashes + i,
                                                 ffi.NULL, 0, self.gens + i, g)
                for c in range(a, b, SWEEP_CHUNK):
                    chunks.append((c, (min(b, c + SWEEP_CHUNK) - c) // PAGE_SIZE))
                    self.bytes_read += min(b, c + SWEEP_CHUNK) - c
                pos = max(pos, b)
        if len(chunks) > 1 and SWEEP_THREADS > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(SWEEP_THREADS, thread_name_prefix="ledger-sweep")
            changed += sum(self._pool.map(lambda ch: self._sweep_chunk(ch, g), chunks))
        else:
            changed += sum(self._sweep_chunk(ch, g) for ch in chunks)
        if runs is None:        # (a whole sweep: what the next one should cost)
            self.sweeps += 1
            self.last_sweep_s = time.perf_counter() - t0
        return changed

    def record(self, first_page: int, data_flat, zero_flat, hashes: bytes) -> None:
        """Object pages of (first, count) runs from first_page on were sent with these page
        hashes (data runs) or as zeros (zero runs): the baseline the next sweep compares with,
        without a new generation."""
        try:
            record_runs(self.hashes + (first_page - self.first_page), self.end_page - first_page,
                        data_flat, zero_flat, hashes, self._zero)
        except ValueError:
            raise ValueError("pages recorded outside the ledger") from None

    def mark(self, first_page: int, flat) -> None:
        """Object pages of (first, count) runs from first_page on are being read by a sender:
        their hashes become IN_FLIGHT until record() gives the ones sent."""
        try:
            record_runs(self.hashes + (first_page - self.first_page), self.end_page - first_page,
                        (), flat, b"", IN_FLIGHT)
        except ValueError:
            raise ValueError("pages marked outside the ledger") from None

    def _sweep_chunk(self, chunk: tuple[int, int], g: int) -> int:
        offset, n = chunk
        if self._view is not None:
            i = offset // PAGE_SIZE - self.first_page
            if self.sweeps == 0:     # (data extents only: a hole would be allocated)
                _populate(int(ffi.cast("uintptr_t", self._view + i * PAGE_SIZE)), n * PAGE_SIZE)
            return lib.mgk_sweep_mem(self._view + i * PAGE_SIZE, n, PAGE_SIZE, self.hashes + i,
                                    ffi.NULL, 0, self.gens + i, g)
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = ffi.new("uint8_t[]", SWEEP_BUFFER)
        i = offset // PAGE_SIZE - self.first_page
        return check(lib.mgk_sweep_fd(self.fd, offset, n, PAGE_SIZE, buf, SWEEP_BUFFER,
                                     self.hashes + i, ffi.NULL, 0, self.gens + i, g),
                     "pread shmem object")

    def sweep_estimate_s(self) -> float:
        """How long a sweep of every page should take (seconds): at the rate the last sweep
        hashed, or ASSUMED_SWEEP_RATE before any (an upper estimate: holes cost nothing)."""
        nbytes = self.npages * PAGE_SIZE
        if self.sweeps and self.bytes_read and self.last_sweep_s > 0:
            rate = self.bytes_read / self.sweeps / self.last_sweep_s
            return nbytes / max(rate, 1.0)
        return nbytes / ASSUMED_SWEEP_RATE

    def count_changed(self, first_page: int, pages: list[int]) -> int | None:
        """Of object pages first_page + p (p in pages: data pages), how many hash differently
        from the ledger, read from the view (nothing updated: a sample, not a sweep); None
        without a view."""
        if self._view is None:
            return None
        if first_page < self.first_page or first_page + max(pages) >= self.end_page:
            raise ValueError("sampled pages outside the ledger")
        i = first_page - self.first_page
        return lib.mg_count_changed(self._view + i * PAGE_SIZE, ffi.new("uint64_t[]", pages),
                                    len(pages), PAGE_SIZE, self.hashes + i)

    def changed_since(self, since: int, first_page: int, npages: int) -> PageSet:
        """Object pages [first_page, first_page + npages) changed in a sweep after generation
        `since`, as a PageSet indexed from first_page."""
        if first_page < self.first_page or first_page + npages > self.end_page:
            raise ValueError("range outside the ledger")
        s = PageSet(npages)
        lib.mg_gens_since(self.gens + (first_page - self.first_page), npages, since, ffi.from_buffer(s.bits))
        return s

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._view is not None:
            ffi.release(self._view)
            self._view = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LedgerRegistry:
    """The ledgers of one migration (or one host), one per shared object."""

    def __init__(self) -> None:
        self._ledgers: dict[tuple[int, int, int], ShmemLedger] = {}

    def ledger_for(self, pid: int, region: Region, view=None, *, sweep: bool = True) -> ShmemLedger:
        """The ledger of region's object, created (and swept once) on first use; grown when a
        later region reaches beyond it.  view: region's pages mapped (see ShmemLedger.use_view),
        used by a ledger created for exactly this region.  sweep=False: a new ledger starts with
        every page hashed as a zero page instead (see LedgerTracker.begin_from_sends)."""
        first = region.offset // PAGE_SIZE
        end = first + region.npages
        led = self._ledgers.get(region.object_key)
        if led is not None and led.first_page <= first and end <= led.end_page:
            return led
        if led is not None:
            first, end = min(first, led.first_page), max(end, led.end_page)
            led.close()
            view = None           # it covers the region, not the grown range
            sweep = True          # the grown range needs a baseline
        fd = open_object(pid, region)
        led = ShmemLedger(region.object_key, fd, first, end)
        if view is not None:
            led.use_view(view)
        if sweep:
            led.sweep()
        else:
            lib.mgk_sweep_hole(led.npages, led._zero, led.hashes, ffi.NULL, 0, led.gens, 0)
        self._ledgers[region.object_key] = led
        return led

    def has(self, region: Region) -> bool:
        """Whether a ledger covering region's object pages exists already."""
        led = self._ledgers.get(region.object_key)
        first = region.offset // PAGE_SIZE
        return led is not None and led.first_page <= first and first + region.npages <= led.end_page

    def ledgers(self) -> list[ShmemLedger]:
        return list(self._ledgers.values())

    def close(self) -> None:
        for led in self._ledgers.values():
            led.close()
        self._ledgers.clear()


class LedgerTracker(Tracker):
    """Tracker for shared regions of one process, backed by a (shared) LedgerRegistry.

    Every collect sweeps each object once and reports the pages whose contents changed since this
    tracker's previous collect, whatever wrote them.
    """

    name = "ledger"

    def __init__(self, pid: int, regions: list[Region], registry: LedgerRegistry | None = None):
        super().__init__(pid, regions)
        for r in regions:
            if r.kind != RegionKind.SHARED and not r.inode:
                raise ValueError(f"region {r.name} is not backed by a shared object")
        self._own_registry = registry is None
        self.registry = registry or LedgerRegistry()
        self._since: dict[str, int] = {}
        self._views: dict = {}
        self._recorded: dict[str, Region] = {}   # regions whose ledger record_sent() updates

    def use_views(self, views: dict) -> None:
        """Region name -> a read-only mapping of the region's object pages, valid until end():
        the ledgers this tracker creates sweep from it (ShmemLedger.use_view).  Before begin();
        ignored with a shared registry (its ledgers may outlive the mappings)."""
        if self._own_registry:
            self._views = {k: v for k, v in views.items() if v is not None}

    def _exclusive(self) -> bool:
        """This tracker alone uses its ledgers: its own registry, one region per object."""
        keys = [r.object_key for r in self.regions]
        return self._own_registry and len(set(keys)) == len(keys)

    def begin(self) -> None:
        for r in self.regions:
            led = self.registry.ledger_for(self.pid, r, self._views.get(r.name))
            self._since[r.name] = led.generation
        self._recorded = {r.name: r for r in self.regions} if self._exclusive() else {}

    def begin_from_sends(self) -> set[str]:
        """Arm like begin(), but without the initial sweep where this tracker owns the ledgers
        (see record_sent): their baseline is what record_sent() is given before the first
        collect (every other page counts as a zero page), and their views' page tables are
        filled instead.  The caller must send every page the destination does not hold as
        zeros with record_sent as the sender's on_packed hook (round 0 sends every populated
        page).  Returns the names of those regions (none: armed as begin())."""
        if not self._exclusive() or any(self.registry.has(r) for r in self.regions):
            self.begin()
            return set()
        for r in self.regions:
            # (round 0 reads every data page through the view, which fills its page tables as
            # it goes; populating them in a thread beside it measured slower: the two contend)
            led = self.registry.ledger_for(self.pid, r, self._views.get(r.name), sweep=False)
            self._since[r.name] = led.generation
        self._recorded = {r.name: r for r in self.regions}
        return set(self._recorded)

    def record_sent(self, region_name: str, data_flat, zero_flat, hashes: bytes) -> None:
        """Sender hook (on_packed, every round, from producer threads): pages of a region went
        out with these hashes, or as zeros.  Where this tracker alone uses the ledger, they
        become what the next sweep compares with, so the ledger holds the hashes of what the
        destination holds: a page sent as B and written back to A before the next sweep is
        reported (compared with its own last sweep, A, it would not be, and the destination
        would keep B).  A concurrent sweep is safe: it rewrites a hash only for a page it
        reports as changed."""
        r = self._recorded.get(region_name)
        if r is not None:
            led = self.registry.ledger_for(self.pid, r)
            led.record(r.offset // PAGE_SIZE, data_flat, zero_flat, hashes)

    def mark_reading(self, region_name: str, flat) -> None:
        """Sender hook (on_reading, live rounds, from producer threads): pages of a region are
        about to be read.  Until record_sent() gives what was sent, a sweep compares them with
        IN_FLIGHT, so finds them changed: a page read, then punched and read back (a zero page,
        no write) before the send is recorded, is not compared with a hash from before its read
        that the zeros may match (the lazy baseline's zero page, or zeros sent before)."""
        r = self._recorded.get(region_name)
        if r is not None:
            self.registry.ledger_for(self.pid, r).mark(r.offset // PAGE_SIZE, flat)

    def known_hashes(self) -> dict[str, object]:
        """Region name -> the ledger's page hashes of the region (a writable buffer, 8 bytes a
        page), for the regions whose ledger record_sent() keeps: there they are the hashes of
        what the destination holds, except for the pages the last collect reported (not sent
        yet).  A sender can then do the final collect itself, sending exactly the pages that
        differ (Sender.send_pages known=...), and leave the hashes final for the digests; the
        final collect() then skips those regions (exclude)."""
        out = {}
        for name, r in self._recorded.items():
            led = self.registry.ledger_for(self.pid, r)
            i = r.offset // PAGE_SIZE - led.first_page
            out[name] = ffi.buffer(led.hashes + i, 8 * r.npages)
        return out

    def rewritten_fraction(self, samples: dict[str, list[int]]) -> float | None:
        """Of sampled data pages sent (region name -> page numbers), the fraction whose contents
        differ already from what was sent (record_sent); nothing is updated.  None if no
        sampled page is in a region this tracker can tell about (record_sent keeps its hashes,
        and it is mapped: the data pages are hashed where they lie)."""
        changed = total = 0
        for name, pages in samples.items():
            r = self._recorded.get(name)
            if r is None or not pages:
                continue
            if max(pages) >= r.npages:
                raise ValueError(f"sampled page outside region {name}")
            n = self.registry.ledger_for(self.pid, r).count_changed(r.offset // PAGE_SIZE, pages)
            if n is not None:
                changed += n
                total += len(pages)
        return changed / total if total else None

    def collect(self, final: bool = False, exclude: frozenset[str] = frozenset(),
                maps: list | None = None, only: dict | None = None) -> DirtyPages:
        """exclude: regions not swept (see known_hashes); their layout is still checked, in
        maps if given (the target's mappings of the objects, from a /proc scan just made).
        only: object key -> byte ranges of the object: where given, only those pages are
        hashed (SweepGate.unseen), not the whole object."""
        t0 = time.perf_counter()
        out = DirtyPages(pages={})
        if maps is None:
            maps = read_maps(self.pid)      # raises TargetGoneError when the process exited
        swept: set[int] = set()
        for r in self.regions:
            out.events.extend(unmapped_events(r, maps))
            if r.name in exclude:
                continue
            led = self.registry.ledger_for(self.pid, r)
            if id(led) not in swept:
                try:
                    led.sweep(None if only is None or r.object_key not in only
                              else _within(only[r.object_key], led))
                except OSError as e:
                    raise TargetGoneError(f"shared object of region {r.name} unreadable: {e}") from None
                swept.add(id(led))
            out.pages[r.name] = led.changed_since(self._since[r.name], r.offset // PAGE_SIZE, r.npages)
            self._since[r.name] = led.generation
        out.cost_s = time.perf_counter() - t0
        return self._account(out)

    def final_collect_estimate_s(self) -> float:
        """The sweeps of the ledgers the final collect will sweep: not those of the regions
        whose known_hashes() a sender compares with as it sends (that scan is part of the
        send, whose time is bounded by sending every page)."""
        fused = {id(self.registry.ledger_for(self.pid, r)) for r in self._recorded.values()}
        return sum(led.sweep_estimate_s() for led in self.registry.ledgers() if id(led) not in fused)

    def sweep_estimate_s(self, keys: set | None) -> float:
        """How long sweeping the objects of `keys` (None: all) should take, seconds, a
        sender's scanning send included."""
        return sum(led.sweep_estimate_s() for led in self.registry.ledgers()
                   if keys is None or led.key in keys)

    def object_fds(self) -> dict:
        """Object key -> the ledger's descriptor of the object (after begin)."""
        return {led.key: led.fd for led in self.registry.ledgers()}

    def memory_bytes(self) -> int:
        return sum(led.memory_bytes() for led in self.registry.ledgers())

    def end(self) -> None:
        if self._own_registry:
            self.registry.close()
