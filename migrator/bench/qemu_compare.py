"""One VM migrated both ways, migrator-driven and QEMU's own: the part shared by
`python -m migrator.bench qemu` and the scenario suite's `kind = "qemu"` scenarios.

The VM: QEMU (TCG) with RAM in a shared memfd, running the project's test guest, which
increments a byte in every page of 1..100 MiB forever.  Both migrations go over loopback with the
same downtime limit and the same link cap.

  qemu       QEMU's own pre-copy: `migrate` to a destination QEMU (-incoming defer), RAM included
  migrator   `migrator receive --qemu-incoming` in its own process (it starts the destination
             QEMU on the received image); migrate_vm(): migrator moves the RAM, QEMU (with
             x-ignore-shared) the device state

downtime is measured the same way for both: from the source's STOP event to the destination's
RESUME event (QEMU's own wall-clock stamps); total is from the start of the migration until the
destination runs.  QEMU's own downtime and total figures are kept as well.  After a completed
migration each run checks that the destination keeps running (`runs_on`) and that its RAM holds
the guest's pattern (`pattern_ok`).

    boot, layout = prepare(work)
    run = run_method("migrator", work, boot, 128 << 20, CompareSettings(max_bandwidth=10e9), layout)
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import trio

from ..errors import MigratorError
from ..precopy.controller import MigrationPolicy
from ..qemu.qmp import QMP
from ..receiver_process import wait_port_file
from ..transport.delta import auto_cache_bytes
from ..qemu.source import migrate_vm, wait_migration
from ..qemu.testguest import GuestLayout, check_pattern, write_boot_image
from ..qemu.vm import BINARY, SourceVM, source_ram_args, vm_args

# migrator: its default switch-over rule ("converge": at a round's end, the shortest pause);
# migrator-fits: QEMU's rule ("fits": as soon as the rest is sure to fit the limit);
# migrator-noinject (on request only): the default, with no userfaultfd injected into QEMU (the
# ledger alone tracks its RAM), for A/B runs of the injected write-protect's cost
METHODS = ("qemu", "migrator", "migrator-fits")
EXTRA_METHODS = ("migrator-noinject", "qemu-xbzrle")
DEFAULT_OUT_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None


@dataclass(frozen=True)
class CompareSettings:
    """What both methods share: the downtime limit and the link cap (bytes/s); for migrator its
    TCP connections and where the receiver writes the image the destination runs on (tmpfs:
    no disk writeback under the VM)."""

    downtime_limit_ms: float = 300.0
    max_bandwidth: float = 10e9
    channels: int = 1
    out_dir: str | None = DEFAULT_OUT_DIR
    # migrator's --compress; none by default: QEMU's own migration (without multifd
    # compression) sends pages raw, so the comparison is like for like
    compress: str = "none"


@dataclass
class Run:
    method: str
    status: str
    total_ms: float = 0.0              # migration start -> destination running
    downtime_ms: float = 0.0           # source STOP -> destination RESUME
    reported_total_ms: float = 0.0     # the tool's own figure
    reported_downtime_ms: float = 0.0
    bytes_sent: int = 0
    rounds: int = 0
    downtime_bytes: int = 0            # sent while the VM was stopped
    guest_rate: float = 0.0            # guest passes/s while migrating, relative to before (1.0 = unslowed)
    runs_on: bool | None = None        # the destination guest kept writing markers (None: not checked)
    pattern_ok: bool | None = None     # the destination RAM holds the guest's pattern (None: not checked)
    pattern: str = ""
    detail: str = ""
    reason: str = ""
    timeline: dict | None = None       # step -> ms after the start
    report: dict | None = None         # migrator: QemuMigrationReport.to_json()
    tracker: str = ""                  # how written pages were found (migrator: its tracker and
                                       # how many times the ledger swept)

    @property
    def ok(self) -> bool:
        """Completed, and the destination runs on with the guest's RAM pattern."""
        return self.status == "completed" and bool(self.runs_on) and bool(self.pattern_ok)

    def line(self) -> str:
        """One line: status, figures, the destination checks (or why it failed)."""
        s = (f"{self.method}: {self.status} total {self.total_ms:.0f} ms, downtime {self.downtime_ms:.1f} ms, "
             f"{self.bytes_sent / 1e6:.1f} MB, {self.rounds} rounds")
        if self.reason:
            return f"{s}; {self.reason}"
        return (s + f", guest speed {self.guest_rate * 100:.0f} %; dest RAM {self.pattern}"
                + (f"; {self.detail}" if self.detail else ""))


def prepare(work: str, layout: GuestLayout | None = None) -> tuple[str, GuestLayout]:
    """The test guest's boot disk in work: (its path, its layout)."""
    layout = layout or GuestLayout()
    return write_boot_image(os.path.join(work, "guest.img"), layout), layout


def run_method(method: str, work: str, boot: str, size: int, settings: CompareSettings,
               layout: GuestLayout) -> Run:
    """One migration of a fresh VM (size bytes of RAM) by `method` (one of METHODS).  Never
    raises MigratorError: a problem is a Run with status "failed" and its reason."""
    try:
        if method in ("qemu", "qemu-xbzrle"):
            return run_qemu(work, boot, size, settings, layout, xbzrle=method == "qemu-xbzrle")
        return run_migrator(work, boot, size, settings, layout,
                            switchover="fits" if method == "migrator-fits" else "converge",
                            inject=method != "migrator-noinject")
    except MigratorError as e:
        return Run(method, "failed", reason=str(e))


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _runs_on(serial: str, wait_s: float = 10.0) -> bool:
    """The destination guest keeps writing markers."""
    first = os.path.getsize(serial) if os.path.exists(serial) else 0
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if os.path.exists(serial) and os.path.getsize(serial) > first + 10:
            return True
        time.sleep(0.02)
    return False


def _baseline_rate(vm: SourceVM, span_s: float = 0.3) -> float:
    """Guest passes/s before the migration (serial markers)."""
    a, t = vm.serial_size(), time.monotonic()
    time.sleep(span_s)
    return (vm.serial_size() - a) / (time.monotonic() - t)


def _check_destination(r: Run, serial: str, qmp: QMP, image: str | None, pid: int | None,
                       layout: GuestLayout) -> None:
    """Does the destination run on (serial markers)?  Then stop it and check its RAM pattern
    (image file, or its memfd through /proc)."""
    r.runs_on = _runs_on(serial)
    qmp.execute("stop")
    if image:
        with open(image, "rb") as f:
            ram = f.read()
    else:
        from ..kernel.maps import read_maps
        m = next(m for m in read_maps(pid) if m.path.startswith("/memfd:memory-backend-memfd"))
        with open(f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}", "rb") as f:
            ram = f.read()
    res = check_pattern(ram, layout)
    r.pattern_ok, r.pattern = res.ok, res.message
    if not r.runs_on:
        r.pattern += f"; the destination guest wrote no marker to {serial}"


def run_qemu(work: str, boot: str, size: int, settings: CompareSettings, layout: GuestLayout,
             xbzrle: bool = False) -> Run:
    """QEMU's own migration; xbzrle: with its XBZRLE (pages sent again as deltas against a
    cache of them; the cache sized as migrator's default delta cache, transport/delta.py)."""
    name = "qemu-xbzrle" if xbzrle else "qemu"
    src = SourceVM(work, boot, size, name="q-source")
    dest_serial = os.path.join(work, "q-dest.serial")
    dest_qmp_path = os.path.join(work, "q-dest.qmp")
    port = _free_port()
    dest = subprocess.Popen([BINARY, *vm_args(boot, dest_serial), *source_ram_args(size),
                             "-qmp", f"unix:{dest_qmp_path},server=on,wait=off", "-incoming", "defer"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        src.wait_serial(100)
        dq = QMP(dest_qmp_path, connect_wait_s=20)
        caps = [{"capability": "events", "state": True}]
        dq.execute("migrate-set-capabilities", capabilities=caps)
        dq.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        q = src.qmp
        if xbzrle:
            dq.execute("migrate-set-capabilities", capabilities=[{"capability": "xbzrle", "state": True}])
            q.execute("migrate-set-capabilities", capabilities=caps + [{"capability": "xbzrle", "state": True}])
            q.execute("migrate-set-parameters", **{"xbzrle-cache-size": auto_cache_bytes(size)})
        else:
            q.execute("migrate-set-capabilities", capabilities=caps)
        q.execute("migrate-set-parameters", **{"downtime-limit": int(settings.downtime_limit_ms),
                                               "max-bandwidth": int(settings.max_bandwidth)})
        base = _baseline_rate(src)
        t0 = time.time()
        serial0 = src.serial_size()
        since = len(q.events)
        q.execute("migrate", uri=f"tcp:127.0.0.1:{port}")
        status = wait_migration(q, since, 60)
        info = q.execute("query-migrate")
        deadline = time.monotonic() + 2
        while status == "completed" and not info.get("total-time") and time.monotonic() < deadline:
            time.sleep(0.005)      # QEMU fills the figures in just after the event
            info = q.execute("query-migrate")
        if status != "completed":
            return Run(name, status, reason=info.get("error-desc", ""))
        stop = q.wait_event("STOP", 5, since=since).timestamp
        resume = dq.wait_event("RESUME", 10).timestamp
        ram = info.get("ram", {})
        stamps = {"start": t0, "src-qemu-STOP": stop, "dest-qemu-RESUME": resume}
        stamps.update({f"src-qemu-{e.data.get('status')}": e.timestamp for e in q.events[since:]
                       if e.name == "MIGRATION"})
        stamps.update({f"dest-qemu-{e.data.get('status')}": e.timestamp for e in dq.events
                       if e.name == "MIGRATION"})
        r = Run(name, "completed", total_ms=(resume - t0) * 1000, downtime_ms=(resume - stop) * 1000,
                reported_total_ms=info.get("total-time", 0), reported_downtime_ms=info.get("downtime", 0),
                bytes_sent=int(ram.get("transferred", 0)), rounds=int(ram.get("dirty-sync-count", 0)))
        r.guest_rate = (src.serial_size() - serial0) / max(stop - t0, 1e-6) / max(base, 1e-6)
        r.downtime_bytes = int(ram.get("downtime-bytes", 0))
        r.timeline = _relative(stamps, t0)
        _check_destination(r, dest_serial, dq, None, dest.pid, layout)
        dq.close()
        return r
    finally:
        src.kill()
        _end(dest)


def run_migrator(work: str, boot: str, size: int, settings: CompareSettings, layout: GuestLayout,
                 switchover: str = "converge", inject: bool = True) -> Run:
    name = ("migrator" if switchover == "converge" else f"migrator-{switchover}") + ("" if inject else "-noinject")
    src = SourceVM(work, boot, size, name="m-source")
    out = tempfile.mkdtemp(prefix="migrator-qemu-img-", dir=settings.out_dir)
    dest_serial = os.path.join(work, "m-dest.serial")
    incoming = f"127.0.0.1:{_free_port()}"
    log_path = os.path.join(work, f"m-receiver-{len(os.listdir(work))}.log")
    log = open(log_path, "w")
    # the destination QEMU starts before the clock, as QEMU's own method's does (--qemu-ram-size)
    recv = subprocess.Popen([sys.executable, "-m", "migrator", "receive", "--listen", "127.0.0.1:0",
                             "--out", out, "--port-file", log_path + ".port",
                             "--qemu-incoming", incoming, "--qemu-ram-size", f"{size >> 20}M",
                             "--qemu-args", shlex.join(vm_args(boot, dest_serial))],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        port = wait_port_file(log_path + ".port", recv, 20, lambda: open(log_path).read())
        src.wait_serial(100)
        src.qmp.close()          # QEMU serves one QMP client at a time
        src.qmp = None
        base = _baseline_rate(src)
        serial0 = src.serial_size()
        # QEMU never gives up on converging; give migrator's non-convergence check some slack too
        policy = MigrationPolicy(downtime_limit_ms=settings.downtime_limit_ms,
                                 max_bandwidth=settings.max_bandwidth, channels=settings.channels,
                                 nonconvergence_rounds=10, switchover=switchover, inject=inject,
                                 compress=settings.compress)
        t0 = time.time()
        rep = trio.run(lambda: migrate_vm(src.qmp_path, "127.0.0.1", port, f"tcp:{incoming}",
                                          key=None, policy=policy))
        if rep.status != "completed":
            return Run(name, rep.status, reason=rep.reason, report=rep.to_json())
        recv.wait(30)
        text = open(log_path).read()
        m = re.search(r"resumed at ([0-9.]+)", text)
        if not m:
            raise MigratorError(f"destination did not resume: {text[-500:]}")
        resume = float(m.group(1))
        r = Run(name, "completed", total_ms=(resume - t0) * 1000,
                downtime_ms=(resume - rep.stopped_at) * 1000, reported_total_ms=rep.total_time_ms,
                reported_downtime_ms=rep.downtime_ms, bytes_sent=rep.transferred_bytes, rounds=rep.rounds,
                report=rep.to_json())
        r.guest_rate = (src.serial_size() - serial0) / max(rep.stopped_at - t0, 1e-6) / max(base, 1e-6)
        states = re.search(r"incoming states, ms before the resume: (.*)", text)
        stamps = {"bench-start": t0, **rep.timeline}
        m = re.search(r"qemu: timeline (\{.*\})", text)
        if m:
            stamps.update(json.loads(m.group(1)))
        r.timeline = _relative(stamps, t0)
        r.tracker = f"{rep.ram.tracker}, {len(rep.ram.sweeps)} sweeps"
        fin = rep.ram.per_round[-1]
        r.downtime_bytes = fin.bytes + rep.device_state_bytes
        r.detail = (f"stop-and-copy {fin.pages_sent} pages: collect {fin.tracker_ms:.0f} ms, send "
                    f"{fin.duration_ms:.0f} ms, verify {rep.ram.verify_ms:.0f} ms; device state "
                    f"{rep.device_state_ms:.0f} ms; destination: {states.group(1) if states else '?'}; "
                    f"stop->verified {rep.ram.downtime_ms:.0f} ms")
        dq = QMP(os.path.join(out, "qemu-dest.qmp"))
        try:
            _check_destination(r, dest_serial, dq, os.path.join(out, "qemu-ram.img"), None,
                               layout)
            dq.execute("quit")
        finally:
            dq.close()
        return r
    finally:
        src.kill()
        _end(recv)
        log.close()
        shutil.rmtree(out, ignore_errors=True)
        m = re.search(r"destination VM pid (\d+)", open(log_path).read())
        if m:      # the destination QEMU this run started (it outlives the receiver)
            try:
                os.kill(int(m.group(1)), 9)
            except ProcessLookupError:
                pass


def _relative(stamps: dict[str, float], t0: float) -> dict[str, float]:
    return {k: round((v - t0) * 1000, 1) for k, v in sorted(stamps.items(), key=lambda kv: kv[1])}


def _median(runs: list[Run], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


TABLE_NOTE = ("total: migration start -> destination running; downtime: source STOP -> destination "
              "RESUME (QEMU's event stamps); reported: each tool's own figures (source side); "
              "rounds: QEMU dirty-sync-count / migrator rounds incl. stop-and-copy; guest speed: the "
              "guest's passes/s while migrating, relative to before")


def table_rows(runs: list[Run]) -> list[tuple[str, ...]]:
    """Header, then one row per method (medians of its good runs; `0/N` and dashes if none)."""
    rows = [("method", "tracker", "runs", "total ms", "downtime ms", "reported total/downtime ms", "MB sent",
             "MB in downtime", "rounds", "guest speed")]
    for method in dict.fromkeys(r.method for r in runs):
        ok = [r for r in runs if r.method == method and r.ok]
        n = len([r for r in runs if r.method == method])
        trackers = ", ".join(sorted({r.tracker or "QEMU's dirty log" for r in ok})) if ok else "-"
        if not ok:
            rows.append((method, trackers, f"0/{n}", "-", "-", "-", "-", "-", "-", "-"))
            continue
        rows.append((method, trackers, f"{len(ok)}/{n}", f"{_median(ok, 'total_ms'):.0f}",
                     f"{_median(ok, 'downtime_ms'):.1f}",
                     f"{_median(ok, 'reported_total_ms'):.0f} / {_median(ok, 'reported_downtime_ms'):.1f}",
                     f"{_median(ok, 'bytes_sent') / 1e6:.1f}", f"{_median(ok, 'downtime_bytes') / 1e6:.1f}",
                     f"{_median(ok, 'rounds'):.0f}",
                     f"{_median(ok, 'guest_rate') * 100:.0f} %"))
    return rows


def table(runs: list[Run]) -> str:
    """The side-by-side table as aligned text."""
    rows = table_rows(runs)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(runs: list[Run]) -> list[str]:
    """The side-by-side table as Markdown lines."""
    rows = table_rows(runs)
    return (["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
            + ["| " + " | ".join(r) + " |" for r in rows[1:]])
