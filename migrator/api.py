"""The public API, re-exported from the package front (`import migrator`): see docs/api.md.

Everything here is a thin, typed front over the data path's modules (kernel -> tracking ->
precopy -> transport); those modules are internal and may change between versions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import trio

from .errors import MigratorError, UsageError
from .guest.launcher import Guest
from .guest.launcher import start_guest as _start_guest
from .guest.spec import GuestSpec
from .guest.workloads import WorkloadSpec
from .kernel.probe import Capabilities
from .kernel.probe import probe as _probe
from .precopy.controller import MigrationPolicy, MigrationTarget, StopToken
from .precopy.controller import migrate as _migrate
from .precopy.report import MigrationReport, RoundStats
from .transport.receiver import SessionOutcome, parse_listen
from .transport.receiver import serve as _serve
from .units import parse_rate, parse_size

Address = str | tuple[str, int]


def _address(to: "Address | Receiver") -> tuple[str, int]:
    if isinstance(to, Receiver):
        return to.host, to.port
    if isinstance(to, tuple):
        host, port = to
        return str(host), int(port)
    return parse_listen(str(to))


async def migrate(*, pid: int, regions: Sequence[str], to: "Address | Receiver",
                  key: bytes | None = None, policy: MigrationPolicy | None = None,
                  writers: Sequence[int] = (), cgroup: str | None = None,
                  ssl_context: Any = None,
                  progress: Callable[[RoundStats], None] | None = None,
                  stop: StopToken | None = None) -> MigrationReport:
    """Live-migrate the selected memory of a running process to a receiver.

    Args:
        pid: the process to migrate (any process: it need not cooperate).
        regions: mapping selectors, as `migrator migrate --region`: a mapping name
            ("guest-ram", "[heap]"), START-END in hex, or kind:anon|shared|file.
        to: the receiver: "HOST:PORT", (host, port), or a Receiver of this process.
        key: the pre-shared key (bytes, as load_key() reads it); None only on loopback (then
            the receiver must have none either).  With a Receiver, its key by default.
        policy: downtime limit (ms), bandwidth cap (bytes/s), rounds, verification...
            (MigrationPolicy; its defaults are the CLI's).
        writers: other processes that write the memory (paused with pid at the switch-over).
        cgroup: a v1 freezer cgroup to freeze for the switch-over instead of SIGSTOP.
        progress: called with each round's RoundStats as it ends.
        stop: a StopToken: request() ends the migration cleanly (the source resumed).

    Returns the MigrationReport: status "completed" (the source is left stopped: the
    destination takes over; SIGCONT it to run it on), "not-converged" or "failed" (the
    source running), with downtime_ms, total_time_ms, rounds, per_round, ...

    Raises:
        UsageError: bad arguments (an unknown region selector, a bad address).
        TargetGoneError: the process exited.
        MigratorError: other failures that leave no report (the receiver unreachable...).
    """
    host, port = _address(to)
    if key is None and isinstance(to, Receiver):
        key = to.key
    target = MigrationTarget(pid=pid, regions=list(regions), writers=list(writers), cgroup=cgroup)
    return await _migrate(target, host, port, key=key, policy=policy or MigrationPolicy(),
                          ssl_context=ssl_context, progress=progress, stop=stop)


class Receiver:
    """A receiver serving migrations into a folder, for as long as the `async with` block runs:

        async with migrator.Receiver("/var/tmp/dest", key=key) as rx:
            report = await migrator.migrate(pid=pid, regions=["kind:anon"], to=rx)
            manifest = await rx.wait_manifest()

    Args:
        out_dir: the folder for the images and manifest.json (created if missing; it must be
            the caller's and not writable by others, as for `migrator receive --out`).
        key: pre-shared key; None serves loopback only.
        host / port: where to listen (default 127.0.0.1, a free port: see .port).
        max_memory: bytes one session may use (page bookkeeping and receive buffers).
    """

    def __init__(self, out_dir: str | os.PathLike, *, key: bytes | None = None,
                 host: str = "127.0.0.1", port: int = 0, max_memory: int | None = None):
        self.out_dir = os.fspath(out_dir)
        self.key = key
        self.host = host
        self.port = port
        self._max_memory = max_memory
        self._nursery_manager: Any = None
        self._nursery: trio.Nursery | None = None
        self._ended: list[SessionOutcome] = []
        self._changed = trio.Event()

    @property
    def address(self) -> str:
        """"HOST:PORT" to give to `migrator migrate --to` (once entered)."""
        return f"{self.host}:{self.port}"

    @property
    def outcomes(self) -> list[SessionOutcome]:
        """Every session ended so far (complete or not), oldest first."""
        return list(self._ended)

    def _on_end(self, outcome: SessionOutcome) -> None:
        self._ended.append(outcome)
        self._changed.set()
        self._changed = trio.Event()

    async def __aenter__(self) -> "Receiver":
        os.makedirs(self.out_dir, mode=0o700, exist_ok=True)
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        kw = {} if self._max_memory is None else {"max_memory": self._max_memory}
        try:
            self.port = await self._nursery.start(lambda task_status: _serve(
                self.host, self.port, self.out_dir, key=self.key, on_session_end=self._on_end,
                task_status=task_status, **kw))
        except BaseException as e:
            self._nursery.cancel_scope.cancel()
            await self._nursery_manager.__aexit__(type(e), e, e.__traceback__)
            raise
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        return await self._nursery_manager.__aexit__(*exc)

    def manifest(self) -> dict:
        """The folder's manifest.json as it is now (the last session's)."""
        with open(os.path.join(self.out_dir, "manifest.json")) as f:
            return json.load(f)

    async def wait_manifest(self, timeout_s: float = 60.0) -> dict:
        """The manifest once a session has ended (complete: its images are on disk), waiting up
        to timeout_s for one.  Raises MigratorError when none ended in time."""
        with trio.move_on_after(timeout_s):
            while not self._ended:
                await self._changed.wait()
            return self.manifest()
        raise MigratorError(f"no migration session ended at {self.address} within {timeout_s} s")


def start_guest(spec: GuestSpec | None = None, **fields: Any) -> Guest:
    """Start a QEMU-like guest process (`migrator guest`): a memfd-backed shared RAM block and
    a private anonymous block, dirtied by a seeded workload, optionally with side writers.  Use
    it as a context manager (the guest is stopped at the end):

        with migrator.start_guest(shared_ram="256M", anon_ram="64M",
                                  workload="random", rate="10MB/s") as g:
            report = await migrator.migrate(pid=g.pid, regions=g.selectors(), to=rx,
                                            writers=list(g.writer_pids.values()))

    spec: a GuestSpec; or its fields as keywords, where sizes may be strings ("256M") and
    `workload` / `rate` / `seed` name the workload (kind, bytes/s or "10MB/s", seed).
    """
    if spec is None:
        wl = {k: fields.pop(k) for k in ("workload", "rate", "seed") if k in fields}
        for k in ("shared_ram", "anon_ram", "shared_tail", "anon_tail", "vhost_size", "pwrite_size"):
            if isinstance(fields.get(k), str):
                fields[k] = parse_size(fields[k])
        if wl:
            kind = wl.get("workload", "random")
            rate = wl.get("rate", 0)
            w = WorkloadSpec(kind=kind, rate=parse_rate(rate) if isinstance(rate, str) else rate)
            fields["workload"] = replace(w, seed=wl["seed"]) if "seed" in wl else w
        try:
            spec = GuestSpec(**fields)
        except TypeError as e:
            raise UsageError(f"start_guest: {e}") from None
    elif fields:
        raise UsageError("start_guest: give a GuestSpec or its fields, not both")
    return _start_guest(spec)


def probe() -> Capabilities:
    """What this kernel and these privileges offer for tracking (soft-dirty, userfaultfd
    write-protect, PAGEMAP_SCAN, map_files, swap...): each Feature says whether it is available
    and why not; Capabilities.tracking_problem() says why page-table tracking cannot run
    here, or None."""
    return _probe()


__all__ = ["migrate", "Receiver", "start_guest", "probe", "Address"]
