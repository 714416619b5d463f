"""Running a `kind = "qemu"` scenario once: the same VM set-up (QEMU, TCG, the test guest)
migrated by each method the scenario compares, one fresh VM per method
(migrator/bench/qemu_compare.py, shared with `python -m migrator.bench qemu`).

The run's `report` is the migrator-driven run's (its RAM report, per round, with the VM-level
status, total, downtime, bytes and rounds on top), so the summary, the baseline and the
expectations read it like any other scenario's; `methods` holds every method's record for the
side-by-side table.  Without qemu-system-x86_64 the run is skipped with the reason (outside CI) or
fails (CI=true), as tests/conftest.py require() does.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict

import trio

from ..bench.qemu_compare import CompareSettings, Run, prepare, run_method
from ..qemu.vm import BINARY, qemu_available
from .expect import check_expectations
from .runner import RunResult
from .spec import Scenario

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
VM_FIELDS = ("status", "reason", "total_time_ms", "downtime_ms", "transferred_bytes", "rounds",
             "device_state_ms", "device_state_bytes", "source_state")


def method_json(r: Run) -> dict:
    """A Run as stored in the report (the migrator's full report is the run's `report`)."""
    d = asdict(r)
    d.pop("report")
    return d


def missing_qemu() -> tuple[str, str] | None:
    """(error, skipped) when QEMU is not installed: an error under CI=true, a skip otherwise."""
    if qemu_available():
        return None
    reason = f"{BINARY} not installed (apt-get install qemu-system-x86)"
    return (f"required under CI=true: {reason}", "") if IN_CI else ("", reason)


def report_of(r: Run) -> dict:
    """The migrator-driven run's report: its RAM report with the VM-level figures on top."""
    assert r.report is not None
    rep = dict(r.report["ram"])
    rep.update({k: r.report[k] for k in VM_FIELDS})
    return rep


async def run_qemu_once(scn: Scenario, run_dir: str, repeat: int = 1,
                        progress: Callable[[str], None] | None = None) -> RunResult:
    """Each method once on a fresh VM; never raises MigratorError (a problem is the `error`)."""
    assert scn.qemu is not None
    res = RunResult(scenario=scn.name, repeat=repeat, memory_bytes=scn.memory_bytes)
    t_wall = time.monotonic()
    os.makedirs(run_dir, exist_ok=True)
    missing = missing_qemu()
    if missing:
        res.error, res.skipped = missing
    else:
        settings = CompareSettings(downtime_limit_ms=scn.policy.downtime_limit_ms,
                                   max_bandwidth=scn.link.bandwidth, channels=scn.policy.channels,
                                   compress=scn.policy.compress)
        work = tempfile.mkdtemp(prefix="migrator-scn-qemu-")    # short paths: QMP unix sockets
        try:
            boot, layout = prepare(work)
            runs = []
            for method in scn.qemu.methods:
                r = await trio.to_thread.run_sync(run_method, method, work, boot, scn.qemu.ram, settings, layout)
                runs.append(r)
                if progress:
                    progress(f"{scn.name}: {r.line()}")
        finally:
            for f in glob.glob(os.path.join(work, "*.log")) + glob.glob(os.path.join(work, "*.serial")):
                shutil.copy(f, run_dir)
            shutil.rmtree(work, ignore_errors=True)
        res.methods = [method_json(r) for r in runs]
        mig = next(r for r in runs if r.method == "migrator")
        if mig.report is None:
            res.error = f"the migrator-driven run failed: {mig.reason}"
        else:
            res.report = report_of(mig)
            res.destination = ("not checked: migration " + mig.status if mig.status != "completed" else
                                ("runs on" if mig.runs_on else "does not run on") + f"; RAM {mig.pattern}")
    res.wall_s = time.monotonic() - t_wall
    res.checks = check_expectations(scn, res)
    return res
