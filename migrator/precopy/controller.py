"""The pre-copy controller: round 0 sends every populated page, each later round the pages written
since the previous collect, until the rest fits the downtime limit; then stop-and-copy: pause, a
final exact collect, send, verify the digests with the receiver.  On success the source stays
paused (QEMU's postmigrate); on any failure it is resumed and the report says why."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from ..errors import CommitRefusedError, MigratorError, UsageError, first_error
from ..guardian import Guardian, ResumeSpec
from ..kernel.maps import Region, read_maps, select_regions
from ..kernel.native import PAGE_SIZE
from ..kernel.process import process_exists
from ..tracking.base import DirtyPages, Tracker
from ..tracking.choose import CHOICES as TRACKER_CHOICES
from ..tracking.choose import make_tracker
from ..tracking.pageset import PageSet
from ..transport import FinishResult, KnownPages, RegionSpec, SendStats, connect_sender
from ..transport.compress import CHOICES as COMPRESS_CHOICES
from .pause import Pauser, Throttle
from .policy import NONCONVERGENCE_RATIO, Action, Observation, RoundRules, Streaks, decide
from .report import MigrationReport, RoundStats
from .sent import SentHashes
from .source import SourceMemory


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
    channels: int = 1
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


class _Guard:
    """migrate's guardian (migrator/guardian.py), started beside round 0 in a thread of its own
    (a Python process's start, ~20-200 ms) and awaited only before the first stop."""

    def __init__(self, guardian: Guardian, rep: MigrationReport):
        self.guardian = guardian
        self._rep = rep
        self._starting = Background(guardian.start)

    async def armed(self) -> None:
        """Before anything stops the source: the guardian is up and armed."""
        if not self.guardian.armed:
            await self._starting.result()
            self.guardian.arm()
            if self.guardian.problem:
                self._rep.events.append(self.guardian.problem)

    def close(self) -> None:
        self._starting.join()
        self.guardian.close()


class Background:
    """A blocking call running in a thread of its own from now on (set-up work beside I/O)."""

    def __init__(self, fn: Callable[[], object]):
        self.error: BaseException | None = None
        self._value: object = None
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(fn,), name="migrator-setup", daemon=True).start()

    def _run(self, fn) -> None:
        try:
            self._value = fn()
        except BaseException as e:
            self.error = e
        finally:
            self._done.set()

    def join(self) -> None:
        self._done.wait()

    async def result(self):
        if not self._done.is_set():
            await trio.to_thread.run_sync(self._done.wait)
        if self.error is not None:
            raise self.error
        return self._value


SWITCHOVER_RULES = ("converge", "fits")
VERIFY_MODES = ("hashes", "memory")
SAMPLE_STRIDE = 16       # a round's sample of sent data pages: every 16th ...
SAMPLE_PAGES = 4096      # ... up to this many (16 MiB hashed at most per check)


class SentPages:
    """The pages a round has packed (an on_packed hook, called from producer threads), for the
    pages a round cut short left, and a sample of its data pages (every SAMPLE_STRIDE-th, up to
    SAMPLE_PAGES a region) to see how much of what it sent is rewritten already."""

    def __init__(self, npages: dict[str, int], then: Callable | None = None):
        self._npages = npages
        self._then = then             # the hook this one wraps (LedgerTracker.record_sent)
        self._sent: dict[str, PageSet] = {}
        self._samples: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    def _add(self, into: dict[str, PageSet], name: str, *flats) -> None:
        s = into.get(name)
        if s is None:
            s = into[name] = PageSet(self._npages[name])
        for flat in flats:
            for i in range(0, len(flat), 2):
                s.add_range(flat[i], flat[i] + flat[i + 1])

    def packed(self, name: str, data_flat, zero_flat, hashes: bytes) -> None:
        if self._then is not None:
            self._then(name, data_flat, zero_flat, hashes)
        with self._lock:
            self._add(self._sent, name, data_flat, zero_flat)
            pages = self._samples.setdefault(name, [])
            for i in range(0, len(data_flat), 2):
                if len(pages) < SAMPLE_PAGES:
                    pages.extend(range(data_flat[i], data_flat[i] + data_flat[i + 1], SAMPLE_STRIDE))

    def sample(self) -> dict[str, list[int]]:
        with self._lock:
            return {k: list(v) for k, v in self._samples.items()}

    def left(self, planned: dict[str, PageSet], dropped: list) -> dict[str, PageSet]:
        """The planned pages not sent: never packed, or packed into batches that were dropped
        (SendStats.dropped: the ledger recorded them as sent; the final round forces them)."""
        gone: dict[str, PageSet] = {}
        for name, data_flat, zero_flat in dropped:
            self._add(gone, name, data_flat, zero_flat)
        out = {}
        for name, s in planned.items():
            done = self._sent.get(name)
            if done is not None and name in gone:
                done = done - gone[name]
            left = s - done if done is not None else s
            if left:
                out[name] = left
        return out


def _runs(dirty: dict[str, PageSet]) -> dict[str, list[tuple[int, int]]]:
    return {name: list(s.runs()) for name, s in dirty.items() if s}


def _count(d: dict[str, PageSet]) -> int:
    return sum(len(s) for s in d.values())


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
    mark = rep.timeline.mark
    mark("start")
    maps = target.maps if target.maps is not None else read_maps(target.pid)
    regions: list[Region] = select_regions(maps, target.regions)
    rep.regions = [r.to_json() for r in regions]
    tracker = make_tracker(target.pid, regions, policy.tracker, uffd_fd=target.uffd_fd,
                           inject=policy.inject, hint_pids=[*target.writers, *_cgroup_pids(target.cgroup)],
                           no_syscall_writes=set(target.no_syscall_writes))
    rep.tracker = tracker.name
    baseline = tracker.content_baseline()
    mark("tracker-made")
    source = SourceMemory(target.pid, regions, maps)
    pauser = target.pauser or Pauser([target.pid, *target.writers], target.cgroup)
    throttle = Throttle([target.pid, *target.writers])
    specs = [RegionSpec(r.name, r.start, r.end) for r in regions]
    # a process that resumes the source should migrate die (SIGKILL, OOM) while it may be stopped
    # (by the pause, or auto-converge's duty cycles), started beside the set-up
    spec = pauser.resume_spec()
    guard = _Guard(Guardian(ResumeSpec((*throttle.pids, *spec.pids), spec.freezer, spec.qmp)), rep)

    def arm() -> dict[str, PageSet]:
        # The ledger sweeps the mappings the sender packs from, where there are (their page
        # tables are then filled before round 0).  Round 0's pages are found after the tracker
        # is armed: a page populated in between is then either in round 0 or reported by the
        # first collect.
        if baseline is not None:
            baseline.use_views({r.name: source.mapped(r.name) for r in regions})
            # what round 0 sends is the ledger's baseline: no sweep of everything first
            baseline.begin_from_sends()
        else:
            tracker.begin()
        mark("tracker-begun")
        first = {r.name: source.populated(r) for r in regions}
        mark("round0-planned")
        return first

    arming = Background(arm)        # beside the connection's set-up
    try:
        stopping = trio.CancelScope()
        if stop is not None:
            stop._attach(stopping)
        try:
            with stopping:
                async with connect_sender(host, port, key=key, regions=specs, channels=policy.channels,
                                          page_size=PAGE_SIZE, max_bandwidth=policy.max_bandwidth,
                                          ssl_context=ssl_context, encrypt=policy.encrypt,
                                          compress=policy.compress) as sender:
                    mark("connected")
                    first = await arming.result()
                    rep.setup_time_ms = (time.monotonic() - t_start) * 1000
                    try:
                        async with trio.open_nursery() as nursery:
                            if policy.auto_converge:
                                nursery.start_soon(throttle.run)
                            try:
                                await _run(rep, policy, tracker, source, sender, regions, pauser,
                                           throttle, progress, target, first, guard)
                            finally:
                                nursery.cancel_scope.cancel()
                    except BaseExceptionGroup as eg:
                        raise first_error(eg) from None
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
        def settle() -> None:
            arming.join()
            if pauser.paused and rep.status != "completed" and not rep.committing:
                pauser.resume()     # (retried for up to seconds while a thread will not run)
            guard.close()           # (the source is settled: resumed, or kept paused on purpose)

        # in a worker thread: each of these waits (the set-up thread, the resume, the guardian's
        # exit), and the event loop never blocks; shielded, so a cancelled migration settles too
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(settle)
        alive = process_exists(target.pid)
        rep.source_state = "exited" if not alive else ("paused" if pauser.paused else "running")
        rep.throttle_percent = throttle.percent
        rep.tracker_detail = tracker.statistics().detail
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(tracker.end)      # (frees userfaultfds: may wait)
        source.close()
        rep.total_time_ms = (time.monotonic() - t_start) * 1000
        mark("end")
        if rep.total_time_ms > 0:
            rep.mbps = rep.transferred_bytes * 8 / (rep.total_time_ms / 1000) / 1e6
    return rep


async def _run(rep: MigrationReport, policy: MigrationPolicy, tracker: Tracker, source: SourceMemory,
               sender, regions: list[Region], pauser: SourcePauser, throttle: Throttle,
               progress, target: MigrationTarget, first: dict[str, PageSet], guard: "_Guard") -> None:
    rep.status = "active"
    mark = rep.timeline.mark
    baseline = tracker.content_baseline()
    # what the destination holds, page by page (the digests come from it), and what the
    # ledger compares with next (LedgerTracker.record_sent): both kept as pages are packed
    sent_tables = SentHashes({r.name: r.npages for r in regions})
    record_sent = baseline.record_sent if baseline is not None else None

    def on_packed(name: str, data_flat, zero_flat, hashes: bytes) -> None:
        sent_tables.record(name, data_flat, zero_flat, hashes)
        if record_sent is not None:
            record_sent(name, data_flat, zero_flat, hashes)

    def account(round_no: int, dirtied: int, st, tracker_s: float, dirty_rate: float,
                expected_ms: float, final: bool = False) -> RoundStats:
        rs = RoundStats(round=round_no, pages_dirtied=dirtied,
                        pages_sent=st.pages_normal + st.pages_zero, pages_zero=st.pages_zero,
                        bytes=st.bytes, duration_ms=st.duration * 1000, tracker_ms=tracker_s * 1000,
                        bandwidth_mbps=st.bytes * 8 / st.duration / 1e6 if st.duration > 0 else 0.0,
                        dirty_rate_pps=dirty_rate, expected_downtime_ms=expected_ms,
                        throttle_percent=throttle.percent, stop_and_copy=final,
                        cpu_ms=st.cpu * 1000)
        rep.per_round.append(rs)
        rep.rounds = len(rep.per_round)
        rep.transferred_bytes += st.bytes
        rep.pages_normal += st.pages_normal
        rep.pages_zero += st.pages_zero
        ss = sender.statistics()
        rep.compressed_batches = ss.compressed_batches
        rep.compressed_raw_bytes = ss.compressed_raw_bytes
        rep.compressed_wire_bytes = ss.compressed_wire_bytes
        if progress:
            progress(rs)
        return rs

    async def send_and_collect(runs: dict[str, PageSet], round_no: int, lead_s: float,
                               since: float):
        """Send a round and, overlapping its end, collect the pages for the next one: the
        collect starts lead_s into the send (or once every page is read and sent, if sooner,
        while the receiver's acknowledgement is still due), and not before
        policy.min_round_s after the previous collect.  Returns the send's stats, the pages
        collected (None: the collect was skipped, switch over now), when they were, and the
        pages of this round not sent (the round was cut short, see cutter)."""
        box: dict = {}
        send_done = trio.Event()
        # "converge" cuts only round 0, where the tracker can tell how much of what the round
        # sent is rewritten already (no collect has measured the dirty rate yet)
        rewritten = baseline.rewritten_fraction if baseline is not None else None
        can_cut = policy.switchover == "fits" or (round_no == 0 and rewritten is not None)
        cut = threading.Event() if can_cut else None
        sent = SentPages({r.name: r.npages for r in regions}, on_packed)

        async def cutter() -> None:
            """Once the bandwidth is measured (policy.sample_s), end the round early if even
            every page of the regions would fit the limit (the rest goes in the stop-and-copy):
            - "fits": as soon as that bound fits (checked every 5 ms);
            - "converge": only if, besides, nearly all of a sample of the pages this round sent
              are rewritten already (checked every sample_s): the rest of the round would be
              sent again anyway, so going on could not shorten the pause, only the guest's
              time with the link and the CPU."""
            start = time.monotonic()
            every = 0.005 if policy.switchover == "fits" else policy.sample_s
            with trio.move_on_after(policy.sample_s):
                await send_done.wait()
            while not send_done.is_set():
                bound = switchover_bound_s()
                if bound <= limit_s:
                    why = "the rest fits the limit"
                    if policy.switchover != "fits":
                        sample = sent.sample()
                        frac = await trio.to_thread.run_sync(rewritten, sample)
                        n = sum(len(v) for v in sample.values())
                        if frac is None or frac < NONCONVERGENCE_RATIO or send_done.is_set():
                            why = ""
                        else:
                            why = f"{frac * 100:.0f} % of a sample of {n} pages it sent rewritten already"
                    if why:
                        cut.set()
                        rep.expected_downtime_ms = bound * 1000
                        mark(f"round{round_no}-cut")
                        rep.events.append(f"round {round_no} cut after {(time.monotonic() - start) * 1000:.0f} ms "
                                          f"({why}); its pages not sent go in the stop-and-copy")
                        return
                with trio.move_on_after(every):
                    await send_done.wait()

        def skip_collect() -> bool:
            """Decided once, when the collect would start or the send ended, if sooner: even if
            every page were written now, the switch-over would fit the limit, so this collect
            could not change the decision (the final collect finds the pages)."""
            if "skip" not in box:
                bound = switchover_bound_s()
                box["skip"] = bound <= limit_s or (cut is not None and cut.is_set())
                if box["skip"]:
                    box["dirty"], box["at"] = None, time.monotonic()
                    rep.expected_downtime_ms = bound * 1000
                    mark(f"collect{round_no + 1}-skipped")
            return box["skip"]

        async def collector() -> None:
            with trio.move_on_after(lead_s):
                await send_done.wait()
            if skip_collect():
                return
            await trio.sleep_until(since + policy.min_round_s)
            mark(f"collect{round_no + 1}-start")
            box["dirty"] = await trio.to_thread.run_sync(tracker.collect)
            box["at"] = time.monotonic()
            mark(f"collect{round_no + 1}-done")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(collector)
            if cut is not None:
                nursery.start_soon(cutter)
            # what is sent is what the tracker compares with next (LedgerTracker.record_sent)
            box["st"] = await sender.send_pages(_runs(runs), source, round_no,
                                                sent.packed if cut is not None else on_packed, until=cut)
            mark(f"round{round_no}-sent")
            send_done.set()
            # the digests brought up to date with this round (the switch-over's then hash only
            # the pages of its last rounds)
            nursery.start_soon(trio.to_thread.run_sync, sent_tables.refresh)
            # switching over now: the final round's end marker covers these pages too
            if not skip_collect():
                await sender.end_round(round_no)
                mark(f"round{round_no}-acked")
        unsent = sent.left(runs, box["st"].dropped) if cut is not None and cut.is_set() else {}
        return box["st"], box["dirty"], box["at"], unsent

    limit_s = policy.downtime_limit_ms / 1000
    total_bytes = sum(r.npages for r in regions) * PAGE_SIZE

    def switchover_bound_s() -> float:
        """The longest a switch-over now could take (s): the final collect, then every page of
        the regions sent at the bandwidth measured so far."""
        bandwidth = sender.statistics().bandwidth
        if bandwidth <= 0:
            return math.inf
        return tracker.final_collect_estimate_s() + total_bytes / bandwidth

    # round 0: every populated page (`first`), which the receiver allocates beside it (then
    # pages round 0 does not get to, if it is cut, cost no allocation in the stop-and-copy);
    # its collect starts once every page is sent
    await sender.prepare(_runs(first))
    t0 = time.monotonic()
    st, dirty, last_collect, unsent = await send_and_collect(first, 0, math.inf, t0 - policy.min_round_s)
    account(0, _count(first), st, 0.0, 0.0, 0.0)
    elapsed = last_collect - t0

    rules = RoundRules(limit_s=limit_s, switchover=policy.switchover, max_rounds=policy.max_rounds,
                       nonconvergence_rounds=policy.nonconvergence_rounds,
                       auto_converge=policy.auto_converge)
    streaks = Streaks()
    round_no = 0
    prev_sent = _count(first)
    pending: dict[str, PageSet] = {}
    while True:
        round_no += 1
        if dirty is None:        # the collect was skipped: switch over now (see collector)
            pending = unsent     # (a round cut short: its pages not sent)
            break
        _check_events(dirty, rep, round_no)
        _note_sweeps(dirty, rep, round_no)
        pending = dirty.pages
        n = _count(pending)
        dirty_rate = n / max(elapsed, 1e-6)                # pages/s
        rep.dirty_pages_rate = dirty_rate
        bandwidth = max(sender.statistics().bandwidth, 1.0)
        rep.bandwidth_bytes_per_s = bandwidth
        # the pause will cost the final collect (its page-table scans, and a sweep of each
        # object this collect had to sweep) and the transfer
        obs = Observation(round_no=round_no, dirty_pages=n, prev_sent=prev_sent, bandwidth=bandwidth,
                          final_collect_s=tracker.final_collect_estimate_s(), swept=bool(dirty.sweeps),
                          forced=policy.force_switchover is not None and policy.force_switchover.is_set(),
                          throttle_at_max=throttle.percent >= Throttle.MAX, page_size=PAGE_SIZE)
        expected_s = obs.expected_s
        rep.expected_downtime_ms = expected_s * 1000
        rep.remaining_bytes = n * PAGE_SIZE
        action, streaks = decide(obs, streaks, rules)
        if action is Action.SWITCH_OVER:
            break
        if action is Action.GIVE_UP_SWEEPS:
            s = dirty.sweeps[-1]
            rep.status = "not-converged"
            rep.reason = (f"not converging: the final collect alone would take about "
                          f"{obs.final_collect_s * 1000:.0f} ms, over the {policy.downtime_limit_ms:.0f} ms "
                          f"limit: the shmem ledger must sweep {', '.join(s.regions)} "
                          f"({s.nbytes / 2**20:.0f} MiB) at every collect, because {s.reason}; raise "
                          "--downtime-limit, or pause or stop what writes it by system calls; the guest "
                          "keeps running")
            return
        if action is Action.GIVE_UP_HOT:
            rep.status = "not-converged"
            rep.reason = (f"not converging: for {streaks.hot} rounds the dirty set did not shrink "
                          f"({n} pages, {n * PAGE_SIZE / 1e6:.1f} MB, dirtied at "
                          f"{dirty_rate * PAGE_SIZE / 1e6:.1f} MB/s against {bandwidth / 1e6:.1f} MB/s "
                          f"of bandwidth): a switch-over now would pause the guest about "
                          f"{expected_s * 1000:.0f} ms, over the {policy.downtime_limit_ms:.0f} ms limit; "
                          "enable --auto-converge, raise --downtime-limit or --max-bandwidth; "
                          "the guest keeps running")
            return
        if action is Action.THROTTLE_UP:
            await guard.armed()
            throttle.step_up()
        lead = max(0.0, n * PAGE_SIZE / bandwidth - dirty.cost_s)
        st, next_dirty, at, unsent = await send_and_collect(pending, round_no, lead, last_collect)
        account(round_no, n, st, dirty.cost_s, dirty_rate, expected_s * 1000)
        prev_sent = max(n, 1)
        elapsed, last_collect = at - last_collect, at
        dirty = next_dirty
        pending = {}

    async def final_round() -> FinishResult:
        """The source is paused: the pages still pending, the final collect beside them, the
        pages it found beyond them, a scanning send of the objects the ledger must sweep, then
        the receiver's verification (beside it, target.alongside_verify)."""
        collected: list[DirtyPages] = []
        got_final = trio.Event()
        # Where the ledger's hashes are those of what the destination holds, a sweep the final
        # collect needs is done by the sender instead: it compares every page with them as it
        # sends, one pass over the memory, not a sweep and then a send.
        hashes = baseline.known_hashes() if baseline is not None else {}
        fusable = frozenset(hashes)

        async def collect_final() -> None:
            collect = (lambda: baseline.collect(final=True, defer=fusable)) if baseline and fusable \
                else (lambda: tracker.collect(final=True))
            collected.append(await trio.to_thread.run_sync(collect))
            mark("final-collect")
            got_final.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect_final)
            # the pages still pending from the last round go out at once (the source is
            # paused, so what is read now is final)
            st1 = await sender.send_pages(_runs(pending), source, round_no, on_packed)
            mark("final-pending-sent")
            await got_final.wait()
        final = collected[0]
        rep.final_collect_ms = {"total": round(final.cost_s * 1000, 2), **final.parts_ms}
        _check_events(final, rep, "final")
        _note_sweeps(final, rep, "final")
        if target.pauser is None:
            unpaused = tracker.writer_pids() - {target.pid, *target.writers, *_cgroup_pids(target.cgroup)}
            for pid in sorted(unpaused):
                rep.events.append(f"warning: process {pid} maps the migrated shared memory and was "
                                  "not paused: writes it makes after the final collect are not in "
                                  "the copy (give it to --writers)")
        extra = _runs({name: (s - pending[name] if name in pending else s)
                       for name, s in final.pages.items()})
        # (nothing beyond the pending pages, as when the guest rewrites them all: no send to
        # set up and drain)
        st2 = await sender.send_pages(extra, source, round_no, on_packed) if extra \
            else SendStats(round_no, 0, 0, 0, 0, 0.0)
        scanned = sorted(final.unswept)
        rep.final_scanned = scanned
        st3 = SendStats(round_no, 0, 0, 0, 0, 0.0)
        if scanned:
            by_name = {r.name: r for r in regions}
            st3 = await sender.send_pages({n: [(0, by_name[n].npages)] for n in scanned}, source, round_no,
                                          on_packed, known={n: KnownPages(hashes[n], None, stable=True)
                                                            for n in scanned})
            mark("final-scanned")
        mark("final-sent")
        # the digests, from what was sent (8 bytes a page hashed, no memory read), while the
        # receiver acknowledges the round
        digests: dict[str, str] = {}

        async def digest_all() -> None:
            for r in regions:
                digests[r.name] = await trio.to_thread.run_sync(sent_tables.digest, r.name)
            mark("digests")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(digest_all)
            await sender.end_round(round_no)
            mark("final-acked")
        # every page sent in this round is one the destination did not hold (each sent once)
        sts = (st1, st2, st3)
        st = SendStats(round_no, sum(x.bytes for x in sts), sum(x.pages_normal for x in sts),
                       sum(x.pages_zero for x in sts), sum(x.batches for x in sts),
                       sum(x.duration for x in sts), cpu=sum(x.cpu for x in sts))
        rep.final_dirty_pages = st.pages_normal + st.pages_zero
        account(round_no, rep.final_dirty_pages, st, final.cost_s, rep.dirty_pages_rate,
                rep.expected_downtime_ms, final=True)
        t_verify = time.monotonic()
        mark("verify")
        if not target.wait_durable:
            # a destination that runs once verified (QEMU) may take over from END on: from here
            # a source resumed by the guardian could make two live copies
            guard.guardian.disarm()
        if target.alongside_verify is None:
            result = await sender.finish(digests, commit=target.wait_durable)
        else:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(target.alongside_verify)
                result = await sender.finish(digests, commit=target.wait_durable)
                mark("verify-result")
        mark("verified")
        rep.verify_ms = (time.monotonic() - t_verify) * 1000
        return result

    # stop-and-copy
    await guard.armed()
    with trio.CancelScope(shield=True):
        await throttle.stop()        # its last SIGCONT must come before our SIGSTOP
    t_pause = time.monotonic()
    mark("pause")
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(pauser.pause)
    mark("paused")
    try:
        with trio.fail_after(policy.verify_timeout_s):
            # beside the final round: what the target does once paused (a QEMU source starts
            # its own migration, up to its device state)
            async with trio.open_nursery() as beside:
                if target.after_pause is not None:
                    beside.start_soon(target.after_pause)
                result = await final_round()
    except trio.TooSlowError:
        raise MigratorError(f"stop-and-copy did not finish within {policy.verify_timeout_s} s") from None
    rep.downtime_ms = (time.monotonic() - t_pause) * 1000
    rep.remaining_bytes = 0
    if not result.complete:
        bad = [n for n, v in result.regions.items() if not v.verified]
        raise MigratorError(f"receiver could not verify region(s) {', '.join(bad)}: {result.message}")
    if policy.verify == "memory":
        # the source is still paused (it stays so on success): its memory read once more and
        # compared with what was sent, apart from the downtime
        t = time.monotonic()
        mark("verify-memory")
        differ = {}
        for r in regions:
            now = await trio.to_thread.run_sync(source.page_hashes, r.name)
            bad = sent_tables.compare(r.name, now)
            if bad:
                differ[r.name] = bad
        rep.verify_memory_ms = (time.monotonic() - t) * 1000
        mark("verified-memory")
        if differ:
            what = "; ".join(f"{n}: {len(b)}{'+' if len(b) >= 1000 else ''} pages (e.g. "
                             f"{', '.join(map(str, b[:8]))})" for n, b in differ.items())
            raise MigratorError(f"--verify memory: the paused source differs from what was sent in {what}: "
                                "writes the trackers missed")
    if target.wait_durable:
        # after the downtime: the destination fsyncs its images and says so; then we commit
        # (its manifest says complete only then).  From the commit on, the source never resumes:
        # if sending it fails, whether the destination got it is unknown, and a resumed source
        # beside a complete destination would be two live copies
        t = time.monotonic()
        mark("durable")
        await sender.wait_synced(policy.verify_timeout_s)
        rep.durable_ms = (time.monotonic() - t) * 1000
        rep.committing = True
        guard.guardian.disarm()               # (before the COMMIT: see the guardian's docstring)
        try:
            await sender.commit()
        except MigratorError as e:
            raise MigratorError(f"the commit may not have reached the receiver ({e}): the source stays "
                                f"paused; check the destination's manifest.json before resuming it") from None
        # the receiver's manifest says complete once it answers: when migrate returns, the
        # destination can be used (not a race against the COMMIT still in flight)
        try:
            await sender.wait_committed(policy.verify_timeout_s)
        except CommitRefusedError as e:
            # it says its manifest does not say complete: the destination is not usable, and
            # the source resumes (the guardian stays disarmed: a kill -9 now leaves it paused)
            rep.committing = False
            raise MigratorError(f"the receiver could not record the commit ({e}): the source "
                                f"resumes") from None
        except MigratorError as e:
            raise MigratorError(f"committed, but the receiver did not confirm its manifest ({e}): the "
                                f"source stays paused; check the destination's manifest.json") from None
        rep.durable_ms = (time.monotonic() - t) * 1000
        mark("committed")
    rep.status = "completed"


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


def _note_sweeps(d: DirtyPages, rep: MigrationReport, round_no: int | str) -> None:
    """Record in the report each object the ledger swept (or the final send scanned), and why."""
    for s in d.sweeps:
        rep.sweeps.append({"round": round_no, "regions": list(s.regions), "bytes": s.nbytes,
                           "reason": s.reason})


def _check_events(d: DirtyPages, rep: MigrationReport, round_no: int | str) -> None:
    """Fail on a tracked region that changed shape; note what else the tracker saw (mappers of
    shared memory found or gone) in the report's events."""
    for e in d.events:
        if e.what.startswith("mapper-"):
            rep.events.append(f"round {round_no}: {e.region}: {e.what}: {e.detail}")
        if e.what == "unmapped":
            raise MigratorError(f"region {e.region} changed under the migration: {e.detail}")
