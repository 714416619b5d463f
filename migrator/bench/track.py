"""Cost of one collect per tracker, per GiB, beside the bare kernel calls and bare hashing.

For each fraction of pages written (0, 1, 10, 100 %), in this process (it is its own target):
  wp collect        WriteProtectTracker.collect on private anonymous memory
  bare ioctl        one PAGEMAP_SCAN walk (WP_MATCHING, WRITTEN) over the same memory, no tracker
  ledger collect    LedgerTracker.collect on a memfd of the same size (page cache via map_files)
  hash collect      FullHashTracker.collect (process_vm_readv) on the private memory
  bare xxh3 (C)     XXH3-64 of every page of the mapped memory, in C, no reading
  bare xxh3 (1 call) python-xxhash over the whole range in one call
  pagemap read      pread of the pagemap entries of the range
  decode C / py     soft-dirty decode of those entries in C and in a Python loop

For a target that does not cooperate (a separate process, migrator/bench/_target.py, holding --size
of private anonymous memory and a memfd of --size; its userfaultfd injected by ptrace, UffdPool):
  wp collect (injected)        WriteProtectTracker.collect on the target's private memory
  bare ioctl (target)          the same PAGEMAP_SCAN walk on the target's /proc/PID/pagemap
  mappers collect (3 mappers)  MapperTracker.collect of the memfd, mapped and written by the target
                               and two other processes (discover_every_s large: no /proc scan in it)
  bare ioctls (3 mappers)      the sum of the PAGEMAP_SCAN walks over each mapper's mapping
  mapper discovery (/proc scan) find_mappers over every process in /proc (its own row)
  injection                    inject_userfaultfd on the idle target and on a running guest:
                               wall time of the call, and the Injection's total/stop-wait/window
  target loop                  a guest (`migrator guest`, C write loop, --rate max) writing only
                               its --size private block: pages/s untracked against tracked by
                               WriteProtectTracker (injected uffd, a collect every --interval),
                               alternating, --loop-s seconds per condition and workload in --runs
                               segments; distinct pages a round dirtied and the collect cost
Each figure is min / median over --runs runs; throughput ratios are computed from the medians.
--parts picks sections: self (in this process), injected, mappers, inject, loop.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from array import array

import xxhash

from ..errors import MigratorError, UsageError
from ..kernel.mappers import find_mappers
from ..kernel.maps import Region, read_maps, select_regions
from ..kernel.native import PAGE_SIZE, ffi, lib
from ..kernel.pagemap import (PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING,
                              PM_SOFT_DIRTY, Pagemap, decode_match_py)
from ..kernel.scratch import Scratch
from ..kernel.uffd import create_in_this_process
from ..tracking.fullhash import FullHashTracker
from ..tracking.ledger import LedgerTracker
from ..tracking.mappers import MapperTracker
from ..tracking.uffds import UffdPool
from ..tracking.writeprotect import WriteProtectTracker
from ..units import parse_size

FRACTIONS = (0.0, 0.01, 0.10, 1.0)
PARTS = ("self", "injected", "mappers", "inject", "loop")
SCAN_FLAGS = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="1G", help="memory per tracker (default 1G)")
    p.add_argument("--runs", type=int, default=5, help="runs per figure (default 5)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"sections to run, comma-separated (default all: {','.join(PARTS)})")
    p.add_argument("--injections", type=int, default=20,
                   help="injections timed per target (default 20)")
    p.add_argument("--loop-s", type=float, default=10.0,
                   help="target loop: seconds per workload and condition (tracked / untracked), "
                   "split into --runs alternating segments (default 10)")
    p.add_argument("--interval", type=float, default=0.1,
                   help="target loop: seconds between collects while tracked (default 0.1)")
    p.add_argument("--workloads", default="hotcold,random",
                   help="target loop: guest workloads, comma-separated (default hotcold,random)")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000.0


def _dirty(s: Scratch, pages: list[int], tick: int) -> None:
    b = tick.to_bytes(8, "little")
    for p in pages:
        s.write(p, b)


Rows = dict[str, dict[str, list[float]]]          # row name -> fraction ("0.01") -> ms per run


def _in_process(args: argparse.Namespace, size: int, rec) -> dict:
    """The rows measured in this process (it is its own target).  Returns its summary figures."""
    npages = size // PAGE_SIZE
    rng = random.Random(1)
    uffd = create_in_this_process()
    anon = Scratch(npages)
    shm = Scratch(npages, "bench-ram")
    for s in (anon, shm):            # populate with distinct contents
        _dirty(s, range(npages), 1)
    pid = os.getpid()
    maps = read_maps(pid)
    (r_anon,) = select_regions(maps, [f"{anon.addr:x}-{anon.addr + anon.size:x}"])
    (r_shm,) = select_regions(maps, ["bench-ram"])
    wp = WriteProtectTracker(pid, [r_anon], uffd_fd=uffd)
    wp.begin()
    led = LedgerTracker(pid, [r_shm])
    led.begin()
    fh = FullHashTracker(pid, [r_anon])
    fh.begin()
    pm = Pagemap(pid)
    bits = bytearray((npages + 7) // 8)
    tick = 2
    for frac in FRACTIONS:
        k = int(npages * frac)
        for _ in range(args.runs):
            pages = sorted(rng.sample(range(npages), k))
            tick += 1
            _dirty(anon, pages, tick)
            res = {}
            # alternate which goes first, so neither always meets a colder cache
            order = ["tracker", "bare"] if _ % 2 == 0 else ["bare", "tracker"]
            for what in order:
                if what == "tracker":
                    rec("wp collect", frac, _timed(lambda: res.__setitem__("wp", wp.collect())))
                    assert res["wp"].count() == k, (res["wp"].count(), k)
                else:
                    rec("bare ioctl", frac, _timed(lambda: res.__setitem__("bare", pm.scan(
                        anon.addr, anon.addr + anon.size, bits, flags=SCAN_FLAGS,
                        category_mask=PAGE_IS_WRITTEN, return_mask=PAGE_IS_WRITTEN))))
                    assert res["bare"] == k, (res["bare"], k)
                tick += 1
                _dirty(anon, pages, tick)
            wp.collect()        # consume the last round of writes
            _dirty(shm, pages, tick)
            rec("ledger collect", frac, _timed(lambda: res.__setitem__("led", led.collect())))
            assert res["led"].count() == k, (res["led"].count(), k)
            rec("hash collect", frac, _timed(lambda: res.__setitem__("fh", fh.collect())))
            # fh sees anon writes since its own previous collect
    hashes = ffi.new("uint64_t[]", npages)
    src = ffi.cast("uint8_t *", shm.addr)
    entries = ffi.new("uint64_t[]", npages)
    for _ in range(args.runs):
        rec("bare xxh3 (C, per page)", 0, _timed(lambda: lib.mgk_hash_mem_pages(src, npages, PAGE_SIZE, hashes)))
        view = memoryview(shm.map)
        rec("bare xxh3 (1 call)", 0, _timed(lambda: xxhash.xxh3_64_intdigest(view)))
        view.release()
        rec("pagemap read", 0, _timed(lambda: lib.mg_pagemap_read(pm.fd, anon.addr, npages, PAGE_SIZE, entries)))
        raw = ffi.buffer(entries)[:]
        words = [int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8)]
        bm = bytearray((npages + 7) // 8)
        rec("decode C", 0, _timed(lambda: lib.mg_pagemap_match(entries, npages, PM_SOFT_DIRTY, PM_SOFT_DIRTY,
                                                               ffi.from_buffer(bm), 0)))
        rec("decode py", 0, _timed(lambda: decode_match_py(words, PM_SOFT_DIRTY, PM_SOFT_DIRTY)))
    mem = {"wp": wp.memory_bytes() / npages, "ledger": led.memory_bytes() / npages,
           "hash": fh.memory_bytes() / npages}
    # layout checks (a second walk) the in-process wp collects ran: this process's own
    # allocations between collects change its size, which triggers them
    layout_checks = wp.layout_checks
    wp.end()
    led.end()
    fh.end()
    pm.close()
    anon.close()
    shm.close()
    os.close(uffd)
    return {"tracker_bytes_per_page": mem, "self_wp_layout_checks": layout_checks}


# --- non-cooperating targets (separate processes) ------------------------------------------------

class _Target:
    """A migrator.bench._target process: start(), then ready() reads its JSON line."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "migrator.bench._target", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env={**os.environ, "PYTHONMALLOC": "malloc"})
        self.info: dict = {}
        self.pid = self.proc.pid

    def ready(self) -> "_Target":
        line = self.proc.stdout.readline()
        if not line:
            raise MigratorError(f"bench target {self.pid} failed to start (status {self.proc.poll()})")
        self.info = json.loads(line)
        assert self.info["pid"] == self.pid
        return self

    def span(self, region: str) -> tuple[int, int]:
        a, b = self.info["regions"][region]
        return a, b

    def region(self, region: str) -> Region:
        a, b = self.span(region)
        (r,) = select_regions(read_maps(self.pid), [f"{a:x}-{b:x}"])
        return r

    def send(self, region: str, pages) -> int:
        """Ask for writes (not waiting): pages is a sorted list of page indices, or a
        (first, step, count) stride.  Returns the pages to be written."""
        if isinstance(pages, tuple):
            first, step, n = pages
            line = f"s {region} {first} {step} {n}\n"
        else:
            n = len(pages)
            line = f"w {region} {array('I', pages).tobytes().hex()}\n"
        self.proc.stdin.write(line.encode())
        self.proc.stdin.flush()
        return n

    def wait(self, n: int) -> None:
        reply = self.proc.stdout.readline().decode().strip()
        if reply != f"ok {n}":
            raise MigratorError(f"bench target {self.pid}: {reply or 'exited'} (expected ok {n})")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b"q\n")
                self.proc.stdin.close()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def _pick(rng: random.Random, npages: int, k: int) -> list[int] | None:
    """k distinct pages, sorted; None for every page."""
    if k == npages:
        return None
    return sorted(rng.sample(range(npages), k))


def _tracker_vs_bare(rng: random.Random, npages: int, runs: int, rec, labels: tuple[str, str],
                     write, collect, bare, check=lambda collected: None) -> None:
    """For each of FRACTIONS, `runs` times: write(pages) k picked pages, then time collect()
    (the tracker) and bare() (the bare kernel calls: pages found) in turn, tracker first on even
    runs, each finding exactly k pages (check() looks at the tracker's result too), the pages
    written again after each; rec(labels[0] or labels[1], fraction, seconds)."""
    for frac in FRACTIONS:
        k = int(npages * frac)
        for i in range(runs):
            pages = _pick(rng, npages, k)
            write(pages)
            for what in (("tracker", "bare") if i % 2 == 0 else ("bare", "tracker")):
                out: list = []
                if what == "tracker":
                    rec(labels[0], frac, _timed(lambda: out.append(collect())))
                    assert out[0].count() == k, (out[0].count(), k)
                    check(out[0])
                else:
                    rec(labels[1], frac, _timed(lambda: out.append(bare())))
                    assert out[0] == k, (out[0], k)
                write(pages)
            collect()            # consume the last round of writes


def _write_spread(writers: list[_Target], region: str, pages: list[int] | None, npages: int) -> None:
    """Write pages (None: all) split over the writers (page i of the set by writer i mod n), in
    parallel; returns once every writer is done."""
    n = len(writers)
    if pages is not None and not pages:
        return
    sent = []
    for j, w in enumerate(writers):
        job = (j, n, len(range(j, npages, n))) if pages is None else pages[j::n]
        sent.append((w, w.send(region, job)))
    for w, k in sent:
        w.wait(k)


def _scan(pm: Pagemap, a: int, b: int, bits: bytearray) -> int:
    return pm.scan(a, b, bits, flags=SCAN_FLAGS, category_mask=PAGE_IS_WRITTEN,
                   return_mask=PAGE_IS_WRITTEN)


def _rows_injected(args, tgt: _Target, pool: UffdPool, rec, info: dict) -> None:
    """wp collect (injected) against bare ioctl (target): the target's private memory."""
    rng = random.Random(2)
    r = tgt.region("anon")
    npages = r.npages
    wp = WriteProtectTracker(tgt.pid, [r], pool=pool)
    t0 = time.perf_counter()
    wp.begin()                       # the pool injects a userfaultfd into the target here
    info["injected_begin_ms"] = (time.perf_counter() - t0) * 1000
    info["injected_origin"] = pool.origins[tgt.pid].detail
    pm = Pagemap(tgt.pid)
    bits = bytearray((npages + 7) // 8)
    try:
        _tracker_vs_bare(rng, npages, args.runs, rec, ("wp collect (injected)", "bare ioctl (target)"),
                         lambda pages: _write_spread([tgt], "anon", pages, npages), wp.collect,
                         lambda: _scan(pm, r.start, r.end, bits))
        info["injected_layout_checks"] = wp.layout_checks
    finally:
        pm.close()
        wp.end()


def _rows_mappers(args, tgt: _Target, others: list[_Target], pool: UffdPool, rec, rec_other,
                  info: dict) -> None:
    """mappers collect (3 mappers) against the sum of the bare walks over each mapper's mapping;
    then the /proc scan alone."""
    rng = random.Random(3)
    r = tgt.region("shm")
    npages = r.npages
    writers = [tgt, *others]
    mt = MapperTracker(tgt.pid, [r], pool, discover_every_s=3600.0)
    t0 = time.perf_counter()
    mt.begin()                       # /proc scan, then an injection into each other mapper
    info["mappers_begin_ms"] = (time.perf_counter() - t0) * 1000
    found = mt.mappers()
    info["mappers"] = {str(p): how for p, how in found.items()}
    if set(found) != {w.pid for w in writers}:
        raise MigratorError(f"MapperTracker found mappers {found}, expected {[w.pid for w in writers]}")
    pms = [(Pagemap(w.pid), *w.span("shm")) for w in writers]
    bits = bytearray((npages + 7) // 8)

    def bare() -> int:
        return sum(_scan(pm, a, b, bits) for pm, a, b in pms)

    try:
        def no_events(collected) -> None:
            assert not collected.events, collected.events
        _tracker_vs_bare(rng, npages, args.runs, rec, ("mappers collect (3 mappers)", "bare ioctls (3 mappers)"),
                         lambda pages: _write_spread(writers, "shm", pages, npages), mt.collect, bare, no_events)
        keys = {r.object_key}
        me = {os.getpid()}
        for _ in range(args.runs):
            res = {}
            rec_other("mapper discovery (/proc scan)", "ms",
                      _timed(lambda: res.__setitem__("m", find_mappers(keys, skip=me))))
            assert set(res["m"]) == {w.pid for w in writers}, res["m"]
        info["proc_processes"] = sum(1 for n in os.listdir("/proc") if n.isdigit())
        info["mapper_discoveries_in_tracker"] = mt.discovers
    finally:
        for pm, _a, _b in pms:
            pm.close()
        mt.end()


def _injections(pid: int, n: int, label: str, rec_other, info: dict) -> None:
    """n injections into process pid, each fd closed after: the call's wall time and the
    Injection's own timings, in µs."""
    from ..kernel.inject import inject_userfaultfd

    restarted = 0
    for _ in range(n):
        t0 = time.perf_counter()
        inj = inject_userfaultfd(pid)
        wall = time.perf_counter() - t0
        os.close(inj.fd)
        rec_other(f"inject call, wall ({label})", "us", wall * 1e6)
        rec_other(f"inject total_s, seize..detach ({label})", "us", inj.total_s * 1e6)
        rec_other(f"inject stop_wait_s ({label})", "us", inj.stop_wait_s * 1e6)
        rec_other(f"inject window_s ({label})", "us", inj.window_s * 1e6)
        restarted += inj.restarted
    info[f"inject_{label}"] = {"count": n, "restarted": restarted,
                               "user_mode_only": inj.user_mode_only}


def _children(args, size: int, parts: list[str], rec, rec_other, info: dict) -> None:
    want_mappers = "mappers" in parts
    t0 = time.perf_counter()
    tgt = _Target("--anon", str(size), "--shm", str(size) if want_mappers else "0")
    procs = [tgt]
    try:
        tgt.ready()
        others = []
        if want_mappers:
            src = f"/proc/{tgt.pid}/fd/{tgt.info['memfd']}"
            others = [_Target("--shm-from", src) for _ in range(2)]
            procs += others
            for o in others:
                o.ready()
        info["children_setup_s"] = time.perf_counter() - t0
        pool = UffdPool()
        try:
            if "injected" in parts:
                _rows_injected(args, tgt, pool, rec, info)
            if want_mappers:
                _rows_mappers(args, tgt, others, pool, rec, rec_other, info)
        finally:
            pool.close()
        if "inject" in parts:
            _injections(tgt.pid, args.injections, "idle target", rec_other, info)
            # the target, stopped in read(2) at every injection, still reads and writes
            _write_spread([tgt], "anon", [0, 1], size // PAGE_SIZE)
    finally:
        for p in procs:
            p.close()


def _target_loop(args, size: int, parts: list[str], rec_other, info: dict) -> dict:
    """A guest's C write loop (--rate max, private memory only), untracked against tracked
    (injected uffd, WriteProtectTracker, a collect every --interval), alternating segments."""
    from ..guest.launcher import start_guest
    from ..guest.spec import GuestSpec
    from ..guest.workloads import WorkloadSpec

    out = {}
    seg = args.loop_s / args.runs
    kinds = [k.strip() for k in args.workloads.split(",") if k.strip()]
    for wi, kind in enumerate(kinds):
        spec = GuestSpec(shared_ram=PAGE_SIZE, anon_ram=size, target="anon",
                         workload=WorkloadSpec(kind, -1.0, seed=1))
        with start_guest(spec) as g:
            ga = g.region("anon")
            (r,) = select_regions(read_maps(g.pid), [f"{ga.start:x}-{ga.end:x}"])
            if wi == 0 and "inject" in parts:
                _injections(g.pid, args.injections, "running guest", rec_other, info)

            def written() -> int:
                return g.stats().writers["vcpu"].pages

            rates: dict[str, list[float]] = {"untracked": [], "tracked": []}
            rounds: list[int] = []
            costs: list[float] = []
            layout_checks = 0
            pool = UffdPool()
            try:
                time.sleep(0.5)                    # warm-up
                for i in range(2 * args.runs):
                    tracked = i % 2 == 1
                    wp = None
                    if tracked:
                        wp = WriteProtectTracker(g.pid, [r], pool=pool)
                        wp.begin()
                    p0, t0 = written(), time.monotonic()
                    end = t0 + seg
                    if wp is not None:
                        j = 1
                        while t0 + j * args.interval <= end + 1e-9:
                            time.sleep(max(0.0, t0 + j * args.interval - time.monotonic()))
                            res = wp.collect()
                            rounds.append(res.count())
                            costs.append(res.cost_s * 1000)
                            j += 1
                    time.sleep(max(0.0, end - time.monotonic()))
                    p1, t1 = written(), time.monotonic()
                    if wp is not None:
                        layout_checks += wp.layout_checks
                        wp.end()
                    rates["tracked" if tracked else "untracked"].append((p1 - p0) / (t1 - t0))
                origin = pool.origins[g.pid].detail if g.pid in pool.origins else ""
            finally:
                pool.close()
        u, t = statistics.median(rates["untracked"]), statistics.median(rates["tracked"])
        slow = 1 - t / u
        dist = statistics.median(rounds)
        out[kind] = {"pages_per_s": rates, "distinct_pages_per_round": rounds,
                     "collect_ms": costs, "untracked_median": u, "tracked_median": t,
                     "slowdown": slow, "distinct_median": dist,
                     "implied_us_per_wp_fault": slow * args.interval / dist * 1e6 if dist else None,
                     "segment_s": seg, "origin": origin, "layout_checks": layout_checks}
    return out


def _fmt_cell(v: list[float] | None, scale: float, w: int = 9) -> str:
    if not v:
        return f"{'-':>{w + 9}}"
    return f"{min(v) * scale:>{w}.2f} /{statistics.median(v) * scale:>7.2f}"


def _verdict(value: float, limit: float) -> str:
    return "ok" if value <= limit else "MISSED"


class _Figures:
    """What the bench measured: rows of ms by share of pages written (`results`), other figures
    with their unit, set-up information, and the summary of ratios against their targets."""

    def __init__(self, gib: float) -> None:
        self.gib = gib
        self.results: Rows = {}
        self.other: dict[str, dict] = {}
        self.info: dict = {}
        self.summary: dict = {}

    def rec(self, name: str, frac: float, ms: float) -> None:
        self.results.setdefault(name, {}).setdefault(f"{frac:g}", []).append(ms)

    def rec_other(self, name: str, unit: str, v: float) -> None:
        self.other.setdefault(name, {"unit": unit, "values": []})["values"].append(v)

    def med(self, name: str, frac: float = 0) -> float:
        """A row's median, ms per GiB."""
        return statistics.median(self.results[name][f"{frac:g}"]) / self.gib


def _print_rows(args: argparse.Namespace, fig: _Figures) -> None:
    """The rows by share of pages written, the fraction-independent ones, the other figures."""
    gib, results, other = fig.gib, fig.results, fig.other
    frac_rows = {k: v for k, v in results.items() if len(v) > 1}
    flat_rows = {k: v for k, v in results.items() if len(v) == 1}
    if frac_rows:
        note = " (mappers: per GiB of the object, mapped 3 times)" if any("mappers" in k for k in frac_rows) else ""
        print(f"\nms per GiB tracked{note}, min / median of {args.runs}, by share of pages written:")
        print(f"{'':30}" + "".join(f"{f * 100:>16.0f} %" for f in FRACTIONS))
        for name, per in frac_rows.items():
            print(f"{name:30}" + "".join(_fmt_cell(per.get(f"{f:g}"), 1 / gib) for f in FRACTIONS))
    if flat_rows:
        print("\nfraction-independent, ms per GiB, min / median:")
        for name, per in flat_rows.items():
            print(f"{name:30}{_fmt_cell(per['0'], 1 / gib)}")
    if other:
        print("\nother figures, min / median:")
        for name, o in other.items():
            v = o["values"]
            extra = ""
            if name.startswith("mapper discovery"):
                extra = f"   ({fig.info.get('proc_processes', '?')} processes in /proc)"
            print(f"{name:44}{min(v):>10.1f} /{statistics.median(v):>9.1f} {o['unit']}  (n={len(v)}){extra}")


def _print_loop(args: argparse.Namespace, size: int, loop: dict) -> None:
    """The target loop's table: pages/s untracked and tracked, slowdown, pages a round, collect ms."""
    print(f"\ntarget loop: guest C write loop (--rate max, {size >> 20} MiB private), pages/s, "
          f"{args.runs} x {args.loop_s / args.runs:g} s per condition, alternating; tracked = "
          f"injected uffd + WriteProtectTracker.collect every {args.interval * 1000:g} ms")
    print(f"{'workload':10}{'untracked min/med':>22}{'tracked min/med':>22}{'slowdown':>10}"
          f"{'pages/round med (min-max)':>28}{'collect ms med':>16}{'µs/fault':>10}")
    for kind, L in loop.items():
        u, t = L["pages_per_s"]["untracked"], L["pages_per_s"]["tracked"]
        rd = L["distinct_pages_per_round"]
        per_fault = L["implied_us_per_wp_fault"]
        rounds = f"{statistics.median(rd):.0f} ({min(rd)}-{max(rd)})"
        print(f"{kind:10}{min(u):>12.0f} /{statistics.median(u):>8.0f}{min(t):>12.0f} /"
              f"{statistics.median(t):>8.0f}{L['slowdown'] * 100:>9.1f}%{rounds:>28}"
              f"{statistics.median(L['collect_ms']):>16.2f}"
              + (f"{per_fault:>10.2f}" if per_fault is not None else f"{'-':>10}"))
    print("  (µs/fault: slowdown x interval / distinct pages a round dirtied: the time the loop "
          "lost per write-protect fault it took)")
    for kind, L in loop.items():
        writes = L["tracked_median"] * args.interval
        print(f"  {kind}: {writes:.0f} page writes a round while tracked, {L['distinct_median'] / writes * 100:.0f} % "
              f"of them to a page not yet written that round (a fault each); {L['origin']}; "
              f"layout checks in tracked collects: {L['layout_checks']}")


def _print_info(info: dict) -> None:
    print("\nset-up: " + "; ".join(
        f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()
        if not isinstance(v, dict)))
    for k, v in info.items():
        if isinstance(v, dict):
            print(f"  {k}: {v}")


def _targets_self(fig: _Figures) -> None:
    """The in-process targets: wp collect vs the bare ioctl, ledger sweep vs bare xxh3, C decode
    vs Python, tracker memory per page."""
    med, summary = fig.med, fig.summary
    led_gbs = 1 / (med("ledger collect", 0.0) / 1000)
    bare_gbs = 1 / (med("bare xxh3 (C, per page)") / 1000)
    one_gbs = 1 / (med("bare xxh3 (1 call)") / 1000)
    summary.update({
        "wp_clean_vs_bare_ioctl": med("wp collect", 0.0) / med("bare ioctl", 0.0),
        "ledger_GiBps": led_gbs,
        "bare_xxh3_per_page_GiBps": bare_gbs,
        "bare_xxh3_one_call_GiBps": one_gbs,
        "ledger_vs_bare_per_page": led_gbs / bare_gbs,
        "ledger_vs_bare_one_call": led_gbs / one_gbs,
        "decode_c_speedup": med("decode py") / med("decode C"),
    })
    mem = summary["tracker_bytes_per_page"]
    print(f"  wp clean collect / bare ioctl      {summary['wp_clean_vs_bare_ioctl']:.2f}x   (target <= 1.5x)")
    print(f"  ledger sweep throughput            {led_gbs:.1f} GiB/s = {summary['ledger_vs_bare_per_page'] * 100:.0f} % of "
          f"bare per-page xxh3 ({bare_gbs:.1f} GiB/s), {summary['ledger_vs_bare_one_call'] * 100:.0f} % of one-call xxh3 "
          f"({one_gbs:.1f} GiB/s)   (target >= 50 %)")
    print(f"  C pagemap decode vs Python         {summary['decode_c_speedup']:.0f}x   (target >= 5x)")
    print("  tracker memory per tracked page    " + ", ".join(f"{k} {v:.2f} B" for k, v in mem.items())
          + "   (target <= 16 B)")


def _targets_children(args: argparse.Namespace, fig: _Figures, loop: dict) -> None:
    """The targets of the child processes: injected and 3-mapper collects vs the bare walks,
    the injection's time, the target loop's slowdown."""
    med, summary, gib, other = fig.med, fig.summary, fig.gib, fig.other
    for label, coll, bare in (("injected wp", "wp collect (injected)", "bare ioctl (target)"),
                              ("3 mappers", "mappers collect (3 mappers)", "bare ioctls (3 mappers)")):
        if coll not in fig.results:
            continue
        for frac, limit in ((0.0, 1.2), (0.01, 1.5), (0.10, None), (1.0, None)):
            ratio = med(coll, frac) / med(bare, frac)
            over_us = (med(coll, frac) - med(bare, frac)) * gib * 1000
            key = f"{label.replace(' ', '_')}_{frac * 100:g}pct_vs_bare"
            summary[key] = ratio
            summary[key.replace("_vs_bare", "_overhead_us")] = over_us
            tgt = f"(target <= {limit}x: {_verdict(ratio, limit)})" if limit else "(no target)"
            print(f"  {label + f' collect / bare at {frac * 100:g} %':34} {ratio:5.2f}x   "
                  f"+{over_us:7.0f} µs over the bare walks   {tgt}")
    for label in ("idle target", "running guest"):
        name = f"inject total_s, seize..detach ({label})"
        if name in other:
            v = statistics.median(other[name]["values"]) / 1000
            wall = statistics.median(other[f"inject call, wall ({label})"]["values"]) / 1000
            summary[f"inject_total_ms_median ({label})"] = v
            summary[f"inject_call_ms_median ({label})"] = wall
            print(f"  {'injection (' + label + ')':34} {v:5.3f} ms seize..detach, {wall:.3f} ms the whole "
                  f"call (median)   (target well under 10 ms: {_verdict(wall, 10)})")
    for kind, L in loop.items():
        summary[f"loop_slowdown ({kind})"] = L["slowdown"]
        print(f"  {'target loop slowdown (' + kind + ')':34} {L['slowdown'] * 100:5.1f} %   "
              f"(target < 1 %: {_verdict(L['slowdown'], 0.01)}); {L['distinct_median']:.0f} distinct "
              f"pages a {args.interval * 1000:g} ms round")


def run(args: argparse.Namespace) -> int:
    size = parse_size(args.size)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise UsageError(f"unknown part(s) {', '.join(unknown) or '(none)'}: expected some of {', '.join(PARTS)}")
    if args.runs < 1 or args.loop_s <= 0 or args.interval <= 0 or args.injections < 1:
        raise UsageError("--runs and --injections must be >= 1, --loop-s and --interval > 0")
    gib = size / (1 << 30)
    print(f"migrator bench track: {size >> 20} MiB per tracker, {args.runs} runs, page {PAGE_SIZE} B, "
          f"parts {','.join(parts)}")
    t_start = time.perf_counter()
    fig = _Figures(gib)
    if "self" in parts:
        fig.summary.update(_in_process(args, size, fig.rec))
        fig.info["self_wp_layout_checks"] = fig.summary.pop("self_wp_layout_checks")
    if {"injected", "mappers", "inject"} & set(parts):
        _children(args, size, parts, fig.rec, fig.rec_other, fig.info)
    loop = {}
    if "loop" in parts:
        loop = _target_loop(args, size, parts, fig.rec_other, fig.info)
    _print_rows(args, fig)
    if loop:
        _print_loop(args, size, loop)
    if fig.info:
        _print_info(fig.info)
    print("\ntargets:")
    if "self" in parts:
        _targets_self(fig)
    _targets_children(args, fig, loop)
    elapsed = time.perf_counter() - t_start
    print(f"\nbench took {elapsed:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": size, "runs": args.runs, "parts": parts, "ms": fig.results,
                       "other": fig.other, "loop": loop, "info": fig.info, "summary": fig.summary,
                       "elapsed_s": elapsed}, f, indent=2)
    return 0
