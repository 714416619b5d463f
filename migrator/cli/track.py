"""`migrator track`: watch which pages of a running process change, round after round."""

import argparse
import json
import sys
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("track", help="report the pages a running process writes, per interval",
                       description="Track the selected regions of a running process and print, every "
                                   "interval, how many pages were written (the dirty rate).")
    p.add_argument("--pid", type=int, required=True, help="process to track")
    p.add_argument("--region", action="append", required=True, metavar="SEL",
                   help="mapping name (guest-ram, [heap]), START-END in hex, or kind:anon|shared|file; repeatable")
    p.add_argument("--tracker", default="auto", help="auto, wp, soft-dirty or hash (default auto)")
    p.add_argument("--no-inject", action="store_true",
                   help="never inject a userfaultfd into a process (write-protect only with the target's own)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between collects (default 1)")
    p.add_argument("--count", type=int, default=0, help="stop after N collects (default: until Ctrl-C)")
    p.add_argument("--json", action="store_true", help="one JSON object per collect")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..kernel.maps import read_maps, select_regions
    from ..kernel.native import PAGE_SIZE
    from ..tracking.choose import make_tracker

    regions = select_regions(read_maps(args.pid), args.region)
    tracker = make_tracker(args.pid, regions, args.tracker, inject=not args.no_inject)
    if not args.json:
        print(f"tracking pid {args.pid} with {tracker.name}: " +
              ", ".join(f"{r.name} ({r.kind.value}, {r.size >> 20} MiB)" for r in regions), file=sys.stderr)
    n = 0
    with tracker:
        if not args.json:
            print(f"  {tracker.statistics().detail}", file=sys.stderr)
        last = time.monotonic()
        try:
            while not args.count or n < args.count:
                time.sleep(args.interval)
                res = tracker.collect()
                now = time.monotonic()
                n += 1
                per = {name: len(s) for name, s in res.pages.items()}
                total = sum(per.values())
                rate = total * PAGE_SIZE / (now - last) / 1e6
                last = now
                if args.json:
                    print(json.dumps({"collect": n, "pages": per, "dirty_MBps": round(rate, 2),
                                      "cost_ms": round(res.cost_s * 1000, 3),
                                      "events": [e.__dict__ for e in res.events],
                                      "sweeps": [{"regions": list(s.regions), "bytes": s.nbytes,
                                                  "reason": s.reason} for s in res.sweeps]}), flush=True)
                else:
                    parts = "  ".join(f"{k}={v}" for k, v in per.items())
                    print(f"#{n:<4} {total:>9} pages  {rate:9.1f} MB/s  collect {res.cost_s * 1000:7.2f} ms  {parts}", flush=True)
                    for e in res.events:
                        print(f"      {e.region}: {e.what}: {e.detail}", flush=True)
                    for s in res.sweeps:
                        print(f"      ledger: {s.describe()}", flush=True)
        except KeyboardInterrupt:
            pass
    return 0
