"""`migrator receive`: the destination of migrations; writes images and manifest.json."""

from __future__ import annotations

import argparse
import sys
import time

import trio

from ..errors import MigratorError, UsageError
from ..transport.auth import load_key, server_ssl_context
from ..transport.receiver import parse_listen, serve


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "receive", help="receive migrations into image files",
        description="Serve migrations: authenticate senders, write one raw image per source "
                    "region into DIR and manifest.json, complete only once digests verify.")
    p.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="address to listen on (port 0 picks one; it is printed)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for images and manifest.json")
    p.add_argument("--key-file", metavar="F",
                   help="pre-shared key (required unless HOST is a loopback address)")
    p.add_argument("--once", action="store_true", help="exit after one migration session")
    p.add_argument("--preallocate", action="store_true",
                   help="allocate each image in full when a session starts (fewer page faults "
                        "while pages arrive; on tmpfs it takes the memory up front)")
    p.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate (chain)")
    p.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    p.add_argument("--tls-ca", metavar="PEM", help="require sender certificates signed by this CA")
    p.set_defaults(handler=run)


def _log(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


def run(args: argparse.Namespace) -> int:
    host, port = parse_listen(args.listen)
    key = load_key(args.key_file) if args.key_file else None
    ssl_context = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise UsageError("--tls-cert and --tls-key go together")
        ssl_context = server_ssl_context(args.tls_cert, args.tls_key, args.tls_ca)

    outcomes: list = []

    async def _serve(task_status=trio.TASK_STATUS_IGNORED):
        outcomes.extend(await serve(host, port, args.out, key=key, once=args.once,
                                    preallocate=args.preallocate,
                                    ssl_context=ssl_context, log=_log, task_status=task_status))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(_serve)
            _log(f"listening on {host}:{bound}, writing to {args.out}"
                 f"{'' if key else ' (no key: loopback only)'}")

    try:
        trio.run(main)
    except BaseExceptionGroup as eg:  # a user-facing error from inside the nursery
        if len(eg.exceptions) == 1 and isinstance(eg.exceptions[0], MigratorError):
            raise eg.exceptions[0] from None
        if not eg.subgroup(KeyboardInterrupt):
            raise
        print("migrator receive: interrupted, stopped", file=sys.stderr, flush=True)
        return 130
    except KeyboardInterrupt:
        print("migrator receive: interrupted, stopped", file=sys.stderr, flush=True)
        return 130
    if args.once:
        return 0 if outcomes and outcomes[-1].complete else 1
    return 0
