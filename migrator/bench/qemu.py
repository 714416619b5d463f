"""Migrate the same QEMU VM both ways, migrator-driven and QEMU's own, side by side.

The VM: QEMU (TCG) with RAM in a shared memfd, running the project's test guest, which
increments a byte in every page of 1..100 MiB forever.  Both migrations go over loopback with the
same downtime limit and the same link cap.

  qemu       QEMU's own pre-copy: `migrate` to a destination QEMU (-incoming defer), RAM included
  migrator   `migrator receive --qemu-incoming` in its own process (it starts the destination
             QEMU on the received image); migrate_vm(): migrator moves the RAM, QEMU (with
             x-ignore-shared) the device state

downtime is measured the same way for both: from the source's STOP event to the destination's
RESUME event (QEMU's own wall-clock stamps); total is from the start of the migration until the
destination runs.  QEMU's own downtime and total figures are shown as well.  Each run checks that
the destination keeps running and that its RAM holds the guest's pattern.
"""

from __future__ import annotations

import argparse
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
from dataclasses import asdict, dataclass

import trio

from ..errors import MigratorError
from ..precopy.controller import MigrationPolicy
from ..qemu.qmp import QMP
from ..qemu.source import migrate_vm, wait_migration
from ..qemu.testguest import GuestLayout, check_pattern, write_boot_image
from ..qemu.vm import BINARY, SourceVM, qemu_available, source_ram_args, vm_args
from ..units import parse_rate, parse_size


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
    pattern: str = ""
    detail: str = ""
    reason: str = ""
    timeline: dict | None = None       # step -> ms after the start (--timeline)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ram", default="128M", help="guest RAM size (default 128M)")
    p.add_argument("--downtime-limit", type=float, default=300.0, metavar="MS", help="both (default 300)")
    p.add_argument("--max-bandwidth", default="10GB/s", metavar="RATE",
                   help="link cap for both (default 10GB/s: loopback; QEMU's default 32 MiB/s never "
                        "converges with this guest)")
    p.add_argument("--runs", type=int, default=1, help="runs of each method (medians are shown)")
    p.add_argument("--channels", type=int, default=1, help="migrator TCP connections")
    p.add_argument("--methods", default="qemu,migrator", help="comma-separated: qemu, migrator")
    p.add_argument("--json", metavar="FILE", help="write all runs as JSON")
    p.add_argument("--out-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None, metavar="DIR",
                   help="where the receiver writes the RAM image the destination QEMU runs on "
                        "(default /dev/shm: tmpfs, no disk writeback under the VM)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--timeline", action="store_true",
                   help="print each run's steps (both sides, ms after the start of the migration)")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_running_on(serial: str, wait_s: float = 10.0) -> None:
    """The destination guest keeps writing markers."""
    first = os.path.getsize(serial) if os.path.exists(serial) else 0
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if os.path.exists(serial) and os.path.getsize(serial) > first + 10:
            return
        time.sleep(0.02)
    raise MigratorError(f"the destination guest wrote no marker to {serial}")


def _baseline_rate(vm: SourceVM, span_s: float = 0.3) -> float:
    """Guest passes/s before the migration (serial markers)."""
    a, t = vm.serial_size(), time.monotonic()
    time.sleep(span_s)
    return (vm.serial_size() - a) / (time.monotonic() - t)


def _check_dest_ram(qmp: QMP, image: str | None, pid: int | None, layout: GuestLayout) -> str:
    """Stop the destination and check its RAM pattern (image file, or its memfd through /proc)."""
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
    if not res.ok:
        raise MigratorError(f"destination RAM: {res.message}")
    return res.message


def run_qemu(work: str, boot: str, size: int, args, layout: GuestLayout) -> Run:
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
        q.execute("migrate-set-capabilities", capabilities=caps)
        q.execute("migrate-set-parameters", **{"downtime-limit": int(args.downtime_limit),
                                               "max-bandwidth": int(args.cap)})
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
            return Run("qemu", status, reason=info.get("error-desc", ""))
        stop = q.wait_event("STOP", 5, since=since).timestamp
        resume = dq.wait_event("RESUME", 10).timestamp
        ram = info.get("ram", {})
        stamps = {"start": t0, "src-qemu-STOP": stop, "dest-qemu-RESUME": resume}
        stamps.update({f"src-qemu-{e.data.get('status')}": e.timestamp for e in q.events[since:]
                       if e.name == "MIGRATION"})
        stamps.update({f"dest-qemu-{e.data.get('status')}": e.timestamp for e in dq.events
                       if e.name == "MIGRATION"})
        r = Run("qemu", "completed", total_ms=(resume - t0) * 1000, downtime_ms=(resume - stop) * 1000,
                reported_total_ms=info.get("total-time", 0), reported_downtime_ms=info.get("downtime", 0),
                bytes_sent=int(ram.get("transferred", 0)), rounds=int(ram.get("dirty-sync-count", 0)))
        r.guest_rate = (src.serial_size() - serial0) / max(stop - t0, 1e-6) / max(base, 1e-6)
        r.downtime_bytes = int(ram.get("downtime-bytes", 0))
        r.timeline = _relative(stamps, t0)
        _wait_running_on(dest_serial)
        r.pattern = _check_dest_ram(dq, None, dest.pid, layout)
        dq.close()
        return r
    finally:
        src.kill()
        if dest.poll() is None:
            dest.kill()
            dest.wait()


def run_migrator(work: str, boot: str, size: int, args, layout: GuestLayout) -> Run:
    src = SourceVM(work, boot, size, name="m-source")
    out = tempfile.mkdtemp(prefix="migrator-bench-qemu-img-", dir=args.out_dir)
    dest_serial = os.path.join(work, "m-dest.serial")
    incoming = f"127.0.0.1:{_free_port()}"
    log_path = os.path.join(work, f"m-receiver-{len(os.listdir(work))}.log")
    log = open(log_path, "w")
    recv = subprocess.Popen([sys.executable, "-m", "migrator", "receive", "--listen", "127.0.0.1:0",
                             "--out", out, "--qemu-incoming", incoming,
                             "--qemu-args", shlex.join(vm_args(boot, dest_serial))],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        port = 0
        while not port:
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", open(log_path).read())
            if m:
                port = int(m.group(1))
            elif recv.poll() is not None or time.monotonic() > deadline:
                raise MigratorError(f"receiver did not start: {open(log_path).read()}")
            else:
                time.sleep(0.01)
        src.wait_serial(100)
        src.qmp.close()          # QEMU serves one QMP client at a time
        src.qmp = None
        base = _baseline_rate(src)
        serial0 = src.serial_size()
        # QEMU never gives up on converging; give migrator's non-convergence check some slack too
        policy = MigrationPolicy(downtime_limit_ms=args.downtime_limit, max_bandwidth=args.cap,
                                 channels=args.channels, nonconvergence_rounds=10)
        t0 = time.time()
        rep = trio.run(lambda: migrate_vm(src.qmp_path, "127.0.0.1", port, f"tcp:{incoming}",
                                          key=None, policy=policy))
        if rep.status != "completed":
            return Run("migrator", rep.status, reason=rep.reason)
        recv.wait(30)
        text = open(log_path).read()
        m = re.search(r"resumed at ([0-9.]+)", text)
        if not m:
            raise MigratorError(f"destination did not resume: {text[-500:]}")
        resume = float(m.group(1))
        r = Run("migrator", "completed", total_ms=(resume - t0) * 1000,
                downtime_ms=(resume - rep.stopped_at) * 1000, reported_total_ms=rep.total_time_ms,
                reported_downtime_ms=rep.downtime_ms, bytes_sent=rep.transferred_bytes, rounds=rep.rounds)
        r.guest_rate = (src.serial_size() - serial0) / max(rep.stopped_at - t0, 1e-6) / max(base, 1e-6)
        states = re.search(r"incoming states, ms before the resume: (.*)", text)
        stamps = {"bench-start": t0, **rep.timeline}
        m = re.search(r"qemu: timeline (\{.*\})", text)
        if m:
            stamps.update(json.loads(m.group(1)))
        r.timeline = _relative(stamps, t0)
        fin = rep.ram.per_round[-1]
        r.downtime_bytes = fin.bytes + rep.device_state_bytes
        r.detail = (f"stop-and-copy {fin.pages_sent} pages: collect {fin.tracker_ms:.0f} ms, send "
                    f"{fin.duration_ms:.0f} ms, verify {rep.ram.verify_ms:.0f} ms; device state "
                    f"{rep.device_state_ms:.0f} ms; destination: {states.group(1) if states else '?'}; "
                    f"stop->verified {rep.ram.downtime_ms:.0f} ms")
        _wait_running_on(dest_serial)
        dq = QMP(os.path.join(out, "qemu-dest.qmp"))
        try:
            r.pattern = _check_dest_ram(dq, os.path.join(out, "000-memory-backend-memfd.img"), None, layout)
            dq.execute("quit")
        finally:
            dq.close()
        return r
    finally:
        src.kill()
        if recv.poll() is None:
            recv.kill()
            recv.wait()
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


def table(runs: list[Run]) -> str:
    rows = [("method", "runs", "total ms", "downtime ms", "reported total/downtime ms", "MB sent",
             "MB in downtime", "rounds", "guest speed")]
    for method in dict.fromkeys(r.method for r in runs):
        ok = [r for r in runs if r.method == method and r.status == "completed"]
        n = len([r for r in runs if r.method == method])
        if not ok:
            rows.append((method, f"0/{n}", "-", "-", "-", "-", "-", "-", "-"))
            continue
        rows.append((method, f"{len(ok)}/{n}", f"{_median(ok, 'total_ms'):.0f}",
                     f"{_median(ok, 'downtime_ms'):.1f}",
                     f"{_median(ok, 'reported_total_ms'):.0f} / {_median(ok, 'reported_downtime_ms'):.1f}",
                     f"{_median(ok, 'bytes_sent') / 1e6:.1f}", f"{_median(ok, 'downtime_bytes') / 1e6:.1f}",
                     f"{_median(ok, 'rounds'):.0f}",
                     f"{_median(ok, 'guest_rate') * 100:.0f} %"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if not qemu_available():
        print(f"{BINARY} not found: apt-get install qemu-system-x86", file=sys.stderr)
        return 2
    size = parse_size(args.ram)
    args.cap = parse_rate(args.max_bandwidth)
    layout = GuestLayout()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    runs: list[Run] = []
    work = tempfile.mkdtemp(prefix="migrator-bench-qemu-")
    boot = write_boot_image(os.path.join(work, "guest.img"), layout)
    print(f"VM: {size >> 20} MiB RAM, TCG, test guest dirtying {layout.pages} pages per pass; "
          f"downtime limit {args.downtime_limit:.0f} ms, cap {args.max_bandwidth}; work {work}",
          file=sys.stderr)
    for i in range(args.runs):
        for method in methods:
            fn = {"qemu": run_qemu, "migrator": run_migrator}[method]
            try:
                r = fn(work, boot, size, args, layout)
            except MigratorError as e:
                r = Run(method, "failed", reason=str(e))
            runs.append(r)
            print(f"run {i + 1} {method}: {r.status} total {r.total_ms:.0f} ms, downtime "
                  f"{r.downtime_ms:.1f} ms, {r.bytes_sent / 1e6:.1f} MB, {r.rounds} rounds"
                  + (f"; {r.reason}" if r.reason else f", guest speed {r.guest_rate * 100:.0f} %; "
                     f"dest RAM {r.pattern}" + (f"; {r.detail}" if r.detail else "")), file=sys.stderr)
            if args.timeline and r.timeline:
                print("  timeline (ms): " + ", ".join(f"{k} {v}" for k, v in r.timeline.items()),
                      file=sys.stderr)
    print(table(runs))
    print("total: migration start -> destination running; downtime: source STOP -> destination "
          "RESUME (QEMU's event stamps); reported: each tool's own figures (source side); "
          "rounds: QEMU dirty-sync-count / migrator rounds incl. stop-and-copy; guest speed: the "
          "guest's passes/s while migrating, relative to before")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in runs], f, indent=2)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.status == "completed" for r in runs) else 1
