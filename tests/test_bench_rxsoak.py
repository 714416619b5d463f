"""`python -m migrator.bench rxsoak` as a user runs it, short: one `migrator receive` serving 30
sessions of real sender processes, a third of them SIGKILLed mid-session; the receiver survives,
its descriptors and threads come back, its memory stays bounded (issue 19)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow          # (a 30-session soak: ~25 s)


def test_receiver_soak_short(tmp_path):
    out = tmp_path / "rxsoak.json"
    p = subprocess.run([sys.executable, "-m", "migrator.bench", "rxsoak", "--sessions", "30",
                        "--abort", "0.33", "--seed", "3", "--progress", "10", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    res = json.loads(out.read_text())
    v = res["verdict"]
    assert p.returncode == 0 and v["ok"], p.stdout[-3000:] + p.stderr[-2000:]
    assert v["sessions"] == 30 and v["receiver_crashes"] == 0
    assert v["aborted"] >= 5 and v["completed"] >= 15, v
    # some killed senders were mid-session: the receiver failed those sessions and served on
    assert any(s["aborted"] and "FAILED" in s["verdict"] for s in res["sessions"]), res["sessions"]
    assert v["fds"]["last"] == v["fds"]["baseline"] and v["threads"]["last"] <= v["threads"]["baseline"]
    assert v["rss_mib"]["growth_after_10"] <= 16
    assert "verdict: OK" in p.stdout
