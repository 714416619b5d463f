"""`migrator receive`: the destination of migrations; writes images and manifest.json."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import trio

from ..errors import MigratorError, UsageError
from ..transport.auth import load_key, server_ssl_context
from ..transport.receiver import parse_listen, serve
from ..units import parse_size


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "receive", help="receive migrations into image files",
        description="Serve migrations: authenticate senders, write one raw image per source "
                    "region into DIR and manifest.json, complete only once digests verify.")
    p.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="address to listen on (port 0 picks one; it is printed)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for images and manifest.json")
    p.add_argument("--port-file", metavar="FILE",
                   help="once listening, write the port to FILE (a number and a newline, written "
                        "whole: for scripts that start a receiver on port 0)")
    p.add_argument("--once", action="store_true", help="exit after one migration session")
    p.add_argument("--preallocate", action="store_true",
                   help="allocate each image in full when a session starts (fewer page faults "
                        "while pages arrive; on tmpfs it takes the memory up front)")
    p.add_argument("--max-memory", default="2G", metavar="SIZE",
                   help="memory one session may make the receiver use: 12 bytes a page of the "
                        "declared regions plus 48 MiB a channel (default 2G: ~650 GiB of guest "
                        "memory over one channel); a larger session is refused at set-up")
    a = p.add_argument_group("authentication and encryption (see docs/protocol.md)")
    a.add_argument("--key-file", metavar="F",
                   help="pre-shared key (required unless HOST is a loopback address)")
    a.add_argument("--encrypt", action="store_true",
                   help="accept only senders that encrypt (migrate --encrypt; needs --key-file)")
    a.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate (chain)")
    a.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    a.add_argument("--tls-ca", metavar="PEM", help="require sender certificates signed by this CA")
    q = p.add_argument_group("QEMU destination (see docs/qemu.md)")
    q.add_argument("--qemu-incoming", metavar="HOST:PORT",
                   help="start a destination QEMU on the received RAM image, listening here for the "
                        "source QEMU's device state; resume it once that came (implies --once)")
    q.add_argument("--qemu-args", default="", metavar="'ARGS'",
                   help="the VM's options except RAM and QMP (machine, devices, drives, serial), "
                        "as on the source, one shell-quoted string")
    q.add_argument("--qemu-memdev", default="ram", metavar="ID", help="the source's memory backend id (default ram)")
    q.add_argument("--qemu-ram-size", metavar="SIZE",
                   help="the guest's RAM (e.g. 4G): start the destination QEMU now, before a migration "
                        "comes, so its start-up is not paid during the migration (as a destination is "
                        "prepared for QEMU's own migration); a source with other RAM is refused")
    q.add_argument("--qemu-binary", default="qemu-system-x86_64", metavar="PATH",
                   help="the QEMU executable (default qemu-system-x86_64)")
    p.set_defaults(handler=run)


def write_port_file(path: str, port: int) -> None:
    """The port, written to a temporary name and renamed: a reader sees all of it or nothing."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(f"{port}\n")
        os.replace(tmp, path)
    except OSError as e:
        raise UsageError(f"--port-file {path!r}: {e.strerror}") from None


def _log(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


def _qemu_handoff(args: argparse.Namespace):
    """--qemu-incoming: the destination VM started on the received RAM (qemu/handoff.py); None
    without it.  Implies --once: the next session would overwrite the running VM's RAM."""
    if not args.qemu_incoming:
        if args.qemu_ram_size:
            raise UsageError("--qemu-ram-size goes with --qemu-incoming")
        return None
    import os

    from ..qemu.destination import DestinationConfig
    from ..qemu.handoff import DestinationHandoff
    os.makedirs(args.out, exist_ok=True)
    args.once = True
    ram_size = None
    if args.qemu_ram_size:
        ram_size = parse_size(args.qemu_ram_size)
        if ram_size <= 0 or ram_size % (1 << 20):
            raise UsageError(f"bad --qemu-ram-size {args.qemu_ram_size!r}: a whole number of MiB, e.g. 128M")
    return DestinationHandoff(DestinationConfig.from_cli(
        args.qemu_incoming, args.qemu_args, args.qemu_memdev, args.qemu_binary, args.out), _log, ram_size)


async def _stop_on_sigterm(cancel_scope: trio.CancelScope, stopped: list[bool], vm: bool) -> None:
    """On SIGTERM (a service manager stopping us): cancel everything, so a session under way
    fails with "receiver shutting down" in its manifest and its sender is told, instead of the
    process dying with the manifest saying nothing."""
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            _log("terminated: stopping" + (" (a destination VM not handed over is killed)" if vm else ""))
            stopped.append(True)
            cancel_scope.cancel()
            return


def run(args: argparse.Namespace) -> int:
    host, port = parse_listen(args.listen)
    key = load_key(args.key_file) if args.key_file else None
    if args.encrypt and key is None:
        raise UsageError("--encrypt needs --key-file")
    max_memory = parse_size(args.max_memory)
    if max_memory <= 0:
        raise UsageError(f"bad --max-memory {args.max_memory!r}: a size, e.g. 2G")
    ssl_context = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise UsageError("--tls-cert and --tls-key go together")
        ssl_context = server_ssl_context(args.tls_cert, args.tls_key, args.tls_ca)
    handoff = _qemu_handoff(args)
    outcomes: list = []

    async def _serve(task_status=trio.TASK_STATUS_IGNORED):
        try:
            outcomes.extend(await serve(
                host, port, args.out, key=key, once=args.once, preallocate=args.preallocate,
                ssl_context=ssl_context, log=_log, require_encryption=args.encrypt,
                max_memory=max_memory,
                on_setup=handoff.on_setup if handoff else None,
                on_verified=handoff.on_verified if handoff else None,
                on_session_end=handoff.on_session_end if handoff else None,
                image_names=handoff.image_names if handoff else None, task_status=task_status))
        finally:
            if handoff:
                handoff.close()

    terminated: list[bool] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_sigterm, nursery.cancel_scope, terminated, bool(handoff))
            if handoff:
                async def hand_over() -> None:
                    await handoff.run()
                    nursery.cancel_scope.cancel()      # done: the VM runs on by itself
                nursery.start_soon(hand_over)
                if handoff.ram_size is not None:
                    await handoff.prestart()   # before listening: ready when a migration comes
                serving = _serve
            else:
                async def serving(task_status=trio.TASK_STATUS_IGNORED) -> None:
                    await _serve(task_status=task_status)
                    nursery.cancel_scope.cancel()      # (--once: done; the SIGTERM watch ends)
            bound = await nursery.start(serving)
            if args.port_file:
                write_port_file(args.port_file, bound)
            _log(f"listening on {host}:{bound}, writing to {args.out}"
                 f"{'' if key else ' (no key: loopback only)'}")

    interrupted = _run_interruptible(main)
    if interrupted is not None:
        return interrupted
    if terminated:
        print("migrator receive: terminated, stopped", file=sys.stderr, flush=True)
        return 128 + signal.SIGTERM
    if handoff:
        return 0 if handoff.ok else 1
    if args.once:
        return 0 if outcomes and outcomes[-1].complete else 1
    return 0


def _run_interruptible(main) -> int | None:
    """trio.run(main): a MigratorError from inside its nursery raised alone (one line for the
    user); Ctrl-C says so and gives 130; None otherwise."""
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
    return None
