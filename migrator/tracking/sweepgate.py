"""When the shmem ledger must sweep an object, and when page tables prove it unchanged.

The ledger (tracking/ledger.py) reads an object's whole contents: exact, but its cost grows with
the object's size.  Page tables are cheap, and where every write went through page tables that
write-protect tracking watches, the ledger would find nothing more.  At every collect, this gate
looks at every holder of each shared object (kernel/holders.py: one pass over /proc) and lets the
ledger skip the object only when all of these held since the previous collect:

1. every process that maps it is write-protect tracked on every one of its mappings, the same
   ones as at the previous collect (no mapper found, gone, untracked or remapped);
2. no process holds it by a descriptor open for writing, other than those seen at the previous
   collect whose write-call count (syscw) did not move, and those the caller vouches for
   (`no_syscall_writes`: a QEMU process never writes its RAM by system call);
3. no holder has asynchronous I/O (io_uring, aio), which completes into memory at any time;
4. no mapper has long-term pinned pages (VmPin), written by devices without faults;
5. no mapper with a descriptor open with O_DIRECT (now or at the previous collect) completed a
   read call (syscr moved): a direct-I/O read lands in pages pinned before a collect
   re-protected them, without a fault;
6. no holder forked (a child inherits mappings without write-protection, and descriptors): no
   new process whose parent is a holder, and no child of a holder reaped (cminflt moved);
7. no data page of the object became a hole, or a zero page, out of sight (a hole punch,
   MADV_REMOVE or truncation drops the page without a fault, and a read fault then maps a new
   zero page; reclaim drops it too).  The kernel unmaps such a page from every mapping of the
   object, so a process of migrator's own (kernel/viewholder.py) keeps a read-only view of it
   whose page tables hold every data page: one PAGEMAP_SCAN of the view (page tables: ~1-1.6 ms
   a GiB) finds the pages absent from it, and where the holder's RssShmem shows that no page
   left any view since the previous check, that scan stands (no walk).  Those pages are not
   swept with the whole object: the ledger hashes them alone (ShmemLedger.sweep(runs)), and the
   data among them is faulted back into the view at the next live check, its 2 MiB blocks hashed
   then (see _check).  A page that was a hole at the previous check and is one still is passed
   over (a hole reads as zeros until something writes it, and every writer is covered above).
   Without a view (no holder), the object is swept.

Otherwise the object is swept, and the decision says which condition failed (Sweep).  What stays
out of reach is written in docs/tracking.md ("When the ledger sweeps").
"""

from __future__ import annotations

import os
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from ..errors import MigratorError
from ..kernel.holders import Holder, HolderScan, parent_of, read_counters, scan_holders
from ..kernel.maps import Region
from ..kernel.native import PAGE_SIZE, lib
from ..kernel.pagemap import PAGE_IS_PRESENT, Pagemap
from ..kernel.resources import close_fd, closed
from ..kernel.shmem import data_extents
from ..kernel.viewholder import ViewHolder
from .pageset import PageSet

ObjectKey = tuple[int, int, int]
PMD_BYTES = 2 << 20      # what one page table maps: the kernel's fault-around stays within it


@dataclass(frozen=True)
class Sweep:
    """The ledger swept (or must sweep) an object: which, how many bytes, and why."""

    key: ObjectKey
    regions: tuple[str, ...]
    nbytes: int
    reason: str

    def describe(self) -> str:
        return f"{', '.join(self.regions)}: {self.nbytes / 2**20:.0f} MiB swept: {self.reason}"


class SweepGate:
    """Decides, at each collect, which shared objects the ledger must sweep (see the module
    docstring).  regions: the tracked shared regions; fds: an open descriptor of each object
    (key -> fd, for its extents); no_syscall_writes: pids that never write the objects by system
    call (documented facts about them, e.g. QEMU)."""

    def __init__(self, regions: list[Region], fds: dict[ObjectKey, int], *,
                 no_syscall_writes: set[int] | None = None, skip: set[int] | None = None):
        self.regions = list(regions)
        self.keys = {r.object_key for r in regions}
        self.fds = dict(fds)
        self.vouched = set(no_syscall_writes or ())
        self.skip = set(skip or ())
        self._prev: HolderScan | None = None
        # the holes among the pages absent from each view at the last check (the data pages
        # absent then are faulted back in at the next live check: _check)
        self._known_holes: dict[ObjectKey, PageSet] = {}
        self._views: dict[ObjectKey, tuple[int, int]] = {}     # key -> (holder address, pages)
        self._holder: ViewHolder | None = None
        self.view_error = ""                  # why there are no views (the holder failed)
        self._absent: dict[ObjectKey, PageSet] = {}     # the last check's absent pages
        self._to_refill: dict[ObjectKey, PageSet] = {}  # ... the data among them
        self._rss: int | None = None          # the holder's RssShmem at the last check
        self.scans_skipped = 0                # checks whose RssShmem showed no page gone
        # what this collect's ledger must hash of each object not swept whole: the pages
        # absent from its view (object byte ranges), and how many of them left it since the
        # previous check
        self.unseen: dict[ObjectKey, list[tuple[int, int]]] = {}
        self.left_view: dict[ObjectKey, int] = {}
        self._pagemap: Pagemap | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._holes: Future | None = None
        self.last: dict[ObjectKey, Sweep] = {}      # the previous decision's sweeps
        self.scan_s = 0.0
        self._inotify = -1
        self._watches: dict[int, ObjectKey] = {}     # inotify watch -> object

    def _open_views(self) -> None:
        """Map each object's tracked range read-only in a view holder process (kernel/
        viewholder.py), its data pages faulted in (holes stay holes).  Nothing else faults pages
        into those views (the sender's view of a sealed memfd would not do: a read there maps
        its neighbours too, see _check), and nothing reads through them.  Where the holder
        cannot be started, the objects are swept at every collect (see _holes_made)."""
        keys = [k for k in self.keys if k in self.fds]
        if not keys or self._holder is not None:
            return
        try:
            self._holder = ViewHolder([self.fds[k] for k in keys])
            for k in keys:
                lo, hi = self._range(k)
                addr = self._holder.map(self.fds[k], lo, hi - lo)
                self._views[k] = (addr, (hi - lo) // PAGE_SIZE)
                self._holder.populate([(addr + a - lo, b - a) for a, b in data_extents(self.fds[k], lo, hi)])
            self._pagemap = Pagemap(self._holder.pid)
        except (OSError, MigratorError) as e:
            self.view_error = str(e)
            self._views.clear()
            self._holder = closed(self._holder)

    @property
    def helper_pids(self) -> set[int]:
        """Migrator's own processes that map the objects read-only (the view holder)."""
        return {self._holder.pid} if self._holder is not None else set()

    def _check(self, refill: bool) -> dict[ObjectKey, tuple[PageSet, PageSet] | None]:
        """For each object: the pages absent from its view now, and the pages the ledger must
        hash besides the holes among them (the data pages, and those a refill touched); None
        without a view.  In order:
        1. refill (live collects): the data pages the previous check found absent are faulted
           back into the views.  A read fault maps the page's neighbours in the page cache too
           (the kernel's fault-around, within one page table: fault_around_bytes, 64 KiB by
           default, settable up to 2 MiB), and a neighbour punched and read back since would
           come back unseen: every page of the 2 MiB blocks a refill touched is hashed.
        2. the holder's RssShmem is read.  Where it counts exactly (ViewHolder.rss_exact), no
           refill just happened, and it equals the count read at the previous check, no page
           left any view since that check, whose scan then stands;
        3. else one PAGEMAP_SCAN of each view for the pages absent from it."""
        holder = self._holder
        touched: dict[ObjectKey, PageSet] = {}
        if refill and holder is not None:
            for k, pages in self._to_refill.items():
                addr, n = self._views[k]
                end = addr + n * PAGE_SIZE
                ranges = [(addr + a * PAGE_SIZE, (b - a) * PAGE_SIZE) for a, b in pages.runs()]
                if not ranges:
                    continue
                holder.populate(ranges)      # (EFAULT past a truncation: absent, hashed again)
                t = touched[k] = PageSet(n)
                for va, length in ranges:
                    wa = max(addr, va & ~(PMD_BYTES - 1))
                    wb = min(end, (va + length + PMD_BYTES - 1) & ~(PMD_BYTES - 1))
                    t.add_range((wa - addr) // PAGE_SIZE, (wb - addr) // PAGE_SIZE)
        rss = holder.rss_shmem_pages() if holder is not None else None
        still = (holder is not None and holder.rss_exact and not touched and rss == self._rss
                 and all(k in self._absent for k in self._views))
        self._rss = rss
        if still:
            self.scans_skipped += 1
        out: dict[ObjectKey, tuple[PageSet, PageSet] | None] = {}
        self._to_refill = {}
        for k in self.keys:
            view = self._views.get(k)
            if view is None:
                out[k] = None
                continue
            absent = self._absent[k] if still else self._absent_pages(view)
            self._absent[k] = absent
            data = PageSet(absent.npages)
            if absent:
                lo = self._range(k)[0]
                for first, end in absent.runs():
                    for a, b in data_extents(self.fds[k], lo + first * PAGE_SIZE, lo + end * PAGE_SIZE):
                        data.add_range((a - lo) // PAGE_SIZE, (b - lo) // PAGE_SIZE)
                if data:
                    self._to_refill[k] = data.copy()
            if k in touched:
                data.update(touched[k])
            out[k] = (absent, data)
        return out

    def _absent_pages(self, view: tuple[int, int]) -> PageSet:
        """The pages absent from a view of the holder (PAGEMAP_SCAN of its page tables)."""
        assert self._pagemap is not None
        addr, n = view
        end = addr + n * PAGE_SIZE
        absent = PageSet(n)
        pos = addr
        while pos < end:     # (the absent pages: few runs, and the kernel's walk is quicker)
            runs, walk_end = self._pagemap.scan_regions(
                pos, end, category_inverted=PAGE_IS_PRESENT, category_mask=PAGE_IS_PRESENT,
                return_mask=PAGE_IS_PRESENT)
            for a, b, _ in runs:
                absent.add_range((a - addr) // PAGE_SIZE, (b - addr) // PAGE_SIZE)
            if walk_end >= end or walk_end <= pos:
                break
            pos = walk_end
        return absent

    def begin_holes_check(self, final: bool = False) -> None:
        """Start this collect's hole check in a thread of its own (its page-table walk runs in
        C without the GIL, beside the holder scan and the write-protect scans); decide()
        takes its result.  final: the last check (nothing is faulted back into the views)."""
        self._holes = self._workers().submit(self._check, not final)

    def _workers(self) -> ThreadPoolExecutor:
        """The hole check's thread, and the holder scan's of observe_beside: both started here.
        (A pool starts a thread when a task finds none idle: the pause's two tasks would start
        the second one then, and the new thread's start waits its turn at the GIL: 3-4 ms of
        some 8 GiB pauses went there.)"""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(2, thread_name_prefix="sweep-gate")
            both = threading.Barrier(2)
            for f in [self._pool.submit(both.wait, 5) for _ in range(2)]:
                try:
                    f.result()
                except threading.BrokenBarrierError:
                    pass              # (not started within 5 s: it will be when needed)
        return self._pool

    def observe_beside(self) -> Future:
        """observe() in a thread of its own, beside the caller's page-table walks (the final
        collect: its /proc pass runs in C without the GIL)."""
        return self._workers().submit(self.observe)

    def close(self) -> None:
        self._inotify = close_fd(self._inotify)
        self._watches.clear()
        if self._holes is not None:
            self._holes.exception()
            self._holes = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._pagemap = closed(self._pagemap)
        self._holder = closed(self._holder)
        self._views.clear()

    def _range(self, key: ObjectKey) -> tuple[int, int]:
        rs = [r for r in self.regions if r.object_key == key]
        return min(r.offset for r in rs), max(r.offset + r.size for r in rs)

    def observe(self) -> HolderScan:
        """Scan the holders now (the caller passes the result to decide())."""
        scan = scan_holders(self.keys, skip=self.skip | self.helper_pids)
        # migrator's own read-only mappings and descriptors (the sender's views, the ledger's
        # descriptors) write nothing; the process counts as a holder only for writable ones
        me = scan.holders.get(os.getpid())
        if me is not None:
            me.maps = [m for m in me.maps if "w" in m.perms]
            if not me.maps and not me.writable:
                del scan.holders[me.pid]
        self.scan_s = scan.scan_s
        return scan

    def start(self, scan: HolderScan | None = None) -> None:
        """The baseline: what holds the objects when tracking begins."""
        self._workers()
        self._watch()
        self._prev = scan or self.observe()
        self._open_views()
        for k, checked in self._check(refill=False).items():
            if checked is not None:
                self._known_holes[k] = checked[0] - checked[1]

    def _watch(self) -> None:
        """An inotify watch (IN_MODIFY) on each object: writes through a file opened by path (a
        tmpfs file, a memfd reopened through /proc/PID/fd or map_files, by any process) raise
        it, however short-lived the writer.  Best effort: where it cannot be set, those
        writers stay out of reach (docs/tracking.md)."""
        if self._inotify < 0:
            fd = lib.mg_inotify_open()
            if fd < 0:
                return
            self._inotify = fd
        for k in self.keys:
            fd = self.fds.get(k)
            if fd is None or k in self._watches.values():
                continue
            wd = lib.mg_inotify_watch(self._inotify, f"/proc/self/fd/{fd}".encode())
            if wd >= 0:
                self._watches[wd] = k

    def _modified_by_path(self) -> set[ObjectKey]:
        """The objects whose watch fired since the last call."""
        out: set[ObjectKey] = set()
        if self._inotify < 0:
            return out
        while True:
            try:
                data = os.read(self._inotify, 65536)
            except BlockingIOError:
                return out
            pos = 0
            while pos + 16 <= len(data):
                wd, _mask, _cookie, n = struct.unpack_from("iIII", data, pos)
                if wd in self._watches:
                    out.add(self._watches[wd])
                pos += 16 + n

    def decide(self, scan: HolderScan, uncovered: dict[ObjectKey, str]) -> dict[ObjectKey, Sweep]:
        """The objects to sweep this collect, with why.  uncovered: objects whose mappers'
        page tables did not cover the interval (from the write-protect tracking), and why."""
        prev = self._prev
        assert prev is not None, "start() first"
        reasons: dict[ObjectKey, list[str]] = {k: [] for k in self.keys}
        for k, why in uncovered.items():
            if k in reasons:
                reasons[k].append(why)
        for k in self._modified_by_path():
            reasons[k].append("it was written through a file opened by path (inotify: a tmpfs path, "
                              "/proc/PID/fd or map_files)")
        # holders gone since the previous collect: their last calls are unknown unless they
        # still live (a process that closed the descriptor: its counters are still readable)
        gone: dict[int, Holder] = {}
        for pid in prev.holders:
            if pid not in scan.holders:
                gone[pid] = now = Holder(pid)
                read_counters(now)
        for k in self.keys:
            for pid, h in scan.holders.items():
                reasons[k] += self._holder_reasons(k, pid, h, prev.holders.get(pid))
            for pid, now in gone.items():
                reasons[k] += self._gone_reasons(k, pid, prev.holders[pid], now)
        self._forks(scan, prev, reasons)
        self._holes_made(reasons)
        self._prev = scan
        out = {}
        for k, why in reasons.items():
            if why:
                names = tuple(r.name for r in self.regions if r.object_key == k)
                lo, hi = self._range(k)
                out[k] = Sweep(k, names, hi - lo, "; ".join(dict.fromkeys(why)))
        self.last = out
        return out

    def _holder_reasons(self, k: ObjectKey, pid: int, h: Holder, old: Holder | None) -> list[str]:
        """Why holder pid (h now, old at the previous collect, None if new) may have written
        object k without its page tables showing it (conditions 2-6)."""
        mapped, writable = k in h.mapped, k in h.writable
        if not (mapped or writable or (old and (k in old.writable or k in old.mapped))):
            return []
        why = []
        was_writable = old is not None and k in old.writable
        if (writable or was_writable) and pid not in self.vouched:
            if not was_writable:
                why.append(f"process {pid} opened it for writing since the last collect")
            elif h.syscw < 0 or old.syscw < 0:
                why.append(f"process {pid}'s write calls cannot be counted (/proc/{pid}/io)")
            elif h.syscw != old.syscw:
                why.append(f"process {pid} made {h.syscw - old.syscw} write calls")
        if h.async_io:
            why.append(f"process {pid} has asynchronous I/O ({h.async_io})")
        if mapped:
            if h.vm_pin_kb:
                why.append(f"process {pid} has {h.vm_pin_kb} kB of pinned memory (VmPin)")
            if old is not None and h.syscr != old.syscr and (h.direct_fds or old.direct_fds):
                why.append(f"process {pid} completed {h.syscr - old.syscr} read calls with "
                           "O_DIRECT descriptors open (direct I/O lands in pinned pages "
                           "without a fault)")
        if old is not None and h.cminflt != old.cminflt:
            why.append(f"process {pid} reaped a child (children inherit its mappings and descriptors)")
        return why

    def _gone_reasons(self, k: ObjectKey, pid: int, old: Holder, now: Holder) -> list[str]:
        """Why a holder of object k at the previous collect, gone now, may have written it."""
        if not (k in old.writable or k in old.mapped):
            return []
        if now.syscw < 0:
            return [f"process {pid}, which held it, exited"]
        if k in old.writable and pid not in self.vouched and now.syscw != old.syscw:
            return [f"process {pid} made write calls, then let it go"]
        if now.cminflt != old.cminflt:
            return [f"process {pid} reaped a child"]
        return []

    def _forks(self, scan: HolderScan, prev: HolderScan, reasons: dict[ObjectKey, list[str]]) -> None:
        """Children of holders born since the previous collect (condition 6)."""
        holder_pids = set(prev.holders) | set(scan.holders)
        for child in scan.pids - prev.pids:
            parent = parent_of(child)
            if parent in holder_pids:
                h = prev.holders.get(parent) or scan.holders[parent]
                for k in self.keys:
                    if k in h.mapped or k in h.writable:
                        reasons[k].append(f"process {parent} forked process {child}")

    def _holes_made(self, reasons: dict[ObjectKey, list[str]]) -> None:
        """Condition 7: the pages of each object absent from migrator's view, for the ledger to
        hash (unseen); an object without a view is swept."""
        if self._holes is not None:
            checked, self._holes = self._holes.result(), None
        else:
            checked = self._check(refill=True)
        self.unseen, self.left_view = {}, {}
        for k in self.keys:
            now = checked[k]
            if now is None:
                reasons[k].append("migrator could not map it to find pages punched or reclaimed"
                                  + (f" ({self.view_error})" if self.view_error else ""))
                continue
            absent, data = now
            holes = absent - data
            known = self._known_holes.get(k)
            if known is None:
                known = PageSet(absent.npages)
            self.left_view[k] = len(absent - known)
            # a hole then and now reads as zeros still: not hashed again
            todo = data | (holes - known)
            lo = self._range(k)[0]
            self.unseen[k] = [(lo + a * PAGE_SIZE, lo + b * PAGE_SIZE) for a, b in todo.runs()]
            self._known_holes[k] = holes
