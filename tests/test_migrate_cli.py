"""`migrator migrate` from the command line, as a user runs it: key file, JSON report, errors."""

import json
import subprocess
import sys

import pytest

from child import Child
from migration_helpers import ReceiverProcess, assert_images_equal_source
from migrator.guest.launcher import start_guest
from migrator.guest.spec import GuestSpec
from migrator.guest.workloads import WorkloadSpec
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
        assert rep["status"] == "completed" and rep["tracker"] == "wp+ledger"
        assert all(ROUND_KEYS <= set(r) for r in rep["per_round"])
        assert process_state(g.pid) == "T"
        assert_images_equal_source(g, receiver.out_dir)


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


def test_cli_any_process_with_hash_tracking(keyed, tmp_path):
    """A process that does not cooperate (no userfaultfd): hash-based tracking, said in the report."""
    receiver, key = keyed
    c = Child("--shm-pages", "256", "--anon-pages", "64")
    try:
        a0, a1 = c.span("anon")
        p = migrate_cli("--pid", str(c.pid), "--region", "test-shm", "--region", f"{a0:x}-{a1:x}",
                        "--to", f"127.0.0.1:{receiver.port}", "--key-file", str(key), "--json", "-")
        assert p.returncode == 0, p.stderr
        rep = json.loads(p.stdout)
        assert rep["tracker"] == "hash+ledger"
        assert rep["status"] == "completed"

        class G:
            pid = c.pid
        assert_images_equal_source(G, receiver.out_dir)
    finally:
        c.kill()
