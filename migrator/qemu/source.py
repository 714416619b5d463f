"""The source side of a QEMU migration: find the guest RAM, pause with QMP, move the device state.

migrator moves the guest RAM (a shared memory backend) with its pre-copy rounds; QEMU then moves
only the device state, because the migration capability `x-ignore-shared` makes it skip RAM
blocks backed by shared memory (the destination already holds them).
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import trio

from ..errors import MigratorError, RegionError
from ..kernel.maps import RegionKind, read_maps
from ..precopy.controller import MigrationPolicy, MigrationTarget, migrate
from ..precopy.report import MigrationReport, RoundStats, Timeline
from .qmp import QMP, QmpError

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


def find_guest_ram(pid: int, qmp: QMP) -> GuestRam:
    """The one shared memory backend of the VM (query-memdev) and its mapping in /proc/PID/maps.

    Raises:
        RegionError: no backend, more than one, not share=on, or no mapping of its size.
    """
    devs = qmp.execute("query-memdev")
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
    maps = [m for m in read_maps(pid) if m.shared and m.end - m.start == size
            and m.kind in (RegionKind.SHARED, RegionKind.FILE) and m.offset == 0]
    if len(maps) != 1:
        raise RegionError(f"found {len(maps)} shared mappings of {size} bytes in QEMU {pid} for backend "
                          f"{name}; expected exactly one")
    m = maps[0]
    return GuestRam(memdev=name, size=size, start=m.start, end=m.end, path=m.path)


class QmpPauser:
    """The pauser of the pre-copy controller for a QEMU VM: QMP `stop` / `cont`.

    stopped_at is QEMU's own wall-clock stamp of the STOP event (downtime starts there)."""

    def __init__(self, qmp: QMP):
        self.qmp = qmp
        self.paused = False
        self.stopped_at: float | None = None

    def pause(self) -> None:
        since = len(self.qmp.events)
        t = time.time()
        self.qmp.execute("stop")
        self.paused = True
        try:
            self.stopped_at = self.qmp.wait_event("STOP", 2.0, since=since).timestamp
        except QmpError:
            self.stopped_at = t

    def resume(self) -> None:
        self.qmp.execute("cont")
        self.paused = False


def prepare_device_migration(qmp: QMP, max_bandwidth: float | None) -> None:
    """Capabilities for a device-state-only migration (set before anything moves)."""
    st = qmp.execute("query-migrate").get("status")
    if st in ("setup", "active", "pre-switchover", "device", "postcopy-active"):
        raise MigratorError(f"QEMU is already migrating (status {st})")
    qmp.execute("migrate-set-capabilities", capabilities=[
        {"capability": "x-ignore-shared", "state": True},
        {"capability": "events", "state": True},
        {"capability": "return-path", "state": True}])
    qmp.execute("migrate-set-parameters", **{"max-bandwidth": int(max_bandwidth or UNCAPPED)})


def wait_migration(qmp: QMP, since: int, wait_s: float) -> str:
    """Wait for a MIGRATION event with a terminal status (events after index `since`)."""
    deadline = time.monotonic() + wait_s
    while True:
        for ev in qmp.events[since:]:
            if ev.name == "MIGRATION" and ev.data.get("status") in TERMINAL:
                return ev.data["status"]
        since = len(qmp.events)
        left = deadline - time.monotonic()
        if left <= 0:
            raise QmpError(f"QEMU migration did not finish within {wait_s} s")
        qmp.wait_event("MIGRATION", left, since=since)


@dataclass(frozen=True)
class DeviceState:
    status: str
    duration_ms: float
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


def send_device_state(qmp: QMP, uri: str, *, retry_s: float = 10.0,
                      timeline: Timeline | None = None) -> DeviceState:
    """Have QEMU migrate to uri (tcp:HOST:PORT, the destination QEMU's incoming address) and wait.

    migrator opens the connection itself (retrying for retry_s while the destination is not
    listening yet), with TCP_NODELAY, and hands it to QEMU (`getfd` + `migrate fd:`): the small
    messages at the end of a device-state migration then do not wait for delayed ACKs.

    Raises:
        QmpError: the migration failed (QEMU's reason in the message).
    """
    mark = (timeline or Timeline()).mark
    t0 = time.monotonic()
    mark("devstate-start")
    since = len(qmp.events)
    if uri.startswith("tcp:"):
        sock = _connect(uri, t0 + retry_s)
        mark("devstate-connected")
        try:
            qmp.execute_with_fd("getfd", sock.fileno(), fdname="migrator-devstate")
        finally:
            sock.close()
        qmp.execute("migrate", uri="fd:migrator-devstate")
    else:
        qmp.execute("migrate", uri=uri)
    mark("devstate-migrate-sent")
    status = wait_migration(qmp, since, retry_s + 30)
    mark("devstate-event")
    for ev in qmp.events[since:]:
        if ev.name == "MIGRATION":
            mark(f"src-qemu-{ev.data.get('status')}", ev.timestamp)
    info = qmp.execute("query-migrate")
    mark("devstate-done")
    if status != "completed":
        raise QmpError(f"QEMU could not send its device state to {uri}: {info.get('error-desc', status)}")
    return DeviceState(status, (time.monotonic() - t0) * 1000, int(info.get("ram", {}).get("transferred", 0)),
                       float(info.get("downtime", 0)), 1)


def _settled_state(qmp: QMP, wait_s: float = 2.0) -> str:
    """The source's run state once the end of a migration settled (finish-migrate -> postmigrate)."""
    deadline = time.monotonic() + wait_s
    while True:
        st = qmp.execute("query-status").get("status", "?")
        if st != "finish-migrate" or time.monotonic() > deadline:
            return st
        time.sleep(0.005)


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


async def migrate_vm(qmp_path: str, host: str, port: int, incoming_uri: str, *, key: bytes | None,
                     policy: MigrationPolicy | None = None, ssl_context=None,
                     progress: Callable[[RoundStats], None] | None = None) -> QemuMigrationReport:
    """Live-migrate the QEMU VM behind qmp_path: its RAM by pre-copy to the receiver at host:port,
    then its device state by QEMU (x-ignore-shared) to incoming_uri (e.g. tcp:HOST:PORT).

    On any failure the source VM runs on (`cont`) and the report says why.

    Raises:
        MigratorError: problems found before anything moved (no QMP, no shared RAM, ...).
    """
    policy = policy or MigrationPolicy()
    t0 = time.monotonic()
    timeline = Timeline()
    timeline.mark("qmp-start")
    qmp = await trio.to_thread.run_sync(lambda: QMP(qmp_path))
    timeline.mark("qmp-connected")
    try:
        if qmp.execute("query-status").get("status") != "running":
            raise MigratorError("the VM is not running (QMP query-status); start it or `cont` first")
        pid = qemu_pid(qmp)
        ram = find_guest_ram(pid, qmp)
        prepare_device_migration(qmp, policy.max_bandwidth)
        timeline.mark("qmp-prepared")
        pauser = QmpPauser(qmp)
        rep = QemuMigrationReport(memdev=ram.memdev, ram_size=ram.size, timeline=timeline)
        devices: list[DeviceState] = []

        async def device_state() -> None:
            # Every RAM page is at the destination and the VM is stopped: QEMU sends the device
            # state while the receiver verifies the RAM digests.  The destination VM is resumed
            # only if both succeed; if either fails, the controller resumes the source (`cont`
            # works from postmigrate too: QEMU re-activates the disks).
            devices.append(await trio.to_thread.run_sync(
                lambda: send_device_state(qmp, incoming_uri, timeline=timeline)))
            rep.device_state_done_at = time.time()

        target = MigrationTarget(pid, [ram.selector], pauser=pauser, alongside_verify=device_state)
        rep.ram = await migrate(target, host, port, key=key, policy=policy, ssl_context=ssl_context,
                                progress=progress)
        timeline.update(rep.ram.timeline)
        if pauser.stopped_at is not None:
            timeline.mark("src-qemu-STOP", pauser.stopped_at)
        rep.rounds = rep.ram.rounds
        rep.transferred_bytes = rep.ram.transferred_bytes
        rep.stopped_at = pauser.stopped_at
        if rep.ram.status != "completed":
            rep.status, rep.reason = rep.ram.status, rep.ram.reason
        else:
            dev = devices[0]
            rep.status = "completed"
            rep.device_state_ms = dev.duration_ms
            rep.device_state_bytes = dev.bytes
            rep.transferred_bytes += dev.bytes
            rep.downtime_ms = rep.ram.downtime_ms       # pause -> RAM verified and device state sent
        rep.source_state = await trio.to_thread.run_sync(_settled_state, qmp)
        timeline.mark("settled")
        rep.total_time_ms = (time.monotonic() - t0) * 1000
        return rep
    finally:
        qmp.close()
