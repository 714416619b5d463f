"""The pre-copy controller: round 0 sends every populated page, each later round the pages written
since the previous collect, until the rest fits the downtime limit; then stop-and-copy: pause, a
final exact collect, send, verify the digests with the receiver.  On success the source stays
paused (QEMU's postmigrate); on any failure it is resumed and the report says why."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from ..errors import MigratorError, UsageError, first_error
from ..guardian import Guardian, ResumeSpec
from ..kernel.maps import Region, read_maps, select_regions
from ..kernel.native import PAGE_SIZE
from ..kernel.process import process_exists
from ..tracking.choose import CHOICES as TRACKER_CHOICES
from ..tracking.choose import make_tracker
from ..tracking.pageset import PageSet
from ..transport import DEFAULT_CHANNELS, RegionSpec, connect_sender
from ..transport.compress import CHOICES as COMPRESS_CHOICES
from ..transport.delta import auto_cache_bytes
from .background import Background, Guard
from .pause import Pauser, Throttle
from .report import MigrationReport, RoundStats
from .rounds import Migration, run_rounds
from .source import SourceMemory
from .stopcopy import StopAndCopy

SWITCHOVER_RULES = ("converge", "fits")
VERIFY_MODES = ("hashes", "memory")


@dataclass(frozen=True)
class MigrationPolicy:
    """How a migration runs.  Frozen, and checked when made: a bad value is a UsageError naming
    the field (dataclasses.replace() gives a changed copy)."""

    downtime_limit_ms: float = 300.0      # QEMU's default
    max_bandwidth: float | None = None    # bytes/s, enforced by the sender
    max_rounds: int = 30
    auto_converge: bool = False
    tracker: str = "auto"
    inject: bool = True                   # may inject a userfaultfd into a target without one
    channels: int = DEFAULT_CHANNELS
    nonconvergence_rounds: int = 3        # rounds of dirty rate >= bandwidth before acting
    min_round_s: float = 0.0              # wait at least this long between collects
    # "converge": switch over at a round's end, once the pages written since fit the limit
    # and one more round would not shorten the pause (it runs while their transfer takes over
    # SHORT_TRANSFER_S and the guest writes at most half as many pages as a round sends): the
    # shortest pause; or cut round 0 when it is rewritten as fast as it goes (going on
    # could not shorten the pause); "fits": as soon as the rest is sure to fit the limit, even
    # during a round (QEMU's rule: the shortest total time, a pause up to the limit)
    switchover: str = "converge"
    sample_s: float = 0.05                # a round is cut no sooner (bandwidth measured by then)
    force_switchover: trio.Event | None = None
    verify_timeout_s: float = 60.0
    # "hashes": the receiver proves it holds every page as sent (digests of the per-page hash
    # tables both sides keep: no memory read in the pause); "memory": besides, the paused
    # source is read again and compared with what was sent (verify_memory_ms, after the pause)
    verify: str = "hashes"
    # encrypt every frame after the handshake (AES-GCM; needs a key); with a key, frames are
    # always authenticated
    encrypt: bool = False
    # batch compression: "auto" (zstd while the link is the bottleneck), "zstd", "lz4", "none"
    compress: str = "auto"
    # bytes of copies of the pages later rounds send, against which pages sent again go as
    # deltas (transport/delta.py); None: 1/4 of the regions, within 256 MiB..1 GiB; 0: no deltas
    delta_cache: int | None = None

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise UsageError(f"migration policy: {what}")

        def one_of(name: str, value: str, choices: tuple[str, ...], label: str) -> None:
            need(value in choices, f"{label} {value!r}: expected one of {', '.join(choices)}")

        need(self.downtime_limit_ms > 0, f"downtime_limit_ms must be above 0 ms, not {self.downtime_limit_ms:g}")
        need(self.max_bandwidth is None or self.max_bandwidth > 0,
             f"max_bandwidth must be above 0 bytes/s (or None: no cap), not {self.max_bandwidth!r}")
        need(self.max_rounds >= 1, f"max_rounds must be at least 1, not {self.max_rounds}")
        need(self.channels >= 1, f"channels must be at least 1, not {self.channels}")
        need(self.nonconvergence_rounds >= 1,
             f"nonconvergence_rounds must be at least 1, not {self.nonconvergence_rounds}")
        need(self.min_round_s >= 0, f"min_round_s must not be negative ({self.min_round_s:g})")
        need(self.sample_s > 0, f"sample_s must be above 0 s, not {self.sample_s:g}")
        need(self.verify_timeout_s > 0, f"verify_timeout_s must be above 0 s, not {self.verify_timeout_s:g}")
        one_of("tracker", self.tracker, TRACKER_CHOICES, "tracker")
        one_of("switchover", self.switchover, SWITCHOVER_RULES, "switch-over rule")
        one_of("verify", self.verify, VERIFY_MODES, "verify")
        one_of("compress", self.compress, COMPRESS_CHOICES, "compress")
        need(self.delta_cache is None or self.delta_cache == 0 or self.delta_cache >= 1 << 20,
             f"delta_cache must be 0 (no deltas) or at least 1 MiB, not {self.delta_cache} bytes")


def check_key(policy: MigrationPolicy, key: bytes | None) -> None:
    """UsageError if the policy needs a key and there is none (before anything starts)."""
    if policy.encrypt and key is None:
        raise UsageError("--encrypt needs a key: pass --key-file (as given to migrator receive)")


class SourcePauser(Protocol):
    """What stops the source for the switch-over (signals, a cgroup freezer, QMP stop/cont).
    pause() returns once the source can no longer write; both are blocking calls."""

    paused: bool

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def resume_spec(self) -> ResumeSpec:
        """How a process of its own (the guardian) would resume the source, should migrate die."""
        ...


@dataclass
class MigrationTarget:
    """What to migrate: regions (selectors) of process pid.  writers/cgroup are paused with it;
    `pauser` replaces the default (SIGSTOP of pid + writers, or the cgroup's freezer).

    `after_pause`, if given, is started once the source is paused, beside the final pages (a QEMU
    source starts its own migration, which stops before the device state); `alongside_verify` is
    awaited while the receiver verifies the digests, once every page is written there (a QEMU
    source sends its device state then).  If either raises, the migration fails and the source
    is resumed."""

    pid: int
    regions: list[str]                    # selectors
    writers: list[int] = field(default_factory=list)
    cgroup: str | None = None
    uffd_fd: int | None = None
    pauser: SourcePauser | None = None
    maps: list | None = None              # the target's mappings if the caller just read them
    no_syscall_writes: list[int] = field(default_factory=list)   # never write the shared memory
                                          # by system call (QEMU: see tracking/sweepgate.py)
    after_pause: Callable[[], Awaitable[None]] | None = None
    alongside_verify: Callable[[], Awaitable[None]] | None = None
    # wait until the destination's images are on disk before calling the migration complete
    # (a QEMU destination runs from the received RAM once verified: not needed there)
    wait_durable: bool = True


class StopToken:
    """Asks a migration to stop (migrate's SIGTERM, SIGHUP or SIGINT): it fails cleanly, its
    source resumed (unless the destination may have taken over already), and its report says
    why.  Made by the caller, passed to migrate(); request() may come at any time, before too."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._scope: trio.CancelScope | None = None

    def request(self, reason: str) -> None:
        """Stop the migration (from the event loop's thread); later requests are ignored."""
        if self.reason is None:
            self.reason = reason
            if self._scope is not None:
                self._scope.cancel()

    def _attach(self, scope: trio.CancelScope) -> None:
        self._scope = scope
        if self.reason is not None:
            scope.cancel()


async def migrate(target: MigrationTarget, host: str, port: int, *, key: bytes | None,
                  policy: MigrationPolicy | None = None, ssl_context=None,
                  progress: Callable[[RoundStats], None] | None = None,
                  stop: StopToken | None = None) -> MigrationReport:
    """Live-migrate the selected regions of a running process to a receiver at host:port.
    `stop` lets the caller end it early (a signal): the report then says failed, "stopped by ...".

    Returns the report (status completed, failed or not-converged); raises MigratorError only for
    problems found before anything was sent (bad selection, unsupported tracker, no receiver)."""
    policy = policy or MigrationPolicy()        # (checked when made)
    check_key(policy, key)
    rep = MigrationReport(downtime_limit_ms=policy.downtime_limit_ms, compress=policy.compress)
    t_start = time.monotonic()
    rep.timeline.mark("start")
    setup = _SetUp(target, policy, rep)
    arming = Background(setup.arm)        # beside the connection's set-up
    try:
        stopping = trio.CancelScope()
        if stop is not None:
            stop._attach(stopping)
        try:
            with stopping:
                await _connected(setup, arming, host, port, key, ssl_context, progress, t_start)
            if stopping.cancelled_caught:
                raise MigratorError(f"stopped by {stop.reason if stop else 'request'}")
        except MigratorError as e:
            if e is arming.error:
                raise                # found before anything was sent (as a failed connection)
            if rep.status in ("setup", "active"):
                rep.status, rep.reason = "failed", str(e)
            if not rep.reason:
                rep.reason = str(e)
    finally:
        await setup.settle(arming)
        rep.total_time_ms = (time.monotonic() - t_start) * 1000
        rep.timeline.mark("end")
        if rep.total_time_ms > 0:
            rep.mbps = rep.transferred_bytes * 8 / (rep.total_time_ms / 1000) / 1e6
    return rep


class _SetUp:
    """What migrate() makes before connecting, and undoes after: the tracker (armed in a thread
    beside the connection's set-up), the source's memory, the pauser, the throttle, and a
    guardian process that resumes the source should migrate die (SIGKILL, OOM) while it may be
    stopped (by the pause, or auto-converge's duty cycles)."""

    def __init__(self, target: MigrationTarget, policy: MigrationPolicy, rep: MigrationReport):
        self.target, self.policy, self.rep = target, policy, rep
        maps = target.maps if target.maps is not None else read_maps(target.pid)
        self.regions: list[Region] = select_regions(maps, target.regions)
        rep.regions = [r.to_json() for r in self.regions]
        self.cgroup_pids = _cgroup_pids(target.cgroup)
        self.tracker = make_tracker(target.pid, self.regions, policy.tracker, uffd_fd=target.uffd_fd,
                                    inject=policy.inject, hint_pids=[*target.writers, *self.cgroup_pids],
                                    no_syscall_writes=set(target.no_syscall_writes))
        rep.tracker = self.tracker.name
        self.baseline = self.tracker.content_baseline()
        rep.timeline.mark("tracker-made")
        self.source = SourceMemory(target.pid, self.regions, maps)
        self.pauser = target.pauser or Pauser([target.pid, *target.writers], target.cgroup)
        self.throttle = Throttle([target.pid, *target.writers])
        spec = self.pauser.resume_spec()
        self.guard = Guard(Guardian(ResumeSpec((*self.throttle.pids, *spec.pids), spec.freezer, spec.qmp)), rep)

    def arm(self) -> dict[str, PageSet]:
        """Begin tracking, then find round 0's pages (blocking: in a thread).  The ledger sweeps
        the mappings the sender packs from, where there are (their page tables are then filled
        before round 0).  Round 0's pages are found after the tracker is armed: a page populated
        in between is then either in round 0 or reported by the first collect."""
        if self.baseline is not None:
            self.baseline.use_views({r.name: self.source.mapped(r.name) for r in self.regions})
            # what round 0 sends is the ledger's baseline: no sweep of everything first
            self.baseline.begin_from_sends()
        else:
            self.tracker.begin()
        self.rep.timeline.mark("tracker-begun")
        first = {r.name: self.source.populated(r) for r in self.regions}
        self.rep.timeline.mark("round0-planned")
        return first

    async def settle(self, arming: Background) -> None:
        """Whatever happened: the source resumed unless it stays paused on purpose (completed, or
        committing), the guardian closed, the tracker ended, the report's last fields."""
        rep, pauser = self.rep, self.pauser

        def settle() -> None:
            arming.join()
            if pauser.paused and rep.status != "completed" and not rep.committing:
                pauser.resume()     # (retried for up to seconds while a thread will not run)
            self.guard.close()      # (the source is settled: resumed, or kept paused on purpose)

        # in a worker thread: each of these waits (the set-up thread, the resume, the guardian's
        # exit), and the event loop never blocks; shielded, so a cancelled migration settles too
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(settle)
        alive = process_exists(self.target.pid)
        rep.source_state = "exited" if not alive else ("paused" if pauser.paused else "running")
        rep.throttle_percent = self.throttle.percent
        rep.tracker_detail = self.tracker.statistics().detail
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.tracker.end)      # (frees userfaultfds: may wait)
        self.source.close()


async def _connected(setup: _SetUp, arming: Background, host: str, port: int, key: bytes | None,
                     ssl_context, progress: Callable[[RoundStats], None] | None, t_start: float) -> None:
    """Connect, wait for the tracker to be armed, then the live rounds and the stop-and-copy
    (auto-converge's throttle beside them)."""
    policy, rep, target = setup.policy, setup.rep, setup.target
    specs = [RegionSpec(r.name, r.start, r.end) for r in setup.regions]
    async with connect_sender(host, port, key=key, regions=specs, channels=policy.channels,
                              page_size=PAGE_SIZE, max_bandwidth=policy.max_bandwidth,
                              ssl_context=ssl_context, encrypt=policy.encrypt,
                              compress=policy.compress,
                              delta_cache=(auto_cache_bytes(sum(r.size for r in specs), PAGE_SIZE)
                                           if policy.delta_cache is None else policy.delta_cache)) as sender:
        rep.timeline.mark("connected")
        first = await arming.result()
        rep.setup_time_ms = (time.monotonic() - t_start) * 1000
        m = Migration(rep, policy, setup.tracker, setup.baseline, setup.source, sender, setup.regions,
                      setup.throttle, progress)
        try:
            async with trio.open_nursery() as nursery:
                if policy.auto_converge:
                    nursery.start_soon(setup.throttle.run)
                try:
                    rep.status = "active"
                    at = await run_rounds(m, first, setup.guard)
                    if at is not None:
                        paused = {target.pid, *target.writers, *setup.cgroup_pids}
                        await StopAndCopy(m, at, target, setup.pauser, setup.guard, paused).run()
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as eg:
            raise first_error(eg) from None


def _cgroup_pids(cgroup: str | None) -> list[int]:
    """The processes of a (v1 freezer) cgroup, [] without one or when it cannot be read."""
    if cgroup is None:
        return []
    path = cgroup if cgroup.startswith("/sys/") else os.path.join("/sys/fs/cgroup/freezer", cgroup.lstrip("/"))
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []
