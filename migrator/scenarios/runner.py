"""Running one scenario once: receiver in its own process, the guest, the link, the events, the
migration, then the destination checked byte for byte against the paused source.

    result = trio.run(run_once, scenario, run_dir, 1, printer)
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from ..errors import MigratorError
from ..guest import Guest, PageOut, start_guest
from ..precopy import MigrationPolicy, MigrationTarget, RoundStats, migrate
from ..transport import generate_key_file
from .expect import Check, check_expectations
from .link import DelayProxy
from ..receiver_process import ReceiverProcess
from .destination import compare_with_source
from .spec import Event, Scenario

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
RUNNING_PROBE_S = 0.2        # how long to watch a not-converged guest keep writing


@dataclass
class RunResult:
    """One run of one scenario: the controller's report and what the runner saw around it."""

    scenario: str
    repeat: int
    memory_bytes: int
    report: dict = field(default_factory=dict)          # MigrationReport.to_json()
    timeline: list[dict] = field(default_factory=list)  # per round: start_s, end_s, remaining_bytes
    downtime_window_s: tuple[float, float] | None = None
    events: list[dict] = field(default_factory=list)    # t_s, what, detail
    destination: str = ""          # identical | differs: ... | incomplete: ... | not checked: ...
    pages_compared: int = 0
    guest_running_after: bool | None = None
    guest_pages_written: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    error: str = ""
    checks: list[Check] = field(default_factory=list)
    skipped: str = ""              # why the run did not happen (kind = "qemu" without QEMU, outside CI)
    methods: list[dict] = field(default_factory=list)   # kind = "qemu": one compare.Run per method

    @property
    def passed(self) -> bool:
        return not self.error and all(c.ok for c in self.checks)

    @property
    def status(self) -> str:
        return "skipped" if self.skipped else self.report.get("status", "error")

    def to_json(self) -> dict:
        return {"scenario": self.scenario, "repeat": self.repeat, "passed": self.passed,
                "error": self.error, "memory_bytes": self.memory_bytes,
                "destination": self.destination, "pages_compared": self.pages_compared,
                "guest_running_after": self.guest_running_after,
                "guest_pages_written": self.guest_pages_written, "wall_s": round(self.wall_s, 3),
                "checks": [c.to_json() for c in self.checks],
                "downtime_window_s": list(self.downtime_window_s) if self.downtime_window_s else None,
                "timeline": self.timeline, "events": self.events, "report": self.report,
                "skipped": self.skipped, "methods": self.methods}

    @classmethod
    def from_json(cls, d: dict) -> "RunResult":
        r = cls(scenario=d["scenario"], repeat=d["repeat"], memory_bytes=d["memory_bytes"],
                report=d["report"], timeline=d["timeline"], events=d["events"],
                destination=d["destination"], pages_compared=d["pages_compared"],
                guest_running_after=d["guest_running_after"], guest_pages_written=d["guest_pages_written"],
                wall_s=d["wall_s"], error=d["error"], checks=[Check.from_json(c) for c in d["checks"]],
                skipped=d.get("skipped", ""), methods=d.get("methods", []))
        if d.get("downtime_window_s"):
            r.downtime_window_s = tuple(d["downtime_window_s"])
        return r


def swap_active() -> bool:
    with open("/proc/swaps") as f:
        return len(f.read().strip().splitlines()) > 1


def policy_of(scn: Scenario) -> MigrationPolicy:
    p = scn.policy
    return MigrationPolicy(downtime_limit_ms=p.downtime_limit_ms, max_bandwidth=scn.link.bandwidth,
                           max_rounds=p.max_rounds, auto_converge=p.auto_converge, tracker=p.tracker,
                           channels=p.channels, nonconvergence_rounds=p.nonconvergence_rounds,
                           min_round_s=p.min_round_s, verify="memory", compress=p.compress,
                           delta_cache=p.delta_cache)


def target_of(g: Guest) -> MigrationTarget:
    """Both guest blocks (the anon block by its address range); every side writer is paused with
    the guest."""
    sel = [g.region("shared").name]
    if "anon" in g.regions and g.regions["anon"].size:
        a = g.regions["anon"]
        sel.append(f"{a.start:x}-{a.end:x}")
    return MigrationTarget(pid=g.pid, regions=sel, writers=list(g.writer_pids.values()), uffd_fd=g.uffd_fd)


async def run_once(scn: Scenario, run_dir: str, repeat: int = 1,
                   progress: Callable[[str], None] | None = None, keep_images: bool = False) -> RunResult:
    """Run the scenario once in run_dir (receiver log, key, destination images; the images are
    removed afterwards unless keep_images).  Never raises MigratorError: a problem is the result's
    `error`."""
    if scn.kind == "qemu":
        from .qemu_run import run_qemu_once
        return await run_qemu_once(scn, run_dir, repeat, progress)
    res = RunResult(scenario=scn.name, repeat=repeat, memory_bytes=scn.memory_bytes)
    t_wall = time.monotonic()
    os.makedirs(run_dir, exist_ok=True)
    dest = os.path.join(run_dir, "dest")
    try:
        if scn.needs_swap and not swap_active():
            raise MigratorError("this scenario pushes pages out to swap, but no swap is active "
                                "(scripts/setup.sh turns on swap on zram)")
        key_file = os.path.join(run_dir, "key")
        generate_key_file(key_file)
        receiver = await trio.to_thread.run_sync(
            lambda: ReceiverProcess(dest, os.path.join(run_dir, "receiver.log"), key_file))
        try:
            guest = await trio.to_thread.run_sync(start_guest, scn.guest)
            try:
                await _migrate_and_check(scn, guest, receiver, key_file, res, progress)
            finally:
                await trio.to_thread.run_sync(guest.stop)
        finally:
            receiver.stop()
    except MigratorError as e:
        res.error = str(e)
    finally:
        if not keep_images:
            shutil.rmtree(dest, ignore_errors=True)
    res.wall_s = time.monotonic() - t_wall
    res.checks = check_expectations(scn, res)
    return res


async def _migrate_and_check(scn: Scenario, guest: Guest, receiver: ReceiverProcess, key_file: str,
                             res: RunResult, progress: Callable[[str], None] | None) -> None:
    from ..transport import load_key

    key = load_key(key_file)
    policy = policy_of(scn)
    target = target_of(guest)
    pageout = PageOut(guest) if any(e.action == "pageout" for e in scn.events) else None
    round_ends_tx, round_ends_rx = trio.open_memory_channel[int](64)
    t0 = 0.0

    def on_round(rs: RoundStats) -> None:
        end = trio.current_time() - t0
        remaining = rs.pages_dirtied * PAGE_SIZE
        res.timeline.append({"round": rs.round, "start_s": round(end - rs.duration_ms / 1000, 4),
                             "end_s": round(end, 4), "remaining_bytes": remaining,
                             "stop_and_copy": rs.stop_and_copy})
        if progress:
            progress(_round_line(scn, rs))
        if not rs.stop_and_copy:
            try:
                round_ends_tx.send_nowait(rs.round)
            except trio.WouldBlock:
                pass

    try:
        async with trio.open_nursery() as nursery:
            host, port = "127.0.0.1", receiver.port
            if scn.link.latency_ms:
                proxy = DelayProxy(host, port, scn.link.latency_ms / 1000)
                port = await nursery.start(proxy.run)
            if scn.warmup_s:
                await trio.sleep(scn.warmup_s)
            t0 = trio.current_time()
            for ev in scn.events:
                nursery.start_soon(_event_task, ev, guest, pageout, t0, res,
                                   round_ends_rx.clone() if ev.after_rounds else None)
            report = await migrate(target, host, port, key=key, policy=policy, progress=on_round)
            nursery.cancel_scope.cancel()
    finally:
        if pageout is not None:
            pageout.close()
    res.report = report.to_json()
    final = next((t for t in res.timeline if t["stop_and_copy"]), None)
    if final is not None and report.status == "completed":
        verified = final["end_s"] + report.verify_ms / 1000
        res.downtime_window_s = (round(verified - report.downtime_ms / 1000, 4), round(verified, 4))
    try:
        res.guest_pages_written = {k: w.pages for k, w in guest.stats().writers.items()}
    except MigratorError:
        pass
    if report.status == "completed":
        chk = await trio.to_thread.run_sync(compare_with_source, guest.pid, receiver.out_dir)
        res.pages_compared = chk.pages
        res.destination = "identical" if chk.identical else f"differs: {chk.detail}"
    elif report.status == "not-converged":
        res.destination = "incomplete: not converged (nothing switched over)"
        res.guest_running_after = await _keeps_running(guest, scn.guest.workload.kind == "idle")
    else:
        res.destination = f"not checked: migration {report.status}"


def _round_line(scn: Scenario, rs: RoundStats) -> str:
    what = "stop-and-copy" if rs.stop_and_copy else f"round {rs.round}"
    return (f"{scn.name}: {what:>13}: {rs.pages_sent:>8} pages {rs.bytes / 1e6:8.1f} MB in "
            f"{rs.duration_ms:7.1f} ms {rs.bandwidth_mbps:6.0f} Mbit/s  dirty "
            f"{rs.dirty_rate_pps * PAGE_SIZE / 1e6:6.1f} MB/s  expected downtime "
            f"{rs.expected_downtime_ms:6.1f} ms" + (f"  throttle {rs.throttle_percent}%" if rs.throttle_percent else ""))


async def _keeps_running(guest: Guest, idle: bool) -> bool:
    """True if the guest is not stopped and (unless idle) its vcpu still writes."""
    from ..kernel.process import process_state

    try:
        if process_state(guest.pid) in ("T", "t", "Z", "X"):
            return False
        if idle:
            return True
        before = guest.stats().writers["vcpu"].pages
        await trio.sleep(RUNNING_PROBE_S)
        return guest.stats().writers["vcpu"].pages > before
    except MigratorError:
        return False


async def _event_task(ev: Event, guest: Guest, pageout: PageOut | None, t0: float, res: RunResult,
                      round_ends: trio.MemoryReceiveChannel | None) -> None:
    async def fire() -> None:
        t = trio.current_time() - t0
        if ev.action == "pageout":
            assert pageout is not None
            n = await trio.to_thread.run_sync(pageout, ev.region, ev.offset, ev.length)
            detail = f"{n // PAGE_SIZE} pages advised out"
        else:
            guest.set_rate(ev.rate, ev.writer)
            detail = ""
        res.events.append({"t_s": round(t, 4), "what": ev.describe(), "detail": detail})

    if round_ends is not None:
        async with round_ends:
            async for _ in round_ends:
                await fire()
        return
    await trio.sleep_until(t0 + ev.at_s)
    while True:
        await fire()
        if not ev.every_s:
            return
        await trio.sleep(ev.every_s)
