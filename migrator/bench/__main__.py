import argparse
import importlib
import sys

from . import BENCHES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m migrator.bench")
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name in BENCHES:
        importlib.import_module(f"{__package__}.{name}").register(sub)
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


sys.exit(main())
