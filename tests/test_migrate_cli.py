"""`migrator migrate` from the command line, as a user runs it: key file, JSON report, errors."""

import json
import os
import subprocess
import sys

import pytest

from child import Child
from migration_helpers import ReceiverProcess, assert_images_equal_source
from waiting import wait_until
from migrator.guest.launcher import start_guest
from migrator.guest.spec import GuestSpec
from migrator.guest.workloads import WorkloadSpec
from migrator.kernel.maps import vma_smaps
from migrator.kernel.process import process_state
from migrator.transport import generate_key_file

REPORT_KEYS = {"status", "total_time_ms", "setup_time_ms", "downtime_ms", "expected_downtime_ms",
               "transferred_bytes", "remaining_bytes", "pages_normal", "pages_zero", "dirty_pages_rate",
               "rounds", "mbps", "throttle_percent", "tracker", "per_round"}
ROUND_KEYS = {"pages_dirtied", "pages_sent", "bytes", "duration_ms", "tracker_ms"}


def migrate_cli(*args):
    return subprocess.run([sys.executable, "-m", "migrator", "migrate", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def keyed(tmp_path, root):
    key = tmp_path / "key"
    generate_key_file(key)
    r = ReceiverProcess(str(tmp_path / "out"), "--key-file", str(key))
    yield r, key
    r.stop()


@pytest.mark.slow
def test_cli_migration_with_key_and_json_report(keyed, tmp_path):
    receiver, key = keyed
    spec = GuestSpec(shared_ram=16 << 20, anon_ram=4 << 20, uffd=True,
                     workload=WorkloadSpec(kind="random", rate=10e6))
    with start_guest(spec) as g:
        a = g.regions["anon"]
        p = migrate_cli("--pid", str(g.pid), "--region", "guest-ram", "--region", f"{a.start:x}-{a.end:x}",
                        "--to", f"127.0.0.1:{receiver.port}", "--key-file", str(key),
                        "--max-bandwidth", "200MB/s", "--json", str(tmp_path / "report.json"))
        assert p.returncode == 0, p.stderr
        assert "migration completed" in p.stderr
        rep = json.loads((tmp_path / "report.json").read_text())
        assert REPORT_KEYS <= set(rep)
        assert rep["status"] == "completed" and rep["tracker"] == "wp+wp-mappers+ledger"
        assert all(ROUND_KEYS <= set(r) for r in rep["per_round"])
        assert process_state(g.pid) == "T"
        assert_images_equal_source(g, receiver.out_dir)


@pytest.mark.slow
def test_cli_wrong_key_is_refused_and_guest_runs_on(keyed, tmp_path):
    receiver, _ = keyed
    wrong = tmp_path / "wrong"
    generate_key_file(wrong)
    with start_guest(GuestSpec(shared_ram=4 << 20, anon_ram=0, uffd=True)) as g:
        p = migrate_cli("--pid", str(g.pid), "--region", "guest-ram", "--to", f"127.0.0.1:{receiver.port}",
                        "--key-file", str(wrong))
        assert p.returncode != 0
        assert "Traceback" not in p.stderr
        assert "key" in p.stderr.lower() or "authentic" in p.stderr.lower(), p.stderr
        assert process_state(g.pid) != "T"


@pytest.mark.slow
def test_cli_user_mistakes_are_one_line(root):
    for args, msg in [
        (["--pid", "999999", "--region", "x", "--to", "127.0.0.1:1"], "process 999999 does not exist"),
        (["--pid", "1", "--region", "x", "--to", "nohostport"], "bad address 'nohostport'"),
        (["--pid", "1", "--region", "x", "--to", "127.0.0.1:1", "--max-bandwidth", "fast"], "bad rate 'fast'"),
        (["--pid", "1", "--region", "x", "--to", "127.0.0.1:1", "--key-file", "/nonexistent"], "key file '/nonexistent'"),
    ]:
        p = migrate_cli(*args)
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.startswith("migrator: error: ") and msg in p.stderr, p.stderr
        assert "Traceback" not in p.stderr


@pytest.mark.parametrize("inject", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_cli_any_process(keyed, tmp_path, inject):
    """A process that does not cooperate (no userfaultfd of its own): write-protect through a
    userfaultfd injected by ptrace, or with --no-inject hash-based tracking; the report says which
    and why, and the process holds no userfaultfd afterwards."""
    receiver, key = keyed
    c = Child("--shm-pages", "256", "--anon-pages", "64")
    try:
        a0, a1 = c.span("anon")
        p = migrate_cli("--pid", str(c.pid), "--region", "test-shm", "--region", f"{a0:x}-{a1:x}",
                        "--to", f"127.0.0.1:{receiver.port}", "--key-file", str(key), "--json", "-",
                        *([] if inject else ["--no-inject"]))
        assert p.returncode == 0, p.stderr
        rep = json.loads(p.stdout)
        if inject:
            assert rep["tracker"] == "wp+wp-mappers+ledger"
            assert rep["tracker_detail"].startswith(f"wp: anon@{a0:x} (injected into thread {c.pid} in ")
            assert f"wp-mappers: test-shm (pid {c.pid}: injected into thread {c.pid} in " in rep["tracker_detail"]
        else:
            assert rep["tracker"] == "hash+ledger"
            assert "injection is off (--no-inject)" in rep["tracker_detail"]
        assert rep["status"] == "completed"
        assert not [n for n in os.listdir(f"/proc/{c.pid}/fd")
                    if os.readlink(f"/proc/{c.pid}/fd/{n}") == "anon_inode:[userfaultfd]"]

        class G:
            pid = c.pid
        assert_images_equal_source(G, receiver.out_dir)
    finally:
        c.kill()


@pytest.mark.slow
def test_cli_killed_mid_migration_leaves_no_write_protection(keyed, tmp_path):
    """`migrator migrate` SIGKILLed while it tracks a non-cooperating guest by an injected
    userfaultfd: only migrator held that uffd, so the kernel releases it with migrator, and the
    guest's mappings are no longer registered (smaps VmFlags lose "uw"); the guest runs on."""
    import signal
    receiver, key = keyed
    spec = GuestSpec(shared_ram=64 << 20, anon_ram=16 << 20, uffd=False,
                     workload=WorkloadSpec(kind="random", rate=20e6))
    with start_guest(spec) as g:
        a = g.regions["anon"]
        p = subprocess.Popen([sys.executable, "-m", "migrator", "migrate", "--pid", str(g.pid),
                              "--region", "guest-ram", "--region", f"{a.start:x}-{a.end:x}",
                              "--to", f"127.0.0.1:{receiver.port}", "--key-file", str(key),
                              "--max-bandwidth", "20MB/s"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        def armed() -> bool:
            assert p.poll() is None, p.stderr.read()
            return "uw" in _vmflags(g.pid, a.start)
        wait_until(armed, 30, "migrate to write-protect the guest's anonymous region")
        p.send_signal(signal.SIGKILL)
        p.wait()
        wait_until(lambda: "uw" not in _vmflags(g.pid, a.start) + _vmflags(g.pid, g.regions["guest-ram"].start),
                   5, "the guest's mappings to lose their write-protect registration")
        assert process_state(g.pid) != "T"
        before = g.stats().writers["vcpu"].pages
        wait_until(lambda: g.stats().writers["vcpu"].pages > before, 10, "the guest to write on")


def _vmflags(pid: int, addr: int) -> list[str]:
    """VmFlags of the VMA at addr: "uw" marks a userfaultfd write-protect registration."""
    return vma_smaps(pid, addr).get("VmFlags", "").split()


@pytest.mark.slow
def test_receiver_stopped_by_sigterm_fails_the_session_and_says_why(keyed, tmp_path):
    """SIGTERM (a service manager stopping the receiver) mid-migration: the receiver stops
    within seconds with status 143, the session's manifest says "receiver shutting down" (before,
    the process just died and the manifest named no reason), the sender is told that reason,
    and the guest runs on."""
    import signal
    receiver, key = keyed
    spec = GuestSpec(shared_ram=64 << 20, anon_ram=0, uffd=True,
                     workload=WorkloadSpec(kind="random", rate=10e6))
    with start_guest(spec) as g:
        p = subprocess.Popen([sys.executable, "-m", "migrator", "migrate", "--pid", str(g.pid),
                              "--region", "guest-ram", "--to", f"127.0.0.1:{receiver.port}",
                              "--key-file", str(key), "--max-bandwidth", "10MB/s"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: "session" in receiver.text(), 30, "the migration's session to start")
        receiver.proc.send_signal(signal.SIGTERM)
        assert receiver.proc.wait(15) == 128 + signal.SIGTERM
        assert p.wait(60) == 1
        err = p.stderr.read()
        assert "receiver shutting down" in err and "Traceback" not in err, err
        m = json.loads((tmp_path / "out" / "manifest.json").read_text())
        assert m["complete"] is False and m["error"] == "receiver shutting down"
        assert "terminated: stopping" in receiver.text()
        assert "FAILED: receiver shutting down" in receiver.text()
        assert process_state(g.pid) != "T"
