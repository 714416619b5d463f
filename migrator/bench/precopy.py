"""Pre-copy against theory: a steady sequential-sweep guest under a bandwidth cap.

With a guest dirtying D bytes/s (a sweep: every write a new page until the memory wraps) and a
link of B bytes/s, round i sends n_i pages in n_i * P / B seconds, during which D / B * n_i pages
are dirtied: a geometric series with ratio D / B.  The controller stops when n * P / B fits the
downtime limit.  This bench runs real migrations (guest and receiver in their own processes) and
prints, per run: rounds measured vs predicted from the measured D and B, and downtime measured vs
final dirty bytes / measured bandwidth.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile

import trio

from ..guest.launcher import start_guest
from ..guest.spec import GuestSpec
from ..guest.workloads import WorkloadSpec
from ..kernel.native import PAGE_SIZE
from ..precopy.controller import MigrationPolicy, MigrationTarget, migrate
from ..transport import Receiver
from ..units import parse_rate, parse_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ram", default="256M", help="shared guest RAM (default 256M)")
    p.add_argument("--rate", default="40MB/s", help="guest dirty rate (default 40MB/s, sweep)")
    p.add_argument("--link", default="200MB/s", help="bandwidth cap (default 200MB/s)")
    p.add_argument("--downtime-limit", type=float, default=300.0, help="ms (default 300)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", metavar="FILE")


def predicted_rounds(first_pages: int, dirty_pps: float, link_pps: float, limit_s: float,
                     max_pages: int, overhead_s: float = 0.0) -> int:
    """Live rounds (round 0 included) before stop-and-copy, by the geometric series: a round of
    n pages lasts overhead + n / link, and the guest dirties dirty_pps * that meanwhile; the
    controller switches over when overhead + n / link fits the limit."""
    n = first_pages
    rounds = 1
    while True:
        n = min(max_pages, dirty_pps * (overhead_s + n / link_pps))
        if overhead_s + n / link_pps <= limit_s or rounds > 60:
            return rounds
        rounds += 1


async def one_run(ram: int, rate: float, link: float, limit_ms: float) -> dict:
    out = tempfile.mkdtemp(prefix="migrator-bench-")
    rx = Receiver(os.path.join(out, "img"), key=None)
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, rx.handle_stream, listeners)
        spec = GuestSpec(shared_ram=ram, anon_ram=0, uffd=True, target="shared",
                         workload=WorkloadSpec(kind="sweep", rate=rate))
        with start_guest(spec) as g:
            vcpu_pages = g.regions["guest-ram"].areas["vcpu"][1] - g.regions["guest-ram"].areas["vcpu"][0]
            rep = await migrate(MigrationTarget(g.pid, ["guest-ram"]), "127.0.0.1", port, key=None,
                                policy=MigrationPolicy(downtime_limit_ms=limit_ms, max_bandwidth=link))
            measured_rate = g.stats().writers["vcpu"].rate
        nursery.cancel_scope.cancel()
    bw = rep.bandwidth_bytes_per_s
    live_rounds = rep.rounds - 1           # the last entry is stop-and-copy
    # the link as round 0 saw it (one long transfer), and the fixed cost of a round (collect +
    # round-end acknowledgement) as the later rounds saw it
    r0 = rep.per_round[0]
    link = r0.bytes / (r0.duration_ms / 1000)
    later = rep.per_round[1:]
    overhead = statistics.median([(r.tracker_ms + r.duration_ms) / 1000 - r.bytes / link for r in later]) \
        if later else 0.0
    pred = predicted_rounds(r0.pages_sent, measured_rate / PAGE_SIZE, link / PAGE_SIZE,
                            limit_ms / 1000, vcpu_pages, max(overhead, 0.0))
    theory_ms = rep.final_dirty_pages * PAGE_SIZE / bw * 1000
    return {"status": rep.status, "rounds_live": live_rounds, "rounds_predicted": pred,
            "round_overhead_ms": overhead * 1000, "link_MBps": link / 1e6,
            "downtime_ms": rep.downtime_ms, "theory_downtime_ms": theory_ms,
            "final_dirty_pages": rep.final_dirty_pages, "bandwidth_MBps": bw / 1e6,
            "dirty_rate_MBps": measured_rate / 1e6, "verify_ms": rep.verify_ms,
            "total_ms": rep.total_time_ms}


def run(args: argparse.Namespace) -> int:
    ram, rate, link = parse_size(args.ram), parse_rate(args.rate), parse_rate(args.link)
    print(f"migrator bench precopy: {ram >> 20} MiB shared RAM, sweep at {rate / 1e6:.0f} MB/s, "
          f"link {link / 1e6:.0f} MB/s, downtime limit {args.downtime_limit:.0f} ms, {args.runs} runs")
    rows = [trio.run(one_run, ram, rate, link, args.downtime_limit) for _ in range(args.runs)]
    print(f"{'run':>3} {'status':>10} {'rounds':>7} {'predicted':>9} {'downtime':>9} {'theory':>8} "
          f"{'ratio':>6} {'verify':>7} {'B MB/s':>7} {'D MB/s':>7} {'link':>6} {'ovh ms':>6}")
    for i, r in enumerate(rows):
        ratio = r["downtime_ms"] / r["theory_downtime_ms"] if r["theory_downtime_ms"] else math.inf
        r["downtime_ratio"] = ratio
        print(f"{i:>3} {r['status']:>10} {r['rounds_live']:>7} {r['rounds_predicted']:>9} "
              f"{r['downtime_ms']:>7.1f}ms {r['theory_downtime_ms']:>6.1f}ms {ratio:>6.2f} "
              f"{r['verify_ms']:>5.1f}ms {r['bandwidth_MBps']:>7.1f} {r['dirty_rate_MBps']:>7.1f} "
              f"{r['link_MBps']:>6.0f} {r['round_overhead_ms']:>6.1f}")
    ratios = [r["downtime_ratio"] for r in rows]
    dr = [abs(r["rounds_live"] - r["rounds_predicted"]) for r in rows]
    print(f"downtime / theory: min {min(ratios):.2f}, median {statistics.median(ratios):.2f} (target <= 1.5); "
          f"rounds off by at most {max(dr)} (target <= 1)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0
