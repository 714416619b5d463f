"""Running several scenarios (each repeated) one after the other, then the reports and the
baseline comparison."""

from __future__ import annotations

import os
import time
from collections.abc import Callable


from .baseline import DEFAULT_TOLERANCE, Comparison, compare, save_baseline
from .report import ScenarioOutcome, write_reports
from .runner import run_once
from .spec import Scenario


async def run_suite(scenarios: list[Scenario], report_dir: str, *, repeat: int | None = None,
                    baseline: str | None = None, tolerance: float = DEFAULT_TOLERANCE,
                    save_baseline_to: str | None = None, keep_images: bool = False,
                    log: Callable[[str], None] = lambda s: None,
                    progress: Callable[[str], None] | None = None) -> tuple[list[ScenarioOutcome], Comparison | None, dict]:
    """Run every scenario `repeat` times (default: its own `repeats`), write report.json,
    report.md and charts into report_dir.  Returns (outcomes, baseline comparison, JSON doc)."""
    started = time.time()
    outcomes = []
    for scn in scenarios:
        o = ScenarioOutcome(scn)
        n = repeat or scn.repeats
        for k in range(1, n + 1):
            log(f"== {scn.name}" + (f" (run {k} of {n})" if n > 1 else "") + f": {scn.description}")
            res = await run_once(scn, os.path.join(report_dir, "runs", f"{scn.name}-r{k}"), k, progress, keep_images)
            o.runs.append(res)
            log(run_line(scn, res))
            for c in res.checks:
                if not c.ok:
                    log(f"   FAILED {c.name}: {c.message}")
        outcomes.append(o)
    comparison = compare(baseline, outcomes, tolerance) if baseline else None
    doc = write_reports(report_dir, outcomes, comparison, started)
    if save_baseline_to:
        save_baseline(save_baseline_to, outcomes)
    return outcomes, comparison, doc


def run_line(scn: Scenario, res) -> str:
    """`name: PASS completed, 4 rounds, downtime 41.2 ms, 92.1 MB sent (1.10 x memory), 3.21 s`"""
    verdict = "PASS" if res.passed else "FAIL"
    if res.skipped:
        return f"{scn.name}: SKIP {res.skipped}"
    if res.methods:          # kind = "qemu": every method, a failed one with its reason
        return f"{scn.name}: {verdict} " + "; ".join(_method_line(m) for m in res.methods) + (
            f"; error: {res.error}" if res.error else "")
    if res.error:
        return f"{scn.name}: {verdict} error: {res.error}"
    r = res.report
    return (f"{scn.name}: {verdict} {r['status']}, {r['rounds']} rounds, "
            + (f"downtime {r['downtime_ms']:.1f} ms, " if r["status"] == "completed" else "")
            + f"{r['transferred_bytes'] / 1e6:.1f} MB sent ({r['transferred_bytes'] / res.memory_bytes:.2f} x memory), "
            f"{r['total_time_ms'] / 1000:.2f} s, destination {res.destination}"
            + (f", throttle {r['throttle_percent']} %" if r["throttle_percent"] else ""))


def _method_line(m: dict) -> str:
    """`migrator completed, total 294 ms, downtime 107.1 ms, 208.1 MB, 2 rounds, destination runs on, pattern ok`"""
    if m["status"] != "completed" or m["runs_on"] is None:
        return f"{m['method']} {m['status']}" + (f": {m['reason']}" if m["reason"] else "")
    return (f"{m['method']} completed, total {m['total_ms']:.0f} ms, downtime {m['downtime_ms']:.1f} ms, "
            f"{m['bytes_sent'] / 1e6:.1f} MB, {m['rounds']} rounds, destination "
            f"{'runs on' if m['runs_on'] else 'does NOT run on'}, pattern {'ok' if m['pattern_ok'] else 'BAD'}")
