"""`migrator regions`: the mappings of a process, as the names and kinds --region selects."""

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("regions", help="list a process's memory regions and how to select them",
                       description="List the mappings of a process with the name, address range and "
                                   "kind that --region selects them by.")
    p.add_argument("--pid", type=int, required=True, help="the process")
    p.add_argument("--all", action="store_true", help="include special mappings ([vdso], ...)")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..kernel.maps import RegionKind, read_maps
    maps = [m for m in read_maps(args.pid) if args.all or m.kind != RegionKind.SPECIAL]
    if args.json:
        print(json.dumps([{"name": m.name, "kind": m.kind.value, "start": m.start, "end": m.end,
                           "perms": m.perms, "dev": "%x:%x" % m.dev, "inode": m.inode} for m in maps], indent=1))
        return 0
    print(f"{'START-END':<29} {'SIZE':>10} {'KIND':<8} {'PERMS':<5} NAME")
    for m in maps:
        print(f"{m.start:x}-{m.end:x}".ljust(29), f"{(m.end - m.start) >> 10:>8}K", f"{m.kind.value:<8}", f"{m.perms:<5}", m.name)
    return 0
