"""The source is never left stopped by a migrate that dies or is told to stop (issue 19): real
processes, a real freezer cgroup, `migrator migrate` killed by each signal during its pause.

The guardian's half (migrator/guardian.py) is tested with migrate's end simulated: its pipe
closed without a word is exactly what the kernel does when migrate dies.  The QMP half is in
test_qemu.py (a real QEMU)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import require
from migration_helpers import ReceiverProcess, assert_images_equal_source, manifest
from migrator.guardian import Guardian, ResumeSpec
from migrator.guest.launcher import start_guest
from migrator.guest.spec import GuestSpec
from migrator.guest.workloads import WorkloadSpec
from migrator.kernel.process import process_state
from waiting import wait_until


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _wait_state(pid: int, want: str, timeout_s: float = 10.0) -> str:
    deadline = time.monotonic() + timeout_s
    while (st := process_state(pid)) != want and time.monotonic() < deadline:
        time.sleep(0.005)
    return st


def _stopped(p: subprocess.Popen) -> None:
    os.kill(p.pid, signal.SIGSTOP)
    assert _wait_state(p.pid, "T") == "T"


def _die(g: Guardian) -> int:
    """migrate dies: its end of the pipe closes without a word; the guardian's exit status."""
    proc = g._proc
    proc.stdin.close()
    return proc.wait(timeout=10)


def _guardians() -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "migrator/guardian.py" in cmd:
                out.append(f"{pid}: {cmd}")
    return out


def test_armed_guardian_resumes_every_process_when_migrate_dies():
    a, b = _sleeper(), _sleeper()
    try:
        g = Guardian(ResumeSpec((a.pid, b.pid)))
        g.start()
        assert g.problem is None
        g.arm()
        _stopped(a)
        _stopped(b)
        assert _die(g) == 0
        assert process_state(a.pid) in ("S", "R") and process_state(b.pid) in ("S", "R")
    finally:
        for p in (a, b):
            p.kill()
            p.wait()


def test_disarmed_guardian_never_resumes():
    """After the commit the destination may have taken over: a stopped source stays stopped,
    even if the pipe then ends without a word, and an ARM after the DISARM changes nothing."""
    a = _sleeper()
    try:
        g = Guardian(ResumeSpec((a.pid,)))
        g.start()
        g.arm()
        g.disarm()
        g.arm()
        _stopped(a)
        assert _die(g) == 0
        assert process_state(a.pid) == "T"
    finally:
        a.kill()
        a.wait()


def test_closed_guardian_exits_without_acting():
    a = _sleeper()
    try:
        g = Guardian(ResumeSpec((a.pid,)))
        g.start()
        pid = g.pid
        g.arm()
        _stopped(a)              # (migrate kept it paused on purpose, or resumed it itself)
        g.close()
        assert process_state(a.pid) == "T"
        assert not os.path.exists(f"/proc/{pid}") or process_state(pid) == "Z"
    finally:
        a.kill()
        a.wait()


def test_a_recycled_pid_is_never_signalled():
    """The guardian holds a pidfd of each process from its start: a process that exits is
    reported gone, never confused with a newcomer that got its number."""
    a = _sleeper()
    g = Guardian(ResumeSpec((a.pid,)))
    g.start()
    g.arm()
    a.kill()
    a.wait()
    proc = g._proc
    proc.stdin.close()
    assert proc.wait(timeout=10) == 0


def test_guardian_thaws_a_frozen_cgroup(tmp_path):
    freezer_root = "/sys/fs/cgroup/freezer"
    require(os.geteuid() == 0 and os.path.isdir(freezer_root), "needs root and the v1 freezer cgroup")
    cg = os.path.join(freezer_root, f"mg-guardian-{os.getpid()}")
    os.mkdir(cg)
    a = _sleeper()
    try:
        with open(os.path.join(cg, "cgroup.procs"), "w") as f:
            f.write(str(a.pid))
        g = Guardian(ResumeSpec(freezer=cg))
        g.start()
        g.arm()
        with open(os.path.join(cg, "freezer.state"), "w") as f:
            f.write("FROZEN")
        wait_until(lambda: open(os.path.join(cg, "freezer.state")).read().strip() == "FROZEN", 5,
                   "the cgroup to freeze")
        assert _die(g) == 0
        assert open(os.path.join(cg, "freezer.state")).read().strip() == "THAWED"
    finally:
        with open(os.path.join(cg, "freezer.state"), "w") as f:
            f.write("THAWED")
        a.kill()
        a.wait()
        os.rmdir(cg)


def test_a_guardian_that_cannot_start_is_reported_not_fatal(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    g = Guardian(ResumeSpec((os.getpid(),)))
    g.start()
    assert g.problem and "no guardian" in g.problem
    g.arm()
    g.disarm()
    g.close()                    # (all no-ops)


# -- `migrator migrate` during its pause, as a user (or systemd, or the OOM killer) stops it --

@pytest.fixture
def receiver(tmp_path, root):
    r = ReceiverProcess(str(tmp_path / "out"))
    yield r
    r.stop()


def _paused_migration(g, receiver, *extra: str) -> subprocess.Popen:
    """migrate of a guest with a side writer and a long stop-and-copy (128 MiB at 40 MB/s after
    the switch-over: ~3 s paused); returns once the guest is stopped by it."""
    p = subprocess.Popen([sys.executable, "-m", "migrator", "migrate", "--pid", str(g.pid),
                          "--region", "guest-ram", "--writers", ",".join(map(str, g.writer_pids.values())),
                          "--to", f"127.0.0.1:{receiver.port}", "--downtime-limit", "100000",
                          "--max-bandwidth", "40MB/s", *extra],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pids = (g.pid, *g.writer_pids.values())

    def paused() -> bool:
        assert p.poll() is None, p.stderr.read()
        return all(process_state(pid) == "T" for pid in pids)
    # the guest and its writers all stopped: the pause is complete, the stop-and-copy under way
    wait_until(paused, 60, "migrate to pause the guest and its writers")
    return p


GUEST = GuestSpec(shared_ram=128 << 20, anon_ram=0, workload=WorkloadSpec(kind="sweep", rate=400e6),
                  vhost=WorkloadSpec(kind="random", rate=5e6))


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM", "SIGHUP", "SIGINT"])
def test_migrate_stopped_during_the_pause_resumes_the_source(receiver, sig):
    with start_guest(GUEST) as g:
        p = _paused_migration(g, receiver)
        p.send_signal(getattr(signal, sig))
        _, err = p.communicate(timeout=60)
        if sig == "SIGKILL":
            assert p.returncode == -signal.SIGKILL
        else:   # the migration itself stops: its report says why, the exit status is 1
            assert p.returncode == 1, err
            assert f"migrator: {sig}: stopping the migration" in err
            assert f"migration failed: stopped by {sig}" in err and "source running" in err, err
            assert "Traceback" not in err
        for pid in (g.pid, *g.writer_pids.values()):
            assert _wait_state(pid, "S", 5) in "SR", f"process {pid} left stopped after {sig}"
        before = g.stats().writers["vcpu"].pages
        wait_until(lambda: g.stats().writers["vcpu"].pages > before, 10, f"the guest to run again after {sig}")
        assert manifest(receiver.out_dir)["complete"] is False
    assert _guardians() == []


@pytest.mark.slow
def test_completed_migration_keeps_the_source_paused_and_leaves_no_guardian(receiver):
    """On success the source stays paused (the destination has taken over): the guardian was
    disarmed before the commit and exits with migrate."""
    spec = GuestSpec(shared_ram=32 << 20, anon_ram=0, workload=WorkloadSpec(kind="random", rate=5e6),
                     vhost=WorkloadSpec(kind="random", rate=1e6))
    with start_guest(spec) as g:
        p = subprocess.run([sys.executable, "-m", "migrator", "migrate", "--pid", str(g.pid),
                            "--region", "guest-ram", "--writers", ",".join(map(str, g.writer_pids.values())),
                            "--to", f"127.0.0.1:{receiver.port}", "--verify", "memory"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        # the guardian exits with migrate: once gone, one that wrongly acted would have
        wait_until(lambda: not [c for c in _guardians() if f"--pid {g.pid} " in c + " "], 10,
                   "this migration's guardian to exit")
        for pid in (g.pid, *g.writer_pids.values()):
            assert process_state(pid) == "T"
        assert_images_equal_source(g, receiver.out_dir)
    assert _guardians() == []
