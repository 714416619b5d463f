"""`migrator migrate`: live pre-copy migration of a running process's memory to a receiver."""

import argparse
import json
import signal
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("migrate", help="live-migrate a running process's memory to a receiver",
                       description="Pre-copy migration: send every populated page, then round after "
                                   "round the pages written since, until the rest fits the downtime "
                                   "limit; then pause the process (and its writers), send the last "
                                   "pages and verify. Exit status 0 only for a completed, verified "
                                   "migration; on failure the process is resumed, also when "
                                   "migrate gets SIGTERM, SIGHUP or SIGINT (exit status 1), and, "
                                   "through a guardian process, when it is killed (SIGKILL, OOM) "
                                   "before the destination took over.")
    p.add_argument("--pid", type=int, help="process to migrate (not with --qmp)")
    p.add_argument("--region", action="append", metavar="SEL",
                   help="mapping name, START-END in hex, or kind:anon|shared|file; repeatable")
    p.add_argument("--to", required=True, metavar="HOST:PORT", help="the receiver")
    p.add_argument("--key-file", metavar="F", help="pre-shared key (as given to migrator receive)")
    p.add_argument("--tls-ca", metavar="PEM", help="use TLS, verifying the receiver with this CA "
                                                    "(and trusting no other)")
    p.add_argument("--encrypt", action="store_true",
                   help="encrypt pages and messages (AES-GCM, keys from --key-file) without TLS; "
                        "with a key they are always authenticated")
    p.add_argument("--compress", choices=["auto", "zstd", "lz4", "none"], default="auto",
                   help="compress page batches: auto (default: zstd, only while the link is slower "
                        "than the sender, so a fast link is never slowed), zstd or lz4 (every batch "
                        "that shrinks by 1/8), none")
    p.add_argument("--delta-cache", metavar="SIZE",
                   help="memory for copies of pages sent, so that a page the guest keeps rewriting "
                        "goes as the bytes that changed (default: 1/4 of the regions, 256M..1G; RSS "
                        "only for the pages cached; 0: off)")
    p.add_argument("--downtime-limit", type=float, default=300.0, metavar="MS",
                   help="allowed pause, ms (default 300)")
    p.add_argument("--max-bandwidth", metavar="RATE", help="cap, e.g. 100MB/s (default: none)")
    p.add_argument("--max-rounds", type=int, default=30, metavar="N", help="default 30")
    p.add_argument("--auto-converge", action="store_true",
                   help="throttle the guest when it dirties memory faster than the link")
    p.add_argument("--switchover", choices=["converge", "fits"], default="converge",
                   help="when to pause: converge (default) at the end of a round, once the pages "
                        "written since fit the downtime limit (the shortest pause; round 0 is cut "
                        "short only when the guest rewrites what it sent as fast as it goes); fits as "
                        "soon as all that is left is sure to fit the limit, even mid-round (QEMU's "
                        "rule: the shortest total time, a pause up to the limit)")
    p.add_argument("--writers", default="", metavar="PID,PID,...",
                   help="other processes writing the guest's memory: paused with it")
    p.add_argument("--cgroup", metavar="PATH", help="freeze this cgroup (v1 freezer) for the switch-over")
    p.add_argument("--tracker", default="auto", choices=["auto", "wp", "soft-dirty", "hash"],
                   help="auto (default): write-protect with the target's own userfaultfd or one "
                        "injected by ptrace, else soft-dirty, else hashing; shared memory also goes "
                        "to the shmem ledger")
    p.add_argument("--no-inject", action="store_true",
                   help="never inject a userfaultfd into a process: write-protect only for a target "
                        "that made its own (e.g. migrator guest --uffd)")
    p.add_argument("--channels", type=int, metavar="N",
                   help="parallel TCP connections (default 2: MigrationPolicy.channels)")
    p.add_argument("--verify", choices=["hashes", "memory"], default="hashes",
                   help="hashes (default): the receiver proves it holds every page as sent, from the "
                        "per-page hashes both sides keep (no memory read in the pause); memory: "
                        "besides, the paused source is read again and compared with what was sent "
                        "(after the pause, reported as verify_memory_ms)")
    q = p.add_argument_group("QEMU VM (see docs/qemu.md)")
    q.add_argument("--qmp", metavar="PATH", help="migrate the QEMU VM behind this QMP socket: its RAM "
                   "by migrator, then its device state by QEMU (x-ignore-shared) to --qemu-incoming")
    q.add_argument("--qemu-incoming", metavar="HOST:PORT",
                   help="where the destination QEMU waits for the device state (receive --qemu-incoming)")
    p.add_argument("--json", metavar="FILE", help="write the JSON report here ('-' for stdout)")
    p.set_defaults(handler=run)


def _progress_printer():
    from ..units import format_bytes

    def show(rs) -> None:
        what = "stop-and-copy" if rs.stop_and_copy else f"round {rs.round}"
        print(f"{what:>14}: {rs.pages_sent:>8} pages ({format_bytes(rs.bytes)}) in {rs.duration_ms:7.1f} ms"
              f"  {rs.bandwidth_mbps:8.0f} Mbit/s  dirty {rs.dirty_rate_pps * 4096 / 1e6:7.1f} MB/s"
              f"  expected downtime {rs.expected_downtime_ms:7.1f} ms"
              + (f"  throttle {rs.throttle_percent}%" if rs.throttle_percent else ""),
              file=sys.stderr, flush=True)
    return show


def run(args: argparse.Namespace) -> int:
    import trio

    from ..errors import UsageError
    from ..precopy.controller import MigrationPolicy, MigrationTarget, migrate
    from ..transport import client_ssl_context, load_key, parse_listen
    from ..units import parse_rate, parse_size

    host, port = parse_listen(args.to)
    key = load_key(args.key_file) if args.key_file else None
    try:
        writers = [int(x) for x in args.writers.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"bad --writers {args.writers!r}: expected PID,PID,...") from None
    policy = MigrationPolicy(
        downtime_limit_ms=args.downtime_limit,
        max_bandwidth=parse_rate(args.max_bandwidth) if args.max_bandwidth else None,
        max_rounds=args.max_rounds, auto_converge=args.auto_converge, tracker=args.tracker,
        inject=not args.no_inject, switchover=args.switchover, verify=args.verify,
        encrypt=args.encrypt, compress=args.compress,
        delta_cache=parse_size(args.delta_cache) if args.delta_cache is not None else None,
        **({} if args.channels is None else {"channels": args.channels}))
    ssl_ctx = client_ssl_context(args.tls_ca) if args.tls_ca else None
    progress = _progress_printer() if sys.stderr.isatty() else None
    if args.qmp:
        if args.pid or args.region or args.writers or args.cgroup:
            raise UsageError("--qmp finds the QEMU process and its RAM itself: no --pid/--region/--writers/--cgroup")
        if not args.qemu_incoming:
            raise UsageError("--qmp needs --qemu-incoming HOST:PORT (the destination QEMU)")
        from ..qemu.source import migrate_vm
        parse_listen(args.qemu_incoming)
        report = trio.run(_until_signalled, lambda stop: migrate_vm(
            args.qmp, host, port, f"tcp:{args.qemu_incoming}", key=key, policy=policy,
            ssl_context=ssl_ctx, progress=progress, stop=stop))
        return _finish(args, report)
    if args.pid is None or not args.region:
        raise UsageError("give --pid and --region (or --qmp for a QEMU VM)")
    target = MigrationTarget(pid=args.pid, regions=args.region, writers=writers, cgroup=args.cgroup)
    report = trio.run(_until_signalled, lambda stop: migrate(
        target, host, port, key=key, policy=policy, ssl_context=ssl_ctx, progress=progress, stop=stop))
    return _finish(args, report)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


async def _until_signalled(run):
    """run(stop) -> report, stopped cleanly by SIGTERM, SIGHUP or SIGINT (the source resumed,
    the report saying which signal); a second signal cancels outright (the source is still
    resumed: the controller's clean-up is shielded)."""
    import trio

    from ..errors import MigratorError, first_error
    from ..precopy.controller import StopToken

    stop = StopToken()
    report = None
    try:
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            async with trio.open_nursery() as nursery:
                async def watch() -> None:
                    async for signum in signals:
                        if stop.reason is not None:
                            nursery.cancel_scope.cancel()
                            return
                        name = signal.Signals(signum).name
                        print(f"migrator: {name}: stopping the migration (the source is resumed)",
                              file=sys.stderr, flush=True)
                        stop.request(name)

                nursery.start_soon(watch)
                try:
                    report = await run(stop)
                finally:
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as eg:
        raise first_error(eg) from None
    if report is None:
        raise MigratorError(f"{stop.reason} twice: the migration was abandoned (its clean-up ran: "
                            "check the source)")
    return report


def _finish(args: argparse.Namespace, report) -> int:
    print(report.summary(), file=sys.stderr)
    if args.json:
        text = json.dumps(report.to_json(), indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0 if report.status == "completed" else 1
