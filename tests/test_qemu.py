"""migrator driving a real QEMU VM (TCG): RAM by migrator, device state by QEMU (x-ignore-shared).

The guest is the project's boot sector (migrator/qemu/testguest.py): it increments a byte in
every page of 1..100 MiB forever and writes 'B' to the serial port after each pass.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import require
from migration_helpers import ReceiverProcess
from waiting import wait_until
from migrator.qemu import QMP, GuestLayout, SourceVM, boot_sector, check_pattern, qemu_available
from migrator.qemu.testguest import write_boot_image
from migrator.qemu.vm import vm_args

HERE = os.path.dirname(os.path.abspath(__file__))
ASM = os.path.join(HERE, "..", "migrator", "qemu", "guest_src", "incr.asm")


# -- the test guest ---------------------------------------------------------------------------


def _assert_failed_at_device_state_and_source_runs(p, vm) -> None:
    """The migration got as far as the switch-over, failed on the device state, and the source
    VM was resumed and runs on."""
    assert p.returncode == 1, p.stderr
    rep = json.loads(p.stdout)
    assert rep["ram"]["final_dirty_pages"] > 0, rep
    assert rep["status"] == "failed" and "device state" in rep["reason"], rep
    assert rep["source_state"] == "running", rep
    assert _grows(vm.serial_path), "the source guest did not run on"

def test_boot_sector_is_the_nasm_source(tmp_path):
    require(shutil.which("nasm") is not None, "nasm not installed (apt-get install nasm)")
    out = tmp_path / "incr.bin"
    subprocess.run(["nasm", "-f", "bin", "-o", str(out), ASM], check=True)
    assert out.read_bytes() == boot_sector()


def test_boot_sector_layout():
    b = boot_sector(GuestLayout(start=2 << 20, end=3 << 20, marker=b"Z"))
    assert len(b) == 512 and b[-2:] == b"\x55\xaa"
    assert (2 << 20).to_bytes(4, "little") in b and (3 << 20).to_bytes(4, "little") in b
    with pytest.raises(ValueError):
        GuestLayout(start=4097)


def _ram(values: list[int], layout: GuestLayout) -> bytes:
    ram = bytearray(layout.end)
    for i, v in enumerate(values):
        ram[layout.start + i * 4096] = v
    return bytes(ram)


@pytest.mark.parametrize("values,ok", [
    (lambda n: [7] * n, True),                                  # a whole pass
    (lambda n: [8] * 10 + [7] * (n - 10), True),                # stopped after page 10
    (lambda n: [0] * 10 + [255] * (n - 10), True),              # wrapped
    (lambda n: [9] * 10 + [7] * (n - 10), False),               # two steps
    (lambda n: [8] * 10 + [7] * (n - 11) + [8], False),         # a second boundary
    (lambda n: [0] * n, True),
])
def test_check_pattern(values, ok):
    layout = GuestLayout(start=1 << 20, end=2 << 20)
    assert check_pattern(_ram(values(layout.pages), layout), layout).ok is ok


# -- the real VM ------------------------------------------------------------------------------

@pytest.fixture
def vm(tmp_path, root):
    require(qemu_available(), "qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
    boot = write_boot_image(str(tmp_path / "guest.img"))
    v = SourceVM(str(tmp_path), boot, 128 << 20)
    v.wait_serial(50)
    v.qmp.close()            # migrator takes the QMP socket (QEMU serves one client at a time)
    v.qmp = None
    yield v
    v.kill()


def _gone(pid: int) -> bool:
    """pid has ended (exited, or a zombie not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _grows(path: str, by: int = 20, wait_s: float = 10.0) -> bool:
    first = os.path.getsize(path)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if os.path.getsize(path) >= first + by:
            return True
        time.sleep(0.02)
    return False


def _migrate_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "migrator", "migrate", *args],
                          capture_output=True, text=True, timeout=120)


def _kill_dest_vm(receiver_log: str) -> int | None:
    """Kill the destination QEMU a receiver started (it outlives the receiver by design)."""
    m = re.search(r"destination VM pid (\d+)", receiver_log)
    if not m:
        return None
    try:
        os.kill(int(m.group(1)), 9)
    except ProcessLookupError:
        pass
    return int(m.group(1))


def _memfd_of(pid: int) -> bytes:
    """The guest RAM of a QEMU process (its memfd backend), read through map_files."""
    from migrator.kernel.maps import read_maps
    m = next(m for m in read_maps(pid) if m.path.startswith("/memfd:memory-backend-memfd"))
    with open(f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}", "rb") as f:
        return f.read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_qemu_vm_migrates_and_runs_on(vm, tmp_path):
    out = str(tmp_path / "out")
    dest_serial = str(tmp_path / "dest.serial")
    incoming = f"127.0.0.1:{_free_port()}"
    # the destination VM started before the migration (--qemu-ram-size), as the bench does
    receiver = ReceiverProcess(out, "--qemu-incoming", incoming, "--qemu-ram-size", "128M",
                               "--qemu-args", shlex.join(vm_args(vm.boot_image, dest_serial)))
    try:
        assert "started for 128 MiB of RAM" in receiver.text(), receiver.text()
        p = _migrate_cli("--qmp", vm.qmp_path, "--to", f"127.0.0.1:{receiver.port}",
                         "--qemu-incoming", incoming, "--max-bandwidth", "10GB/s", "--downtime-limit", "3000", "--json", "-")
        assert p.returncode == 0, p.stderr
        rep = json.loads(p.stdout)
        assert rep["status"] == "completed" and rep["ram"]["status"] == "completed"
        # write-protect on every mapper (QEMU, injected) and the ledger: exact for TCG's writes
        assert rep["ram"]["tracker"] == "wp-mappers+ledger"
        assert "injected into thread" in rep["ram"]["tracker_detail"], rep["ram"]["tracker_detail"]
        assert rep["source_state"] == "postmigrate"
        assert rep["memdev"] == "ram" and rep["ram_size"] == 128 << 20
        assert receiver.proc.wait(30) == 0, receiver.text()
        log = receiver.text()
        assert "destination VM running" in log, log
        resumed = float(log.split("resumed at ")[1].split(",")[0])
        assert rep["stopped_at"] < resumed < rep["stopped_at"] + 10
        # the guest runs on at the destination: markers keep coming
        assert _grows(dest_serial), "the destination guest wrote no markers"
        # the source's RAM where it stopped (it stays in postmigrate) has the guest's shape
        src_ram = _memfd_of(vm.pid)
        res = check_pattern(src_ram)
        assert res.ok, f"source: {res.message}"
        # the destination's RAM (the received image, mapped share=on) too
        with QMP(os.path.join(out, "qemu-dest.qmp")) as dq:
            dq.execute("stop")
            passes = os.path.getsize(dest_serial)
            with open(os.path.join(out, "qemu-ram.img"), "rb") as f:
                dest_ram = f.read()
            dq.execute("quit")
        res = check_pattern(dest_ram)
        assert res.ok, f"destination: {res.message}"
        # and it went on from where the source stopped (not a reboot): each pass completed at the
        # destination (one marker each, the first one finishing the interrupted pass) added one
        # to the first page's counter, the pass under way when it stopped maybe one more
        layout = GuestLayout()
        advanced = (dest_ram[layout.start] - src_ram[layout.start]) % 256
        assert (advanced - passes) % 256 in (255, 0, 1), (advanced, passes)
        # the source stays stopped (postmigrate): no marker after the migration
        size = os.path.getsize(vm.serial_path)
        time.sleep(0.2)               # (deliberate: "no marker within 0.2 s" is the check itself)
        assert os.path.getsize(vm.serial_path) == size
    finally:
        receiver.stop()
        _kill_dest_vm(receiver.text())


@pytest.mark.slow
def test_prestarted_destination_of_other_ram_size_is_refused(vm, tmp_path):
    """A destination started for 64 MiB (--qemu-ram-size) refuses the 128 MiB source's session
    at its set-up: the migration fails saying why, nothing was switched over, the source VM runs
    on, and the destination VM is stopped."""
    out = str(tmp_path / "out")
    incoming = f"127.0.0.1:{_free_port()}"
    receiver = ReceiverProcess(out, "--qemu-incoming", incoming, "--qemu-ram-size", "64M",
                               "--qemu-args", shlex.join(vm_args(vm.boot_image, str(tmp_path / "d.serial"))))
    try:
        pid = int(re.search(r"destination VM pid (\d+)", receiver.text()).group(1))
        p = _migrate_cli("--qmp", vm.qmp_path, "--to", f"127.0.0.1:{receiver.port}", "--qemu-incoming", incoming,
                         "--max-bandwidth", "10GB/s", "--json", "-")
        assert p.returncode != 0
        msg = "the source's RAM is 128 MiB, the destination QEMU was started for 64 MiB"
        assert msg in p.stdout + p.stderr and "Traceback" not in p.stderr, (p.stdout, p.stderr)
        with QMP(vm.qmp_path) as q:
            assert q.execute("query-status")["status"] == "running"
        assert _grows(vm.serial_path), "the source guest did not run on"
        assert receiver.proc.wait(30) == 1, receiver.text()
        assert msg in receiver.text()
        wait_until(lambda: _gone(pid), 5, "the destination QEMU to end after the refusal")
    finally:
        receiver.stop()
        _kill_dest_vm(receiver.text())


@pytest.mark.slow
def test_device_state_failure_resumes_the_source(vm, tmp_path):
    """The destination QEMU's address accepts and hangs up: QEMU's migrate fails after the RAM
    went through; the source VM must run on (`cont`)."""
    out = str(tmp_path / "out")
    receiver = ReceiverProcess(out, "--once")
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)

    def hang_up():
        while True:
            try:
                c, _ = lsock.accept()
            except OSError:
                return
            c.close()
    threading.Thread(target=hang_up, daemon=True).start()
    try:
        p = _migrate_cli("--qmp", vm.qmp_path, "--to", f"127.0.0.1:{receiver.port}", "--qemu-incoming",
                         f"127.0.0.1:{lsock.getsockname()[1]}", "--max-bandwidth", "10GB/s", "--downtime-limit", "3000", "--json", "-")
        _assert_failed_at_device_state_and_source_runs(p, vm)
    finally:
        lsock.close()
        receiver.stop()


@pytest.mark.slow
def test_qmp_user_errors(vm, tmp_path):
    p = _migrate_cli("--qmp", str(tmp_path / "nope.qmp"), "--to", "127.0.0.1:1", "--qemu-incoming", "127.0.0.1:2")
    assert p.returncode == 2 and "cannot connect to QMP socket" in p.stderr
    p = _migrate_cli("--qmp", vm.qmp_path, "--to", "127.0.0.1:1")
    assert p.returncode == 2 and "--qemu-incoming" in p.stderr
    p = _migrate_cli("--qmp", vm.qmp_path, "--pid", "1", "--to", "127.0.0.1:1", "--qemu-incoming", "127.0.0.1:2")
    assert p.returncode == 2 and "no --pid" in p.stderr
    # (the tests use a generous downtime limit: they check correctness, the bench checks speed,
    # and this guest rewrites all 100 MiB every millisecond)
    with QMP(vm.qmp_path) as q:          # QEMU serves one QMP client: a second one is told why
        p = _migrate_cli("--qmp", vm.qmp_path, "--to", "127.0.0.1:1", "--qemu-incoming", "127.0.0.1:2")
        assert p.returncode == 2 and "another one connected" in p.stderr
        assert q.execute("query-status")["status"] == "running"


@pytest.mark.slow
def test_receiver_stopped_kills_its_destination_vm(vm, tmp_path):
    """SIGTERM before the hand-over: the destination QEMU the receiver started must not linger."""
    out = str(tmp_path / "out")
    incoming = f"127.0.0.1:{_free_port()}"
    receiver = ReceiverProcess(out, "--qemu-incoming", incoming,
                               "--qemu-args", shlex.join(vm_args(vm.boot_image, str(tmp_path / "d.serial"))))
    mig = subprocess.Popen([sys.executable, "-m", "migrator", "migrate", "--qmp", vm.qmp_path, "--to",
                            f"127.0.0.1:{receiver.port}", "--qemu-incoming", incoming,
                            "--max-bandwidth", "20MB/s"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def started() -> re.Match | None:
            assert receiver.proc.poll() is None, receiver.text()
            return re.search(r"destination VM pid (\d+)", receiver.text())
        pid = int(wait_until(started, 20, "the receiver's 'destination VM pid' line").group(1))
        receiver.proc.terminate()
        receiver.proc.wait(20)
        wait_until(lambda: _gone(pid), 5, "the destination QEMU to end after the receiver stopped")
        assert mig.wait(60) == 1
        with QMP(vm.qmp_path) as q:
            assert q.execute("query-status")["status"] == "running"
    finally:
        if mig.poll() is None:
            mig.kill()
        receiver.stop()
        _kill_dest_vm(receiver.text())


@pytest.mark.slow
def test_destination_refusing_the_device_state_resumes_the_source(vm, tmp_path):
    """A destination started with other VM options (q35 instead of pc) fails to load the device
    state; with QEMU's return path the source learns it, and migrator resumes the source."""
    out = str(tmp_path / "out")
    incoming = f"127.0.0.1:{_free_port()}"
    args = [a.replace("pc", "q35") if a == "pc" else a for a in vm_args(vm.boot_image, str(tmp_path / "d.serial"))]
    receiver = ReceiverProcess(out, "--qemu-incoming", incoming, "--qemu-args", shlex.join(args))
    try:
        p = _migrate_cli("--qmp", vm.qmp_path, "--to", f"127.0.0.1:{receiver.port}", "--qemu-incoming", incoming,
                         "--max-bandwidth", "10GB/s", "--downtime-limit", "3000", "--json", "-")
        _assert_failed_at_device_state_and_source_runs(p, vm)
        assert receiver.proc.wait(30) == 1, receiver.text()
        assert "destination VM stopped" in receiver.text() or "incoming migration" in receiver.text()
    finally:
        receiver.stop()
        _kill_dest_vm(receiver.text())


@pytest.mark.slow
def test_private_guest_ram_is_refused(tmp_path, root):
    """A VM with plain `-m` (private RAM) cannot be handed over: migrator says why and the VM
    runs on untouched."""
    require(qemu_available(), "qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
    boot = write_boot_image(str(tmp_path / "guest.img"))
    qmp_path = str(tmp_path / "p.qmp")
    proc = subprocess.Popen(["qemu-system-x86_64", *vm_args(boot, str(tmp_path / "p.serial")), "-m", "64M",
                             "-qmp", f"unix:{qmp_path},server=on,wait=off"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        def listening() -> bool:
            assert proc.poll() is None, "QEMU exited"
            return os.path.exists(qmp_path)
        wait_until(listening, 20, "QEMU's QMP socket")
        p = _migrate_cli("--qmp", qmp_path, "--to", "127.0.0.1:1", "--qemu-incoming", "127.0.0.1:2")
        assert p.returncode == 2 and "is not share=on" in p.stderr, p.stderr
        with QMP(qmp_path) as q:
            assert q.execute("query-status")["status"] == "running"
            caps = {c["capability"]: c["state"] for c in q.execute("query-migrate-capabilities")}
            assert not caps["x-ignore-shared"]        # nothing was changed on a refused VM
    finally:
        proc.kill()
        proc.wait()


def test_device_state_connection_waits_for_the_destination():
    """The destination QEMU may start listening a moment after the RAM verified: the connection
    is retried while refused, and made with TCP_NODELAY (the return path's last small messages
    must not wait for delayed ACKs)."""
    from migrator.qemu.qmp import QmpError
    from migrator.qemu.source import _connect
    port = _free_port()
    lsock = socket.socket()

    def listen_later():
        time.sleep(0.2)               # (deliberate: the connection is refused until then, the test's point)
        lsock.bind(("127.0.0.1", port))
        lsock.listen(1)
    threading.Thread(target=listen_later, daemon=True).start()
    try:
        t0 = time.monotonic()
        s = _connect(f"tcp:127.0.0.1:{port}", time.monotonic() + 10)
        assert 0.15 < time.monotonic() - t0 < 5
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        s.close()
    finally:
        lsock.close()
    with pytest.raises(QmpError, match="refused"):
        _connect(f"tcp:127.0.0.1:{_free_port()}", time.monotonic() + 0.1)


@pytest.mark.slow
def test_resume_cancels_a_migration_waiting_before_its_device_state(vm):
    """The switch-over failed after QEMU's own migration started (it waits in pre-switchover,
    before its device state): resuming the source cancels that migration, then `cont` runs the
    VM on; nothing reached the destination but the set-up."""
    from migrator.qemu.source import DeviceStateMigration, QmpPauser, prepare_device_migration
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    received = []

    def drain():                  # a destination that takes everything and answers nothing
        c, _ = lsock.accept()
        while True:
            b = c.recv(1 << 16)
            if not b:
                break
            received.append(len(b))
        c.close()
    t = threading.Thread(target=drain, daemon=True)
    t.start()
    with QMP(vm.qmp_path) as q:
        prepare_device_migration(q, None)
        pauser = QmpPauser(q)
        ds = pauser.devstate = DeviceStateMigration(q, f"tcp:127.0.0.1:{lsock.getsockname()[1]}")
        pauser.pause()
        assert q.execute("query-status")["status"] == "paused"
        ds.start()
        wait_until(lambda: q.execute("query-migrate")["status"] == "pre-switchover", 10,
                   "QEMU's device-state migration to reach pre-switchover")
        pauser.resume()
        assert q.execute("query-migrate")["status"] == "cancelled"
        assert q.execute("query-status")["status"] == "running"
        assert not pauser.paused
    t.join(10)
    lsock.close()
    assert sum(received) > 0               # QEMU's set-up went out, then the stream ended
    assert _grows(vm.serial_path), "the source guest did not run on"


@pytest.mark.slow
def test_guardian_resumes_a_qemu_source_when_migrate_dies(vm):
    """migrate died (its QMP connection and its end of the guardian's pipe closed by the kernel)
    with the VM stopped and QEMU's own migration waiting before its device state: the guardian
    cancels that migration and runs the VM on, as migrate's own clean-up would (issue 19)."""
    from migrator.guardian import Guardian
    from migrator.qemu.source import DeviceStateMigration, QmpPauser, prepare_device_migration
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)

    def drain():
        c, _ = lsock.accept()
        while c.recv(1 << 16):
            pass
        c.close()
    t = threading.Thread(target=drain, daemon=True)
    t.start()
    q = QMP(vm.qmp_path)
    prepare_device_migration(q, None)
    pauser = QmpPauser(q)
    g = Guardian(pauser.resume_spec())
    g.start()
    assert g.problem is None
    g.arm()
    ds = pauser.devstate = DeviceStateMigration(q, f"tcp:127.0.0.1:{lsock.getsockname()[1]}")
    pauser.pause()
    ds.start()
    wait_until(lambda: q.execute("query-migrate")["status"] == "pre-switchover", 10,
               "QEMU's device-state migration to reach pre-switchover")
    q.close()                          # migrate dies: its QMP connection goes ...
    proc = g._proc
    proc.stdin.close()                 # ... and so does its end of the guardian's pipe
    assert proc.wait(timeout=30) == 0
    with QMP(vm.qmp_path) as q2:
        assert q2.execute("query-migrate")["status"] == "cancelled"
        assert q2.execute("query-status")["status"] == "running"
    t.join(10)
    lsock.close()
    assert _grows(vm.serial_path), "the source guest did not run on"
