"""`migrator guest`: run a QEMU-like guest (see migrator.guest) until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse

from ..errors import UsageError
from ..guest.process import run_guest
from ..guest.spec import GuestSpec, PageoutRange
from ..guest.workloads import WORKLOADS, WorkloadSpec
from ..units import parse_rate, parse_size


def _rate(text: str) -> float:
    """bytes/s from '100MB/s', '20000pages/s', 'max' (-1: unlimited) or '0'."""
    t = text.strip().lower()
    if t == "max":
        return -1.0
    if t in ("0", "0/s"):
        return 0.0
    return parse_rate(text)


def _pageout(text: str) -> PageoutRange:
    """REGION[:OFFSET[:LENGTH]] with sizes like 16M."""
    parts = text.split(":")
    if not 1 <= len(parts) <= 3 or not parts[0]:
        raise UsageError(f"bad pageout range {text!r}: expected REGION[:OFFSET[:LENGTH]], e.g. guest-ram:0:64M")
    off = parse_size(parts[1]) if len(parts) > 1 and parts[1] else 0
    length = parse_size(parts[2]) if len(parts) > 2 and parts[2] else 0
    return PageoutRange(parts[0], off, length)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"bad number {text!r}") from None


def spec_from_args(a: argparse.Namespace) -> GuestSpec:
    """The GuestSpec the command line describes (UsageError on bad values)."""
    def side(rate: str | None, kind: str, seed_add: int) -> WorkloadSpec | None:
        if rate is None:
            return None
        return WorkloadSpec(kind, _rate(rate), a.seed + seed_add)

    tail = parse_size(a.tail) if a.tail else 0
    return GuestSpec(
        shared_ram=parse_size(a.shared_ram), anon_ram=parse_size(a.anon_ram), name=a.name,
        shared_tail=parse_size(a.shared_tail) if a.shared_tail else tail,
        anon_tail=parse_size(a.anon_tail) if a.anon_tail else tail,
        workload=WorkloadSpec(a.workload, _rate(a.rate), a.seed, _float(a.hot_fraction),
                              _float(a.hot_share)),
        target=a.target,
        vhost=side(a.vhost_rate, a.vhost_workload, 1),
        vhost_size=parse_size(a.vhost_size) if a.vhost_size else 0,
        pwrite=side(a.pwrite_rate, a.pwrite_workload, 2),
        pwrite_size=parse_size(a.pwrite_size) if a.pwrite_size else 0,
        pager_interval=_float(a.pager_interval) if a.pager_interval else None,
        pager_ranges=tuple(_pageout(t) for t in a.pageout),
        uffd=a.uffd, content=a.content,
    )


def run(args: argparse.Namespace) -> int:
    return run_guest(spec_from_args(args))


def register(subparsers) -> None:
    kinds = ", ".join(WORKLOADS)
    p = subparsers.add_parser(
        "guest", help="run a QEMU-like guest that dirties memory",
        description="Run a guest with a memfd-backed shared RAM block and a private anonymous "
        "block, dirtied by a seeded workload and optional side writers.  Prints one JSON line "
        "(pid, regions, writers, ...) on stdout, then runs until SIGTERM/SIGINT.  It runs in its "
        "own process group: pause it with kill -STOP -- -PGID.")
    p.add_argument("--shared-ram", default="64M", metavar="SIZE", help="shared (memfd) RAM, e.g. 256M")
    p.add_argument("--anon-ram", default="16M", metavar="SIZE", help="private anonymous RAM (0: none)")
    p.add_argument("--name", default="guest-ram", help="memfd name (/memfd:NAME in maps)")
    p.add_argument("--tail", metavar="SIZE", help="never-touched tail of each block")
    p.add_argument("--shared-tail", metavar="SIZE", help="never-touched tail of the shared block")
    p.add_argument("--anon-tail", metavar="SIZE", help="never-touched tail of the anon block")
    p.add_argument("--workload", default="idle", metavar="KIND", help=f"one of {kinds}")
    p.add_argument("--rate", default="0", metavar="RATE", help="e.g. 100MB/s, 20000pages/s, max")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hot-fraction", default="0.1", metavar="F", help="hotcold: share of pages hot")
    p.add_argument("--hot-share", default="0.9", metavar="F", help="hotcold: share of writes to them")
    p.add_argument("--target", default="both", choices=("shared", "anon", "both"),
                   help="blocks the vcpu workload writes")
    p.add_argument("--vhost-rate", metavar="RATE", help="start the vhost-like writer at RATE")
    p.add_argument("--vhost-workload", default="random", metavar="KIND")
    p.add_argument("--vhost-size", metavar="SIZE", help="its area (default 1/8 of shared RAM)")
    p.add_argument("--pwrite-rate", metavar="RATE", help="start the pwrite writer at RATE")
    p.add_argument("--pwrite-workload", default="random", metavar="KIND")
    p.add_argument("--pwrite-size", metavar="SIZE", help="its area (default 1/8 of shared RAM)")
    p.add_argument("--pager-interval", metavar="SECONDS", help="start the pager (MADV_PAGEOUT)")
    p.add_argument("--pageout", action="append", default=[], metavar="REGION[:OFF[:LEN]]",
                   help="a range the pager pushes out (repeatable; default: all populated)")
    p.add_argument("--uffd", action="store_true", help="create a userfaultfd for the WP tracker")
    p.add_argument("--content", choices=["stamp", "text"], default="stamp",
                   help="page bodies after the stamp header: stamp (default: incompressible) or "
                        "text (words: ~7x compressible with zstd, ~3x with lz4; for --compress)")
    p.set_defaults(handler=run)
