"""The source side of a QEMU migration: find the guest RAM, pause with QMP, move the device state.

migrator moves the guest RAM (a shared memory backend) with its pre-copy rounds; QEMU then moves
only the device state, because the migration capability `x-ignore-shared` makes it skip RAM
blocks backed by shared memory (the destination already holds them).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import trio

from ..errors import MigratorError, RegionError
from ..guardian import ResumeSpec
from ..kernel.maps import RegionKind, read_maps
from ..precopy.background import Background
from ..precopy.controller import MigrationPolicy, MigrationTarget, StopToken, check_key, migrate
from ..precopy.report import MigrationReport, RoundStats, Timeline
from .qmp import QMP, MigrationUnfinishedError, QmpError

TERMINAL = ("completed", "failed", "cancelled")
UNCAPPED = 10_000_000_000          # bytes/s: QEMU's default cap (32 MiB/s) would crawl


@dataclass(frozen=True)
class GuestRam:
    """The guest RAM of a QEMU process: one shared memory backend and where it is mapped."""

    memdev: str
    size: int
    start: int
    end: int
    path: str

    @property
    def selector(self) -> str:
        return f"{self.start:x}-{self.end:x}"


def qemu_pid(qmp: QMP) -> int:
    """The pid of the QEMU at the other end of the QMP socket (SO_PEERCRED)."""
    creds = qmp._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return pid


def find_guest_ram(pid: int, qmp: QMP, *, memdevs: list | None = None,
                   maps: list | None = None) -> GuestRam:
    """The one shared memory backend of the VM (query-memdev, unless memdevs holds its answer)
    and its mapping in /proc/PID/maps (unless maps holds them).

    Raises:
        RegionError: no backend, more than one, not share=on, or no mapping of its size.
    """
    devs = memdevs if memdevs is not None else qmp.execute("query-memdev")
    if not devs:
        raise RegionError("QEMU reports no memory backend: start it with "
                          "-object memory-backend-memfd,id=ram,size=...,share=on -machine memory-backend=ram")
    if len(devs) > 1:
        raise RegionError(f"QEMU has {len(devs)} memory backends; migrator drives one (the machine RAM)")
    dev = devs[0]
    name = dev.get("id", "?")
    if not dev.get("share"):
        raise RegionError(f"memory backend {name} is not share=on: x-ignore-shared would not skip it, "
                          "and migrator can only hand over shared guest RAM")
    size = int(dev["size"])
    found = [m for m in (maps if maps is not None else read_maps(pid)) if m.shared
             and m.end - m.start == size and m.kind in (RegionKind.SHARED, RegionKind.FILE) and m.offset == 0]
    if len(found) != 1:
        raise RegionError(f"found {len(found)} shared mappings of {size} bytes in QEMU {pid} for backend "
                          f"{name}; expected exactly one")
    m = found[0]
    return GuestRam(memdev=name, size=size, start=m.start, end=m.end, path=m.path)


class QmpPauser:
    """The pauser of the pre-copy controller for a QEMU VM: QMP `stop` / `cont`.

    stopped_at is QEMU's own wall-clock stamp of the STOP event (downtime starts there).
    resume() first cancels a migration of QEMU's own that was started (see DeviceStateMigration)
    and has not ended: QEMU refuses `cont` until it has."""

    def __init__(self, qmp: QMP):
        self.qmp = qmp
        self.paused = False
        self.stopped_at: float | None = None
        self.devstate: "DeviceStateMigration | None" = None

    def pause(self) -> None:
        since = len(self.qmp.events)
        t = time.time()
        self.qmp.execute("stop")
        self.paused = True
        try:
            self.stopped_at = self.qmp.wait_event("STOP", 2.0, since=since).timestamp
        except QmpError:
            self.stopped_at = t

    def resume_spec(self) -> ResumeSpec:
        return ResumeSpec(qmp=self.qmp.path)

    def resume(self) -> None:
        if self.devstate is not None:
            try:
                self.devstate.cancel()
            except QmpError:
                pass             # `cont` below says whether QEMU lets the VM run
        deadline = time.monotonic() + 5.0
        while True:
            try:
                self.qmp.execute("cont")
                break
            except MigrationUnfinishedError:
                # a failed migration's end (finish-migrate -> postmigrate) may still be under way
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.001)
        self.paused = False


MIGRATION_CAPABILITIES = ("x-ignore-shared", "events", "return-path", "pause-before-switchover")


MIGRATING = ("setup", "active", "pre-switchover", "device", "postcopy-active")


def check_not_migrating(info: dict) -> None:
    """Refuse a VM that is migrating already (info: query-migrate's answer)."""
    if info.get("status") in MIGRATING:
        raise MigratorError(f"QEMU is already migrating (status {info['status']})")


def set_device_migration_capabilities(qmp: QMP, max_bandwidth: float | None) -> None:
    """Capabilities and cap of a device-state-only migration (one QMP round trip)."""
    qmp.execute_many(
        ("migrate-set-capabilities", {"capabilities": [
            {"capability": c, "state": True} for c in MIGRATION_CAPABILITIES]}),
        ("migrate-set-parameters", {"max-bandwidth": int(max_bandwidth or UNCAPPED)}))


def prepare_device_migration(qmp: QMP, max_bandwidth: float | None) -> None:
    """Capabilities for a device-state-only migration (set before anything moves)."""
    check_not_migrating(qmp.execute("query-migrate"))
    set_device_migration_capabilities(qmp, max_bandwidth)


def wait_migration(qmp: QMP, since: int, wait_s: float, statuses: tuple[str, ...] = TERMINAL) -> str:
    """Wait for a MIGRATION event with one of `statuses` (default: a terminal one) among the
    events after index `since`; a terminal status ends the wait too."""
    deadline = time.monotonic() + wait_s
    while True:
        for ev in qmp.events[since:]:
            if ev.name == "MIGRATION" and ev.data.get("status") in statuses + TERMINAL:
                return ev.data["status"]
        since = len(qmp.events)
        left = deadline - time.monotonic()
        if left <= 0:
            raise QmpError(f"QEMU migration did not reach {'/'.join(statuses)} within {wait_s} s")
        qmp.wait_event("MIGRATION", left, since=since)


@dataclass(frozen=True)
class DeviceState:
    status: str
    duration_ms: float      # from migrate-continue (all RAM at the destination) to completed
    bytes: int              # what QEMU counted (non-shared RAM blocks: ROMs, etc.)
    qemu_downtime_ms: float
    attempts: int


def _connect(uri: str, deadline: float) -> socket.socket:
    """A TCP connection to tcp:HOST:PORT with Nagle off, retrying while refused."""
    hostport = uri[len("tcp:"):]
    host, _, port = hostport.rpartition(":")
    host = host[1:-1] if host.startswith("[") else host
    while True:
        try:
            sock = socket.create_connection((host, int(port)), timeout=5.0)
            break
        except ConnectionRefusedError:
            if time.monotonic() >= deadline:
                raise QmpError(f"the destination QEMU at {uri} refused the connection") from None
            time.sleep(0.005)
        except OSError as e:
            raise QmpError(f"cannot connect to the destination QEMU at {uri}: {e.strerror or e}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class DeviceStateMigration:
    """QEMU's own migration of everything but the shared RAM, in two steps around migrator's
    final pages, so that only the device state itself is left for the end of the downtime.

    start(), once the source is paused (beside the final pages): connect to the destination
    QEMU (tcp:HOST:PORT, retried for retry_s while refused) with TCP_NODELAY, hand the socket to
    QEMU (`getfd` + `migrate fd:`: the return path's small last messages then do not wait for
    delayed ACKs) and migrate.  With `pause-before-switchover` QEMU sends its set-up and the
    non-shared RAM blocks (ROMs, ~0.2 MB) and waits in `pre-switchover`.
    finish(), once every RAM page is written at the destination: `migrate-continue`: QEMU sends
    the device state (which the destination may load only onto complete RAM) and completes; with
    the return path the source learns whether the destination loaded it.
    cancel(): on any failure, end a migration that was started (QEMU refuses `cont` before).

    Blocking calls (run them in threads).  Every failure raises QmpError naming the device state.
    """

    def __init__(self, qmp: QMP, uri: str, *, retry_s: float = 10.0, timeline: Timeline | None = None):
        self.qmp = qmp
        self.uri = uri
        self.retry_s = retry_s
        self.mark = (timeline if timeline is not None else Timeline()).mark
        self.started = False            # `migrate` issued (cancel() has something to end)
        self._since = 0
        self._start_done = threading.Event()
        self._start_error: QmpError | None = None
        self._lock = threading.Lock()    # start's `migrate` vs cancel()
        self._cancelled = False

    def _failed(self, why: str) -> QmpError:
        return QmpError(f"QEMU could not send its device state to {self.uri}: {why}")

    def start(self) -> None:
        try:
            self._start()
        except QmpError as e:
            self._start_error = self._failed(str(e))
            raise self._start_error from None
        finally:
            self._start_done.set()

    def _start(self) -> None:
        self.mark("devstate-start")
        self._since = len(self.qmp.events)
        if self.uri.startswith("tcp:"):
            sock = _connect(self.uri, time.monotonic() + self.retry_s)
            self.mark("devstate-connected")
            try:
                self.qmp.execute_with_fd("getfd", sock.fileno(), fdname="migrator-devstate")
            finally:
                sock.close()
        with self._lock:
            if self._cancelled:      # the migration failed meanwhile: the source resumes
                raise QmpError("cancelled")
            self.started = True
            self.qmp.execute("migrate", uri="fd:migrator-devstate" if self.uri.startswith("tcp:") else self.uri)
        self.mark("devstate-migrate-sent")

    def finish(self) -> DeviceState:
        if not self._start_done.wait(self.retry_s + 30):
            raise self._failed("its migration did not start")
        if self._start_error is not None:
            raise self._start_error
        t0 = time.monotonic()
        status = wait_migration(self.qmp, self._since, self.retry_s + 30, ("pre-switchover",))
        self.mark("devstate-pre-switchover")
        if status == "pre-switchover":
            t0 = time.monotonic()
            try:
                self.qmp.execute("migrate-continue", state="pre-switchover")
            except QmpError as e:
                raise self._failed(str(e)) from None
            self.mark("devstate-continue-sent")
            status = wait_migration(self.qmp, self._since, self.retry_s + 30)
        self.mark("devstate-event")
        for ev in self.qmp.events[self._since:]:
            if ev.name == "MIGRATION":
                self.mark(f"src-qemu-{ev.data.get('status')}", ev.timestamp)
        info = self.qmp.execute("query-migrate")
        self.mark("devstate-done")
        if status != "completed":
            raise self._failed(info.get("error-desc", status))
        return DeviceState(status, (time.monotonic() - t0) * 1000,
                           int(info.get("ram", {}).get("transferred", 0)), float(info.get("downtime", 0)), 1)

    def cancel(self, wait_s: float = 10.0) -> None:
        """End a started migration that has not ended (migrate_cancel), and wait until it has;
        a start() still under way will not start one."""
        with self._lock:
            self._cancelled = True
        if not self.started:
            return
        if any(ev.name == "MIGRATION" and ev.data.get("status") in TERMINAL
               for ev in self.qmp.events[self._since:]):
            return
        self.qmp.execute("migrate_cancel")
        wait_migration(self.qmp, self._since, wait_s)


def _settled_state(qmp: QMP, wait_s: float = 2.0) -> str:
    """The source's run state once the end of a migration settled (finish-migrate -> postmigrate)."""
    deadline = time.monotonic() + wait_s
    while True:
        st = qmp.execute("query-status").get("status", "?")
        if st != "finish-migrate" or time.monotonic() > deadline:
            return st
        time.sleep(0.001)


@dataclass
class QemuMigrationReport:
    """migrator's RAM report plus the QEMU part.  downtime_ms runs from the pause until the RAM
    verified and the source QEMU sent the device state (both at once; the destination resumes
    right after).  stopped_at is QEMU's stamp of the STOP event."""

    status: str = "setup"
    reason: str = ""
    total_time_ms: float = 0.0
    downtime_ms: float = 0.0
    transferred_bytes: int = 0          # RAM pages (migrator) + QEMU's own count
    rounds: int = 0
    device_state_ms: float = 0.0
    device_state_bytes: int = 0
    stopped_at: float | None = None     # wall clock of the STOP event
    device_state_done_at: float | None = None
    memdev: str = ""
    ram_size: int = 0
    source_state: str = ""
    ram: MigrationReport = field(default_factory=MigrationReport)
    timeline: Timeline = field(default_factory=Timeline)    # wall-clock stamps, RAM steps included

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("ram", "timeline")}
        d["ram"] = self.ram.to_json()
        d["timeline"] = dict(self.timeline)
        return d

    def summary(self) -> str:
        return "\n".join([
            f"VM migration {self.status}" + (f": {self.reason}" if self.reason else ""),
            f"  total {self.total_time_ms:.0f} ms, downtime {self.downtime_ms:.1f} ms "
            f"(device state {self.device_state_ms:.1f} ms of it, beside the RAM verification), "
            f"{self.rounds} rounds, {self.transferred_bytes / 1e6:.1f} MB sent "
            f"(device state {self.device_state_bytes / 1e3:.0f} kB), source {self.source_state}",
            self.ram.summary()])


@dataclass
class _Checked:
    """What migrate_vm learns from QMP and procfs before anything moves."""

    pid: int
    maps: list
    ram: GuestRam


def _check_vm(qmp: QMP) -> _Checked:
    """The VM runs, is not migrating, and has its RAM in shared memory (blocking: QMP, procfs)."""
    status, memdevs, migration = qmp.execute_many("query-status", "query-memdev", "query-migrate")
    if status.get("status") != "running":
        raise MigratorError("the VM is not running (QMP query-status); start it or `cont` first")
    check_not_migrating(migration)
    pid = qemu_pid(qmp)
    maps = read_maps(pid)
    return _Checked(pid, maps, find_guest_ram(pid, qmp, memdevs=memdevs, maps=maps))


class _DeviceState:
    """QEMU's own migration of the device state, hooked into the RAM migration's stop-and-copy
    (MigrationTarget.after_pause and alongside_verify)."""

    def __init__(self, migration: DeviceStateMigration, caps: Background, rep: QemuMigrationReport):
        self.migration, self._caps, self._rep = migration, caps, rep
        self.done: list[DeviceState] = []

    async def start(self) -> None:
        """The VM is stopped: QEMU's migration starts beside the final pages and waits in
        pre-switchover, before its device state."""
        try:
            await self._caps.result()
        except QmpError as e:
            raise QmpError(f"QEMU could not send its device state: {e}") from None
        await trio.to_thread.run_sync(self.migration.start)

    async def finish(self) -> None:
        """Every RAM page is at the destination: QEMU sends the device state while the receiver
        verifies the RAM digests.  The destination VM is resumed only if both succeed; if either
        fails, the controller resumes the source (the pauser cancels QEMU's migration first;
        `cont` works from postmigrate too: QEMU re-activates the disks)."""
        self.done.append(await trio.to_thread.run_sync(self.migration.finish))
        self._rep.device_state_done_at = time.time()


async def migrate_vm(qmp_path: str, host: str, port: int, incoming_uri: str, *, key: bytes | None,
                     policy: MigrationPolicy | None = None, ssl_context=None,
                     progress: Callable[[RoundStats], None] | None = None,
                     stop: StopToken | None = None) -> QemuMigrationReport:
    """Live-migrate the QEMU VM behind qmp_path: its RAM by pre-copy to the receiver at host:port,
    then its device state by QEMU (x-ignore-shared) to incoming_uri (e.g. tcp:HOST:PORT).
    Every QMP call runs in a worker thread: the event loop never waits on QEMU.

    On any failure the source VM runs on (`cont`) and the report says why.

    Raises:
        MigratorError: problems found before anything moved (no QMP, no shared RAM, ...).
    """
    policy = policy or MigrationPolicy()
    check_key(policy, key)
    t0 = time.monotonic()
    timeline = Timeline()
    timeline.mark("qmp-start")
    qmp = await trio.to_thread.run_sync(lambda: QMP(qmp_path))
    timeline.mark("qmp-connected")
    caps: Background | None = None
    try:
        vm = await trio.to_thread.run_sync(_check_vm, qmp)
        timeline.mark("qmp-checked")
        # the capabilities are set beside the RAM migration's set-up; needed at the pause
        caps = Background(lambda: set_device_migration_capabilities(qmp, policy.max_bandwidth))
        pauser = QmpPauser(qmp)
        rep = QemuMigrationReport(memdev=vm.ram.memdev, ram_size=vm.ram.size, timeline=timeline)
        pauser.devstate = DeviceStateMigration(qmp, incoming_uri, timeline=timeline)
        devices = _DeviceState(pauser.devstate, caps, rep)
        # QEMU writes guest RAM through its mapping only (vCPUs, device emulation, its block
        # layer's reads into guest buffers); its RAM backend's descriptor serves mmap, discard
        # (fallocate: the sweep gate sees the holes) and passing to vhost-user backends, never
        # write(2).  So its many write calls (eventfds, logs) do not make the ledger sweep; its
        # direct-I/O reads (O_DIRECT images) still do (see tracking/sweepgate.py)
        target = MigrationTarget(vm.pid, [vm.ram.selector], pauser=pauser, maps=vm.maps,
                                 after_pause=devices.start, alongside_verify=devices.finish,
                                 no_syscall_writes=[vm.pid], wait_durable=False)
        rep.ram = await migrate(target, host, port, key=key, policy=policy, ssl_context=ssl_context,
                                progress=progress, stop=stop)
        _sum_up(rep, pauser, devices.done)
        rep.source_state = await trio.to_thread.run_sync(_settled_state, qmp)
        timeline.mark("settled")
        rep.total_time_ms = (time.monotonic() - t0) * 1000
        return rep
    finally:
        def close() -> None:
            if caps is not None:
                caps.join()
            qmp.close()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(close)


def _sum_up(rep: QemuMigrationReport, pauser: QmpPauser, devices: list[DeviceState]) -> None:
    """The VM's report from its RAM migration's and its device state's."""
    rep.timeline.update(rep.ram.timeline)
    if pauser.stopped_at is not None:
        rep.timeline.mark("src-qemu-STOP", pauser.stopped_at)
    rep.rounds = rep.ram.rounds
    rep.transferred_bytes = rep.ram.transferred_bytes
    rep.stopped_at = pauser.stopped_at
    if rep.ram.status != "completed":
        rep.status, rep.reason = rep.ram.status, rep.ram.reason
        return
    dev = devices[0]
    rep.status = "completed"
    rep.device_state_ms = dev.duration_ms
    rep.device_state_bytes = dev.bytes
    rep.transferred_bytes += dev.bytes
    rep.downtime_ms = rep.ram.downtime_ms       # pause -> RAM verified and device state sent
