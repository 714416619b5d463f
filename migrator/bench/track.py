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
Each figure is min / median over --runs runs; throughput ratios are computed from the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import xxhash

from ..kernel.maps import read_maps, select_regions
from ..kernel.native import PAGE_SIZE, ffi, lib
from ..kernel.pagemap import (PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING,
                              PM_SOFT_DIRTY, Pagemap, decode_match_py)
from ..kernel.scratch import Scratch
from ..kernel.uffd import create_in_this_process
from ..tracking.fullhash import FullHashTracker
from ..tracking.ledger import LedgerTracker
from ..tracking.writeprotect import WriteProtectTracker
from ..units import parse_size

FRACTIONS = (0.0, 0.01, 0.10, 1.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="1G", help="memory per tracker (default 1G)")
    p.add_argument("--runs", type=int, default=5, help="runs per figure (default 5)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000.0


def _dirty(s: Scratch, pages: list[int], tick: int) -> None:
    b = tick.to_bytes(8, "little")
    for p in pages:
        s.write(p, b)


def run(args: argparse.Namespace) -> int:
    size = parse_size(args.size)
    npages = size // PAGE_SIZE
    gib = size / (1 << 30)
    rng = random.Random(1)
    print(f"migrator bench track: {size >> 20} MiB per tracker, {args.runs} runs, page {PAGE_SIZE} B")
    uffd = create_in_this_process()
    anon = Scratch(npages)
    shm = Scratch(npages, "bench-ram")
    for s in (anon, shm):            # populate with distinct contents
        _dirty(s, range(npages), 1)
    pid = os.getpid()
    maps = read_maps(pid)
    (r_anon,) = select_regions(maps, [f"{anon.addr:x}-{anon.addr + anon.size:x}"])
    (r_shm,) = select_regions(maps, ["bench-ram"])
    results: dict[str, dict[str, list[float]]] = {}

    def rec(name: str, frac: float, ms: float) -> None:
        results.setdefault(name, {}).setdefault(f"{frac:g}", []).append(ms)

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
                        anon.addr, anon.addr + anon.size, bits,
                        flags=PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
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
        rec("bare xxh3 (C, per page)", 0, _timed(lambda: lib.mg_hash_mem_pages(src, npages, PAGE_SIZE, hashes)))
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
    wp.end()
    led.end()
    fh.end()
    pm.close()

    def med(name: str, frac: float = 0) -> float:
        return statistics.median(results[name][f"{frac:g}"]) / gib

    print(f"\nms per GiB, min / median of {args.runs}:")
    print(f"{'':26}" + "".join(f"{f * 100:>16.0f} %" for f in FRACTIONS))
    for name, per in results.items():
        if len(per) == 1:
            continue
        print(f"{name:26}" + "".join(
            f"{min(v) / gib:>9.2f} /{statistics.median(v) / gib:>7.2f}" for v in per.values()))
    print("\nfraction-independent, ms per GiB, min / median:")
    for name, per in results.items():
        if len(per) == 1:
            v = per["0"]
            print(f"{name:26}{min(v) / gib:>9.2f} /{statistics.median(v) / gib:>7.2f}")
    led_gbs = 1 / (med("ledger collect", 0.0) / 1000)
    bare_gbs = 1 / (med("bare xxh3 (C, per page)") / 1000)
    one_gbs = 1 / (med("bare xxh3 (1 call)") / 1000)
    summary = {
        "wp_clean_vs_bare_ioctl": med("wp collect", 0.0) / med("bare ioctl", 0.0),
        "ledger_GiBps": led_gbs,
        "bare_xxh3_per_page_GiBps": bare_gbs,
        "bare_xxh3_one_call_GiBps": one_gbs,
        "ledger_vs_bare_per_page": led_gbs / bare_gbs,
        "ledger_vs_bare_one_call": led_gbs / one_gbs,
        "decode_c_speedup": med("decode py") / med("decode C"),
        "tracker_bytes_per_page": mem,
    }
    print("\ntargets:")
    print(f"  wp clean collect / bare ioctl      {summary['wp_clean_vs_bare_ioctl']:.2f}x   (target <= 1.5x)")
    print(f"  ledger sweep throughput            {led_gbs:.1f} GiB/s = {summary['ledger_vs_bare_per_page'] * 100:.0f} % of "
          f"bare per-page xxh3 ({bare_gbs:.1f} GiB/s), {summary['ledger_vs_bare_one_call'] * 100:.0f} % of one-call xxh3 "
          f"({one_gbs:.1f} GiB/s)   (target >= 50 %)")
    print(f"  C pagemap decode vs Python         {summary['decode_c_speedup']:.0f}x   (target >= 5x)")
    print("  tracker memory per tracked page    " + ", ".join(f"{k} {v:.2f} B" for k, v in mem.items())
          + "   (target <= 16 B)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": size, "runs": args.runs, "ms": results, "summary": summary}, f, indent=2)
    anon.close()
    shm.close()
    return 0
