"""`python -m migrator.bench fuzz` as a user runs it, briefly: live `migrator receive` processes
hammered with mutated connections and sessions.  A short clean run (no crash, no hang, the
results file complete), then runs that must fail: a receiver SIGKILLed mid-run must be reported
as a crash (with the inputs saved), and one stopped with SIGSTOP as a hang.

The short run's seed is fixed (each worker's inputs are deterministic), and covers every family
of inputs: deeply nested msgpack values (their repr() in an error message once raised
RecursionError and stopped the receiver) and multi-channel sessions (ImageSet.close() once raced
with another channel's ImageSet.prepare(): a crash or a leaked thread)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow          # (each test runs the fuzzer against live receivers: 6-17 s)

FUZZ = [sys.executable, "-m", "migrator.bench", "fuzz"]


def _results(path) -> dict:
    return json.loads(path.read_text())


def test_fuzz_short_run(tmp_path):
    out = tmp_path / "fuzz.json"
    p = subprocess.run(FUZZ + ["--inputs", "3000", "--seed", "2", "--checkpoint", "1000",
                               "--warmup", "500", "--settle", "5", "--progress", "1",
                               # (RSS floats with garbage collection: a trend needs a long run)
                               "--rss-leak-mib", "4096",
                               "--json", str(out), "--findings-dir", str(tmp_path / "findings")],
                       capture_output=True, text=True, timeout=120)
    res = _results(out)
    assert res["crashes"] == [], p.stdout[-4000:]
    assert res["hangs"] == [] and res["stuck_connections"] == [], p.stdout[-4000:]
    assert res["unexpected"] == [] and res["leaks"] == [], p.stdout[-4000:]
    assert p.returncode == 0 and res["ok"] is True, p.stdout[-4000:] + p.stderr[-2000:]
    assert res["inputs"] >= 3000 and res["rate"] > 0 and res["seconds"] > 0
    assert set(res["targets"]) == {"no-key", "keyed"}
    for name, t in res["targets"].items():
        c = t["counts"]
        # both kinds of input reached each receiver: pre-auth connections and session frames
        assert c["conns"] > 0 and c.get("frames_valid", 0) > 0 and c["sessions"] > 0, (name, c)
        assert t["inputs"] == c["inputs"] > 0
        assert t["rss_kib"]["start"] > 0 and t["rss_kib"]["end"] > 0
        assert t["fds"]["before"] > 0 and t["fds"]["after"] <= t["fds"]["before"], t["fds"]
        assert t["threads"]["busy_after"] <= t["threads"]["busy_before"], t["threads"]
        assert t["checkpoints"] and all(cp["probe_ms"] < 5000 for cp in t["checkpoints"])
        assert t["errors_top"], "the receiver's refusals are counted"
    assert sum(t["inputs"] for t in res["targets"].values()) == res["inputs"]
    # progress lines while it runs, and the summary
    assert re.search(r"^\[\s*\d+ s\]\s+\d+ inputs \(", p.stdout, re.M), p.stdout[-2000:]
    assert "verdict: OK" in p.stdout


def _start(tmp_path, extra: list[str]) -> tuple[subprocess.Popen, int]:
    """A fuzz run in the background; returns it and its no-key receiver's pid, once fuzzing
    has visibly started (a progress line)."""
    p = subprocess.Popen(FUZZ + ["--mode", "no-key", "--seed", "2", "--no-triage", "--progress", "0.5",
                                 "--findings-dir", str(tmp_path / "findings"), "--settle", "2",
                                 "--json", str(tmp_path / "fuzz.json")] + extra,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pid = 0
    deadline = time.monotonic() + 60
    lines = []
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.match(r"receiver no-key \(generation 1\): pid (\d+)", line)
        if m:
            pid = int(m.group(1))
        if pid and line.startswith("["):
            return p, pid
    p.kill()
    raise AssertionError("the fuzz run did not start: " + "".join(lines))


def _finish(p: subprocess.Popen, timeout: float) -> str:
    out, _ = p.communicate(timeout=timeout)
    return out


def test_fuzz_reports_a_killed_receiver(tmp_path):
    """SIGKILL of the receiver mid-run: a crash, its recent inputs saved, the receiver restarted
    and the run carried on to its count; exit status 1."""
    p, pid = _start(tmp_path, ["--inputs", "3000", "--checkpoint", "1000", "--warmup", "500"])
    os.kill(pid, signal.SIGKILL)
    out = _finish(p, 120)
    res = _results(tmp_path / "fuzz.json")
    assert p.returncode == 1, out[-3000:]
    mine = [c for c in res["crashes"] if c["pid"] == pid]
    assert mine and mine[0]["signal"] == "SIGKILL" and mine[0]["target"] == "no-key", res["crashes"]
    assert f"CRASH (no-key, pid {pid}): signal SIGKILL" in out
    with open(mine[0]["inputs_file"]) as f:
        saved = [json.loads(line) for line in f]
    assert saved and all(r["kind"] in ("conn", "auth", "slow", "setup", "session") for r in saved)
    assert res["targets"]["no-key"]["generation"] >= 2        # restarted ...
    assert res["inputs"] >= 3000                               # ... and the run went on
    assert res["ok"] is False and "FINDINGS" in out


def test_fuzz_reports_a_stopped_receiver(tmp_path):
    """SIGSTOP: the receiver no longer answers; the checkpoint's probe migration must fail
    within 5 s and the run report a hang (and the connections left without an answer)."""
    p, pid = _start(tmp_path, ["--inputs", "2000", "--checkpoint", "1000", "--warmup", "1000",
                               "--io-timeout", "2"])
    os.kill(pid, signal.SIGSTOP)
    try:
        out = _finish(p, 120)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)     # (the fuzzer kills a hung receiver; in case not)
        except ProcessLookupError:
            pass
    res = _results(tmp_path / "fuzz.json")
    assert p.returncode == 1, out[-3000:]
    assert res["hangs"] and res["hangs"][0]["target"] == "no-key", out[-3000:]
    assert "HANG (no-key)" in out
    assert os.path.exists(res["hangs"][0]["inputs_file"])
