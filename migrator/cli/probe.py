"""`migrator probe`: what this kernel supports for dirty-page tracking."""

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="exercise the kernel's tracking mechanisms and report what works",
                       description="Exercise each dirty-tracking mechanism on a scratch mapping and "
                                   "report what this kernel really supports.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..kernel.inject import probe_injection
    from ..kernel.probe import probe
    caps = probe().to_json()
    # write-protect tracking of any process: a userfaultfd injected by ptrace into a scratch child
    ok, detail = probe_injection()
    caps["uffd_injection"] = {"supported": ok, "detail": detail}
    if args.json:
        print(json.dumps(caps, indent=2))
        return 0
    width = max(len(k) for k in caps)
    for k, v in caps.items():
        mark = "yes" if v["supported"] else "no "
        print(f"{k:<{width}}  {mark}  {v['detail']}")
    return 0
