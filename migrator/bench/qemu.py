"""Migrate the same QEMU VM both ways, migrator-driven and QEMU's own, side by side.

The runs themselves (a fresh VM per run, the destination checks, the table) are
migrator/bench/qemu_compare.py, shared with the scenario suite's `kind = "qemu"` scenarios; this is
the command line around them: several runs of each method, interleaved, medians in the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import asdict

from .qemu_compare import DEFAULT_OUT_DIR, EXTRA_METHODS, METHODS, TABLE_NOTE, CompareSettings, Run, prepare, run_method, table
from ..qemu.vm import BINARY, qemu_available
from ..transport import DEFAULT_CHANNELS
from ..units import parse_rate, parse_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ram", default="128M", help="guest RAM size (default 128M)")
    p.add_argument("--downtime-limit", type=float, default=300.0, metavar="MS", help="both (default 300)")
    p.add_argument("--max-bandwidth", default="10GB/s", metavar="RATE",
                   help="link cap for both (default 10GB/s: loopback; QEMU's default 32 MiB/s never "
                        "converges with this guest)")
    p.add_argument("--runs", type=int, default=1, help="runs of each method (medians are shown)")
    p.add_argument("--channels", type=int, default=DEFAULT_CHANNELS,
                   help=f"migrator TCP connections (default {DEFAULT_CHANNELS}, as migrate's)")
    p.add_argument("--compress", default="none", choices=["auto", "zstd", "lz4", "none"],
                   help="migrator's --compress (default none: QEMU compresses nothing either)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, of {', '.join(METHODS + EXTRA_METHODS)} (default: {', '.join(METHODS)})")
    p.add_argument("--json", metavar="FILE", help="write all runs as JSON")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR, metavar="DIR",
                   help="where the receiver writes the RAM image the destination QEMU runs on "
                        "(default /dev/shm: tmpfs, no disk writeback under the VM)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--timeline", action="store_true",
                   help="print each run's steps (both sides, ms after the start of the migration)")


def run(args: argparse.Namespace) -> int:
    if not qemu_available():
        print(f"{BINARY} not found: apt-get install qemu-system-x86", file=sys.stderr)
        return 2
    size = parse_size(args.ram)
    settings = CompareSettings(downtime_limit_ms=args.downtime_limit, max_bandwidth=parse_rate(args.max_bandwidth),
                               channels=args.channels, out_dir=args.out_dir, compress=args.compress)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS + EXTRA_METHODS]
    if unknown:
        print(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS + EXTRA_METHODS)}",
              file=sys.stderr)
        return 2
    runs: list[Run] = []
    work = tempfile.mkdtemp(prefix="migrator-bench-qemu-")
    boot, layout = prepare(work)
    print(f"VM: {size >> 20} MiB RAM, TCG, test guest dirtying {layout.pages} pages per pass; "
          f"downtime limit {args.downtime_limit:.0f} ms, cap {args.max_bandwidth}; work {work}",
          file=sys.stderr)
    for i in range(args.runs):
        for method in methods:
            r = run_method(method, work, boot, size, settings, layout)
            runs.append(r)
            print(f"run {i + 1} {r.line()}", file=sys.stderr)
            if args.timeline and r.timeline:
                print("  timeline (ms): " + ", ".join(f"{k} {v}" for k, v in r.timeline.items()),
                      file=sys.stderr)
    print(table(runs))
    print(TABLE_NOTE)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in runs], f, indent=2)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.ok for r in runs) else 1
