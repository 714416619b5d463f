"""How a migration's cost grows with memory size: real migrations of a nearly idle guest.

A guest that made no userfaultfd (`migrator guest` without --uffd), SIZE of populated shared RAM
plus 64 MiB of private RAM, written at random at 1 MB/s (optionally with a vhost-like writer
mapping its memfd, or a pwrite writer), migrated with the default policy to a receiver in its
own process writing to a folder on disk (not /dev/shm).  Per size and variant: tracker, status,
rounds, collect ms per GiB (live rounds), ledger sweeps (with their reasons in --json), downtime,
total time, MB sent, and the destination checked byte for byte against the paused source.  A pause that grows with the memory, not with
the pages written, shows here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile

import trio

from ..errors import MigratorError
from ..guest.launcher import start_guest
from ..guest.spec import GuestSpec
from ..guest.workloads import WorkloadSpec
from ..precopy.controller import MigrationPolicy, MigrationTarget, migrate
from ..receiver_process import ReceiverProcess
from ..scenarios.destination import compare_with_source
from ..transport import DEFAULT_CHANNELS
from ..transport.wire import MAX_CHANNELS
from ..units import format_bytes, parse_rate, parse_size

VARIANTS = ("plain", "vhost", "pwrite")
ANON = 64 << 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="1G,2G,4G,8G", help="shared RAM sizes (default 1G,2G,4G,8G)")
    p.add_argument("--variants", default="plain",
                   help=f"comma-separated, of {', '.join(VARIANTS)} (default plain): vhost adds a "
                        "vhost-like writer mapping the memfd, pwrite a pwrite writer")
    p.add_argument("--rate", default="1MB/s", help="the guest's random writes (default 1MB/s)")
    p.add_argument("--side-rate", default="10MB/s", help="the vhost or pwrite writer's rate (default 10MB/s)")
    p.add_argument("--runs", type=int, default=1, help="runs per size and variant (medians shown)")
    p.add_argument("--channels", type=int, default=DEFAULT_CHANNELS,
                   help=f"migrator TCP connections (default {DEFAULT_CHANNELS}, as migrate's)")
    p.add_argument("--delta-cache", metavar="SIZE",
                   help="as migrate's (default: automatic; 0: no deltas, for a comparison)")
    p.add_argument("--out-dir", default="/var/tmp",
                   help="where the receiver's folder goes (default /var/tmp: a disk, not tmpfs)")
    p.add_argument("--no-check", action="store_true", help="skip the byte-for-byte check of the destination")
    p.add_argument("--json", metavar="FILE", help="write every run as JSON")


def _one(size: int, variant: str, args: argparse.Namespace) -> dict:
    side = WorkloadSpec(kind="random", rate=parse_rate(args.side_rate), seed=5)
    spec = GuestSpec(shared_ram=size, anon_ram=ANON, uffd=False,
                     workload=WorkloadSpec(kind="random", rate=parse_rate(args.rate), seed=3),
                     vhost=side if variant == "vhost" else None,
                     pwrite=side if variant == "pwrite" else None)
    work = tempfile.mkdtemp(prefix="migrator-bench-scale-", dir=args.out_dir)
    receiver = ReceiverProcess(os.path.join(work, "out"), os.path.join(work, "receiver.log"), extra=("--once",))
    try:
        with start_guest(spec) as g:
            a = g.regions["anon"]
            target = MigrationTarget(pid=g.pid, regions=["guest-ram", f"{a.start:x}-{a.end:x}"],
                                     writers=list(g.writer_pids.values()))
            rep = trio.run(lambda: migrate(target, "127.0.0.1", receiver.port, key=None,
                                           policy=MigrationPolicy(channels=args.channels,
                                                                  delta_cache=_delta_cache(args))))
            check = None if args.no_check or rep.status != "completed" else \
                compare_with_source(g.pid, os.path.join(work, "out"))
    finally:
        receiver.stop()
        shutil.rmtree(work, ignore_errors=True)
    live = [r for r in rep.per_round if r.round > 0 and not r.stop_and_copy and r.tracker_ms > 0]
    gib = (size + ANON) / (1 << 30)
    return {
        "size": size, "variant": variant, "channels": args.channels, "delta_cache": args.delta_cache,
        "status": rep.status, "reason": rep.reason, "delta_batches": rep.delta_batches,
        "tracker": rep.tracker, "rounds": rep.rounds,
        "collect_ms_per_gib": statistics.median(r.tracker_ms for r in live) / gib if live else None,
        "downtime_ms": rep.downtime_ms, "expected_downtime_ms": rep.expected_downtime_ms,
        "total_ms": rep.total_time_ms, "mb_sent": rep.transferred_bytes / 1e6,
        "final_scanned": rep.final_scanned, "final_pages": rep.final_dirty_pages,
        "per_round": [{"round": r.round, "pages": r.pages_sent, "ms": round(r.duration_ms, 1),
                       "tracker_ms": round(r.tracker_ms, 1), "expected_downtime_ms": round(r.expected_downtime_ms, 1)}
                      for r in rep.per_round],
        "final_collect_ms": rep.final_collect_ms, "sweeps": len(rep.sweeps), "final_sweep": next((x["reason"] for x in rep.sweeps if x["round"] == "final"), ""),
        "sweep_reasons": sorted({x["reason"] for x in rep.sweeps}),
        "timeline_s": {k: round(v - min(rep.timeline.values()), 3) for k, v in
                       sorted(rep.timeline.items(), key=lambda kv: kv[1])},
        "pause_ms": {k: round((v - rep.timeline["pause"]) * 1000, 1) for k, v in
                     sorted(rep.timeline.items(), key=lambda kv: kv[1]) if "pause" in rep.timeline
                     and v >= rep.timeline["pause"]},
        "destination": "not checked" if check is None else ("identical" if check.identical else check.detail),
    }


def _delta_cache(args: argparse.Namespace) -> int | None:
    return None if args.delta_cache is None else parse_size(args.delta_cache)


def _med(runs: list[dict], key: str) -> str:
    vals = [r[key] for r in runs if r[key] is not None]
    if not vals:
        return "-"
    fmt = "{:.0f}" if all(isinstance(v, int) for v in vals) else "{:.1f}"
    med = fmt.format(statistics.median(vals))
    return med if len(vals) == 1 else f"{fmt.format(min(vals))} / {med}"


def run(args: argparse.Namespace) -> int:
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        print(f"unknown variant(s) {', '.join(bad)}: choose from {', '.join(VARIANTS)}")
        return 2
    if not 1 <= args.channels <= MAX_CHANNELS:
        print(f"--channels {args.channels}: must be 1..{MAX_CHANNELS}")
        return 2
    try:
        MigrationPolicy(channels=args.channels, delta_cache=_delta_cache(args))
    except MigratorError as e:
        print(e)
        return 2
    free = shutil.disk_usage(args.out_dir).free
    if max(sizes) + ANON > free:
        print(f"{args.out_dir} has {format_bytes(free)} free: too little for {format_bytes(max(sizes))}")
        return 2
    print(f"migrator bench scale: guest without a userfaultfd, random writes at {args.rate}, "
          f"+{ANON >> 20} MiB private RAM; receiver writing to {args.out_dir}; default policy, "
          f"{args.channels} channel(s), delta cache {args.delta_cache or 'automatic'}; "
          f"{args.runs} run(s) each")
    results: list[dict] = []
    for variant in variants:
        for size in sizes:
            runs = [_one(size, variant, args) for _ in range(args.runs)]
            results.extend(runs)
            for r in runs:
                print(f"  {variant} {format_bytes(size)}: {r['status']}, downtime {r['downtime_ms']:.1f} ms, "
                      f"total {r['total_ms']:.0f} ms, destination {r['destination']}"
                      + (f" ({r['reason']})" if r["reason"] else ""), flush=True)
    print(f"\n{'variant':8} {'shared RAM':>10} {'tracker':22} {'status':14} {'rounds':>6} "
          f"{'collect ms/GiB':>15} {'sweeps':>7} {'downtime ms':>13} {'total ms':>11} {'MB sent':>9}  destination")
    for variant in variants:
        for size in sizes:
            runs = [r for r in results if r["size"] == size and r["variant"] == variant]
            print(f"{variant:8} {format_bytes(size):>10} {runs[0]['tracker']:22} "
                  f"{','.join(sorted({r['status'] for r in runs})):14} "
                  f"{_med(runs, 'rounds'):>6} {_med(runs, 'collect_ms_per_gib'):>15} {_med(runs, 'sweeps'):>7} "
                  f"{_med(runs, 'downtime_ms'):>13} {_med(runs, 'total_ms'):>11} {_med(runs, 'mb_sent'):>9}  "
                  f"{','.join(sorted({r['destination'] for r in runs}))}")
    print("(min / median when several runs; collect ms/GiB: the live rounds' collects, median; "
          "sweeps: collects in which the ledger swept the shared RAM, the pause's included)")
    for r in results:
        if r["final_sweep"]:
            print(f"  {r['variant']} {format_bytes(r['size'])}: swept in the pause: {r['final_sweep']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if all(r["status"] == "completed" and r["destination"] in ("identical", "not checked")
                    for r in results) else 1
