"""The `migrator` command: one module per subcommand, each with register(subparsers).

A subcommand's handler returns the exit status.  MigratorError is a user-facing problem: it is
printed as one line, never as a traceback.
"""

import argparse
import importlib
import os
import sys

from ..errors import MigratorError

# name of the module in migrator.cli for each subcommand, in help order
COMMANDS = ["probe", "regions", "track", "guest", "verify", "receive", "migrate", "scenario"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="migrator",
        description="Live-migration dirty-page tracking engine for Linux.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except MigratorError as e:
        print(f"migrator: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:             # output piped into head & co.: not an error
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        print("migrator: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
