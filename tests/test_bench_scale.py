"""`python -m migrator.bench scale` as a user runs it, at small sizes: real migrations of a guest
without a userfaultfd to a receiver on disk, each destination checked byte for byte."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_scale_small(root, tmp_path):
    out = tmp_path / "runs.json"
    p = subprocess.run([sys.executable, "-m", "migrator.bench", "scale", "--sizes", "16M,32M",
                        "--variants", "plain,vhost", "--out-dir", str(tmp_path), "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    runs = json.loads(out.read_text())
    assert [(r["variant"], r["size"]) for r in runs] == [
        ("plain", 16 << 20), ("plain", 32 << 20), ("vhost", 16 << 20), ("vhost", 32 << 20)]
    for r in runs:
        assert r["status"] == "completed" and r["destination"] == "identical", r
        assert r["tracker"] == "wp+wp-mappers+ledger" and r["channels"] == 2
    rows = [line for line in p.stdout.splitlines() if line.startswith(("plain ", "vhost "))]
    assert len(rows) == 4 and all(row.endswith("identical") for row in rows), p.stdout
    assert list(tmp_path.iterdir()) == [out]            # the receiver's folders are removed


def test_bench_scale_bad_variant():
    p = subprocess.run([sys.executable, "-m", "migrator.bench", "scale", "--variants", "nope"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "unknown variant(s) nope" in p.stdout
    p = subprocess.run([sys.executable, "-m", "migrator.bench", "scale", "--channels", "0"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--channels 0: must be 1..16" in p.stdout
