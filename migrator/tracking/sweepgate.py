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
   object, so migrator keeps a read-only view of it (the sender's, of a sealed memfd, or one of
   its own), whose page tables hold every data page of the object: one PAGEMAP_SCAN of the view
   (page tables: ~1.6 ms a GiB) finds the pages absent from it.  Those are not swept with the
   whole object: the ledger hashes them alone (ShmemLedger.sweep(runs)), the data among them
   faulted back into the view first, so that the next check sees them go too.  A page that was a
   hole at the previous check and is one still is passed over (a hole reads as zeros until
   something writes it, and every writer is covered above).  Without a view (the object could
   not be mapped), the object is swept.

Otherwise the object is swept, and the decision says which condition failed (Sweep).  What stays
out of reach is written in docs/tracking.md ("When the ledger sweeps").
"""

from __future__ import annotations

import mmap
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from ..kernel.holders import Holder, HolderScan, parent_of, read_counters, scan_holders
from ..kernel.maps import Region
from ..kernel.native import PAGE_SIZE, ffi, lib
from ..kernel.pagemap import PAGE_IS_PRESENT, Pagemap
from ..kernel.resources import close_fd, closed
from ..kernel.shmem import data_extents
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
        # the pages absent from migrator's view of each object after the last check: holes
        # (the data pages absent were faulted back in)
        self._known_holes: dict[ObjectKey, PageSet] = {}
        self._views: dict[ObjectKey, tuple[int, int]] = {}     # key -> (address, pages)
        self._own_views: dict[ObjectKey, mmap.mmap] = {}        # views made by the gate itself
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

    def _own_view(self, key: ObjectKey) -> None:
        """Map the object's tracked range read-only, its data pages faulted in (MADV_POPULATE_READ:
        holes stay holes).  Only the gate faults pages into it (the sender's view of a sealed
        memfd will not do: a read there maps its neighbours too, see _holes_check), and nothing
        reads through it: a truncation under it cannot fault migrator."""
        fd = self.fds.get(key)
        if fd is None or key in self._views:
            return
        lo, hi = self._range(key)
        try:
            view = mmap.mmap(fd, hi - lo, mmap.MAP_SHARED, mmap.PROT_READ, offset=lo)
        except (OSError, ValueError):
            return              # (swept at every collect: see _holes_made)
        self._own_views[key] = view
        with ffi.from_buffer(view) as c:
            addr = int(ffi.cast("uintptr_t", c))
        self._views[key] = (addr, (hi - lo) // PAGE_SIZE)
        for a, b in data_extents(fd, lo, hi):
            lib.mgk_populate(ffi.cast("uint8_t *", addr + a - lo), b - a, 0)

    def _holes_check(self, key: ObjectKey, refill: bool) -> tuple[PageSet, PageSet] | None:
        """The pages absent from migrator's view of the object now, and the pages among them
        the ledger must hash besides the holes (the data pages); None without a view.
        refill: fault those data pages into the view (after finding them absent, before the
        ledger hashes them: a punch in between then leaves the view again, or is hashed as the
        zeros it left).  A read fault maps the page's neighbours in the page cache too (the
        kernel's fault-around, within the same page table: fault_around_bytes, 64 KiB by
        default, settable up to 2 MiB), and a neighbour punched and read back since the scan
        would come back into the view unseen: every page of the 2 MiB blocks of the view that
        a refill touched is hashed as well."""
        view = self._views.get(key)
        if view is None:
            return None
        if self._pagemap is None:
            self._pagemap = Pagemap(os.getpid())
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
        data = PageSet(n)
        fd = self.fds.get(key)
        if absent and fd is not None:
            lo = self._range(key)[0]
            for first, last in absent.runs():
                for a, b in data_extents(fd, lo + first * PAGE_SIZE, lo + last * PAGE_SIZE):
                    data.add_range((a - lo) // PAGE_SIZE, (b - lo) // PAGE_SIZE)
                    if refill:      # (EFAULT past a truncation: it stays absent, hashed again)
                        lib.mgk_populate(ffi.cast("uint8_t *", addr + a - lo), b - a, 0)
                        va, vb = addr + a - lo, addr + b - lo
                        wa = max(addr, va & ~(PMD_BYTES - 1))
                        wb = min(end, (vb + PMD_BYTES - 1) & ~(PMD_BYTES - 1))
                        data.add_range((wa - addr) // PAGE_SIZE, (wb - addr) // PAGE_SIZE)
        elif absent:            # (no descriptor: every absent page is hashed)
            data = absent.copy()
        return absent, data

    def begin_holes_check(self, final: bool = False) -> None:
        """Start this collect's hole check in a thread of its own (its page-table walk runs in
        C without the GIL, beside the holder scan and the write-protect scans); decide()
        takes its result.  final: the last check (nothing is faulted back into the views)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="sweep-gate")
        self._holes = self._pool.submit(lambda: {k: self._holes_check(k, not final) for k in self.keys})

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
        for v in self._own_views.values():
            v.close()
        self._own_views.clear()

    def _range(self, key: ObjectKey) -> tuple[int, int]:
        rs = [r for r in self.regions if r.object_key == key]
        return min(r.offset for r in rs), max(r.offset + r.size for r in rs)

    def observe(self) -> HolderScan:
        """Scan the holders now (the caller passes the result to decide())."""
        scan = scan_holders(self.keys, skip=self.skip)
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
        self._watch()
        self._prev = scan or self.observe()
        for k in self.keys:
            self._own_view(k)
            checked = self._holes_check(k, refill=False)
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
            checked = {k: self._holes_check(k, True) for k in self.keys}
        self.unseen, self.left_view = {}, {}
        for k in self.keys:
            now = checked[k]
            if now is None:
                reasons[k].append("migrator could not map it to find pages punched or reclaimed")
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
