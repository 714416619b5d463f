"""`python -m migrator.bench faults` as a user runs it, short: real migrations through the
bench's proxy with one fault each (receiver SIGKILL, channel reset, guest SIGKILL, a flipped
byte, a full disk, migrate itself killed or told to stop), and the checks that gate its exit
status: no receiver crash, no complete manifest for a failed migration, every no-fault run
completed and verified, no source left paused, none resumed after its destination took over, no
guardian left behind, no fd or thread leak in the long-running receiver, no hang.  (The stalled link is left
to the soak: the transport takes 60 s to give up on it.)

The detectors themselves are checked too, so the gate cannot pass for want of looking."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from migrator.bench import faults
from waiting import wait_until

KINDS = ("receiver-kill", "rst", "guest-kill", "corrupt", "disk-full", "migrate-kill")


@pytest.mark.slow
def test_bench_faults_short(root, tmp_path):
    out = tmp_path / "faults.json"
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "migrator.bench", "faults", "--runs", str(1 + len(KINDS)),
                        "--seed", "11", "--faults", ",".join(KINDS), "--work-dir", str(tmp_path),
                        "--json", str(out)],
                       capture_output=True, text=True, timeout=240)
    took = time.monotonic() - t0
    assert out.exists(), p.stdout + p.stderr
    res = json.loads(out.read_text())
    runs = res["runs"]
    # the first run has no fault (the reference), then each kind once (a shuffled bag)
    assert [r["fault"] for r in runs][0] == "none"
    assert sorted(r["fault"] for r in runs[1:]) == sorted(KINDS)
    assert len(p.stdout.splitlines()) >= len(runs)          # one line per run, then the table
    for kind in ("none", *KINDS, "all"):
        assert f"\n{kind:<14}" in p.stdout, p.stdout
    # every run measured what the checks need
    for r in runs:
        assert r["receiver_session"] in ("ended", "none", "dead"), r
        assert r["fault"] == "receiver-kill" or r["receiver_counts"] or r.get("baseline"), r
    assert runs[0]["completed"] and runs[0]["verified"] and runs[0]["destination"] == "identical", runs[0]
    # the gate: all zero, exit status 0
    assert res["checks"] == {k: 0 for k in res["checks"]}, (res["checks"], [r["problems"] for r in runs])
    assert set(res["checks"]) >= {"receiver_crashes", "complete_manifests_for_failed_sessions",
                                  "no_fault_runs_not_verified", "sources_left_paused", "fd_leaks",
                                  "thread_leaks", "hangs", "sources_resumed_after_completion",
                                  "guardians_left", "view_holders_left"}
    assert res["ok"] and p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # the receiver's tmpfs is unmounted and the bench's folder removed
    assert list(tmp_path.iterdir()) == [out]
    with open("/proc/mounts") as f:
        assert str(tmp_path) not in f.read()
    print(f"{len(runs)} runs in {took:.0f} s")


def test_detectors_see_a_paused_source_a_leak_and_a_crash():
    # a process left stopped is seen (and one resumed is not)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(child.pid, signal.SIGSTOP)
        wait_until(lambda: faults.is_stopped(child.pid), 5, "the child to stop")
        assert faults.left_stopped([child.pid], recheck_s=0.05) == [child.pid]
        os.kill(child.pid, signal.SIGCONT)
        assert faults.left_stopped([child.pid], recheck_s=0.05) == []
        base = faults.process_counts(child.pid)
        assert base is not None and base.fds >= 3 and base.threads >= 1
    finally:
        child.kill()
        child.wait()
    assert faults.process_counts(child.pid) is None
    # one bad run fails the gate, whatever went wrong
    good = {"run": 2, "fault": "rst", "variant": "", "fired": True, "completed": False, "verified": False,
            "receiver_crash": False, "manifest_complete_on_failure": False, "source_left_paused": [],
            "fd_leak": False, "thread_leak": False, "hang": False, "receiver_hang": False,
            "status": "failed", "reason": "", "destination": "not checked", "migrate_s": 1.0,
            "migrate_traceback": False, "run_s": 1.0}
    assert faults.problems(good) == [] and not any(faults.checks([good]).values())
    for key, value in (("receiver_crash", True), ("manifest_complete_on_failure", True),
                       ("source_left_paused", [123]), ("fd_leak", True), ("thread_leak", True),
                       ("hang", True), ("receiver_hang", True)):
        bad = dict(good, **{key: value})
        assert faults.problems(bad), key
        assert any(faults.checks([good, bad]).values()), key
    unverified = dict(good, fault="none")
    assert faults.problems(unverified) and faults.checks([unverified])["no_fault_runs_not_verified"] == 1
