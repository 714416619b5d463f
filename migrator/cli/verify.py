"""`migrator verify`: check a region image by its page stamps (and against the source's)."""

from __future__ import annotations

import argparse
import json
import sys

from ..guest.stamp import verify_image


def run(args: argparse.Namespace) -> int:
    res = verify_image(args.image, args.region, args.expected, first_index=args.first_page)
    if args.json:
        print(json.dumps({"region": res.region, "pages": res.pages, "ok": res.ok,
                          "compared": res.compared, "counts": res.counts,
                          "findings": [f.__dict__ for f in res.findings]}))
        return 0 if res.ok else 1
    print(res.summary())
    for f in res.findings[:args.max_findings]:
        line = f"  page {f.page}: {f.status}"
        if f.writer is not None:
            line += f" (image: {f.writer} seq {f.seq})"
        if f.expected_writer is not None:
            line += f" (expected: {f.expected_writer} seq {f.expected_seq})"
        print(line)
    if len(res.findings) > args.max_findings:
        print(f"  ... {len(res.findings) - args.max_findings} more", file=sys.stdout)
    return 0 if res.ok else 1


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "verify", help="check a memory image by its page stamps",
        description="Check every page of a raw region image: consistent stamp, zero (never "
        "written), or corrupt/misplaced; with --expected (the source's final memory of the "
        "region), also stale/missing/differing pages.  Exit status 0 if all good, 1 if not.")
    p.add_argument("image", help="raw image file of one region")
    p.add_argument("--region", default="guest-ram",
                   help="region name or kind (anon = private block; any other name = shared)")
    p.add_argument("--expected", help="the source's final memory of the region (raw file)")
    p.add_argument("--first-page", type=int, default=0, help="region page index of the first page")
    p.add_argument("--max-findings", type=int, default=20, help="bad pages listed (text output)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(handler=run)
