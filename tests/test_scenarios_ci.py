"""CI outputs of `migrator scenario run`: --junit (read back with junitparser, a real JUnit
parser CI tools build on) and --summary (Markdown for a job page), from a real scenario run with
a baseline that the run must fail; and from hand-made report documents for the cases a healthy
machine does not produce (a crashed run, a skipped one, a failed expectation)."""

import json
import os
import subprocess
import sys

import pytest
from junitparser import Error, Failure, Skipped
from junitparser.xunit2 import JUnitXml      # (the Jenkins xunit schema: properties in test cases)

from migrator.scenarios import junit_xml, summary_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cases(path):
    xml = JUnitXml.fromfile(str(path))
    (suite,) = list(xml)
    return suite, {c.name: c for c in suite}


def _props(case):
    return {p.name: p.value for p in case.properties()}


@pytest.mark.slow
def test_junit_and_summary_from_a_real_run_with_a_regression(tmp_path):
    base = tmp_path / "baseline.json"
    base.write_text(json.dumps({"format": "migrator-scenario-baseline/1", "scenarios": {
        "idle": {"rounds": 2, "transferred_bytes": 1000, "pages": 20480, "status": "completed",
                 "downtime_ms": 1.0, "total_time_ms": 1.0}}}))
    junit, summary = tmp_path / "junit.xml", tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    p = subprocess.run([sys.executable, "-m", "migrator", "scenario", "run", os.path.join(ROOT, "scenarios", "idle.toml"),
                        "--repeat", "1", "--quiet", "--report", str(tmp_path / "rep"), "--baseline", str(base),
                        "--junit", str(junit), "--summary", str(summary), "--charts-url", "https://ci.example/rep/"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr          # the baseline gate fails
    assert "baseline: idle: transferred_bytes" in p.stdout
    suite, cases = _cases(junit)
    assert sorted(cases) == ["idle run 1", "idle transferred_bytes"]
    assert (suite.tests, suite.failures, suite.errors, suite.skipped) == (2, 1, 0, 0)
    run = cases["idle run 1"]
    assert run.is_passed and run.classname == "migrator.scenarios.idle"
    props = _props(run)
    assert props["status"] == "completed" and props["destination"] == "identical"
    assert float(props["downtime_ms"]) > 0 and int(props["rounds"]) >= 1
    reg = cases["idle transferred_bytes"]
    (f,) = reg.result
    assert isinstance(f, Failure)
    sent = json.loads((tmp_path / "rep" / "report.json").read_text())["scenarios"][0]["runs"][0]["report"]["transferred_bytes"]
    assert f.message.startswith(f"transferred_bytes: baseline 1000, now {sent}")
    assert _props(reg)["baseline"] == "1000" and _props(reg)["now"] == str(sent)
    md = summary.read_text()
    assert md.startswith("earlier step\n### migrator scenarios: FAILED")     # appended
    assert "| idle | 1 | pass | completed |" in md
    assert "- baseline: idle: transferred_bytes" in md
    assert "![idle run 1](https://ci.example/rep/charts/idle-r1.svg)" in md
    assert (tmp_path / "rep" / "charts" / "idle-r1.svg").exists()


def _doc(runs, baseline=None):
    return {"format": "migrator-scenario-report/1", "created": "2026-12-03T10:00:00+0000", "duration_s": 3.0,
            "host": {"kernel": "6.18", "cpus": 2, "python": "3.11"}, "passed": False,
            "scenarios": [{"name": "s", "file": "s.toml", "passed": False,
                           "failures": ["s: run 2: max_downtime_ms: 412 ms > 300 ms"], "runs": runs}],
            "baseline": baseline}


def _run(repeat, **kw):
    r = {"repeat": repeat, "passed": True, "error": "", "skipped": "", "wall_s": 1.5, "destination": "identical",
         "checks": [{"name": "converges", "ok": True, "message": "completed"}], "timeline": [],
         "report": {"status": "completed", "downtime_ms": 12.5, "rounds": 3, "total_time_ms": 900.0,
                    "transferred_bytes": 5_000_000, "tracker": "wp"}}
    r.update(kw)
    return r


def test_junit_of_failed_crashed_and_skipped_runs(tmp_path):
    runs = [_run(1),
            _run(2, passed=False, checks=[{"name": "max_downtime_ms", "ok": False, "message": "412 ms > 300 ms"},
                                          {"name": "converges", "ok": True, "message": "completed"}]),
            _run(3, passed=False, error="the guest exited: <boom> & \"quotes\"", report={}),
            _run(4, skipped="no QEMU on this machine", report={})]
    baseline = {"file": "b.json", "tolerance": 0.25, "passed": False, "notes": [],
                "failures": ["s: completed in the baseline, now failed"], "rows": []}
    path = tmp_path / "j.xml"
    path.write_text(junit_xml(_doc(runs, baseline)))
    suite, cases = _cases(path)
    assert (suite.tests, suite.failures, suite.errors, suite.skipped) == (5, 2, 1, 1)
    assert cases["s run 1"].is_passed
    (f,) = cases["s run 2"].result
    assert isinstance(f, Failure) and f.message == "max_downtime_ms: 412 ms > 300 ms"
    (e,) = cases["s run 3"].result
    assert isinstance(e, Error) and e.message == 'the guest exited: <boom> & "quotes"'
    (sk,) = cases["s run 4"].result
    assert isinstance(sk, Skipped) and sk.message == "no QEMU on this machine"
    (g,) = cases["s: completed in the baseline, now failed"].result
    assert isinstance(g, Failure)
    md = summary_markdown(_doc(runs, baseline))
    assert "1 of 4 run(s) of 1 scenario(s) passed, 1 skipped; baseline `b.json` **failed**" in md
    assert "| s | 4 | skipped | - |" in md
    assert "- s run 3: the guest exited" in md and "- baseline: s: completed in the baseline" in md
