import argparse
import importlib
import sys

# name -> module in migrator.bench with add_arguments(parser) and run(args) -> int
BENCHES = {
    "track": "migrator.bench.track",
    "qemu": "migrator.bench.qemu",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m migrator.bench")
    sub = ap.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, modname in BENCHES.items():
        mod = importlib.import_module(modname)
        p = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
        mod.add_arguments(p)
        p.set_defaults(module=mod)
    args = ap.parse_args(argv)
    return args.module.run(args)


if __name__ == "__main__":
    sys.exit(main())
