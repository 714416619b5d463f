import argparse
import importlib
import sys

# name -> module in migrator.bench: either register(subparsers) setting handler=, or
# add_arguments(parser) + run(args) -> int
BENCHES = {
    "track": "migrator.bench.track",
    "wire": "migrator.bench.wire",
    "precopy": "migrator.bench.precopy",
    "qemu": "migrator.bench.qemu",
    "scale": "migrator.bench.scale",
    "faults": "migrator.bench.faults",
    "fuzz": "migrator.bench.fuzz",
    "round0": "migrator.bench.round0",
    "rxsoak": "migrator.bench.rxsoak",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m migrator.bench")
    sub = ap.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, modname in BENCHES.items():
        mod = importlib.import_module(modname)
        if hasattr(mod, "register"):
            mod.register(sub)
            continue
        p = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
        mod.add_arguments(p)
        p.set_defaults(handler=mod.run)
    args = ap.parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
