"""Running several scenarios (each repeated) one after the other, then the reports and the
baseline comparison."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


@dataclass
class SuiteResult:
    """What scenarios.run() returns: the outcome of each scenario (its runs), the baseline
    comparison (None without a baseline), and the report document (report.json's contents)."""

    outcomes: list[ScenarioOutcome]
    comparison: Comparison | None
    report: dict

    @property
    def passed(self) -> bool:
        return self.report["passed"]

    def failures(self) -> list[str]:
        """One line per failed expectation or baseline gate."""
        out = [f for o in self.outcomes for f in o.failures()]
        out += [f"{o.scenario.name}: run {r.repeat}: {r.error}" for o in self.outcomes for r in o.runs if r.error]
        if self.comparison is not None:
            out += [f"baseline: {f}" for f in self.comparison.failures]
        return out


async def run(scenarios: Sequence["Scenario | str | os.PathLike"], report_dir: "str | os.PathLike", *,
              repeat: int | None = None, baseline: str | None = None,
              tolerance: float = DEFAULT_TOLERANCE, ci: bool = False,
              junit: "str | os.PathLike | None" = None, summary: "str | os.PathLike | None" = None,
              charts_url: str = "", keep_images: bool = False,
              log: Callable[[str], None] = lambda s: None,
              progress: Callable[[str], None] | None = None) -> SuiteResult:
    """Run scenarios (Scenario objects, or TOML files, folders or suite names as the CLI takes
    them) and write report.json, report.md and charts/ into report_dir; with junit / summary,
    also the JUnit XML and the Markdown job summary (ci.py).  ci: leave out scenarios marked
    `ci = false`.  baseline: a report.json or baseline file to gate counts against (tolerance:
    allowed growth, a fraction).  Returns a SuiteResult; failures do not raise.

    Raises:
        UsageError: a bad scenario file, two scenarios of one name, a bad baseline file."""
    from ..errors import UsageError
    from .spec import load_scenario, resolve

    paths = [x for x in scenarios if not isinstance(x, Scenario)]
    scns = [x for x in scenarios if isinstance(x, Scenario)]
    scns += [load_scenario(p) for p in resolve([os.fspath(p) for p in paths])] if paths else []
    seen: dict[str, str] = {}
    for sc in scns:
        if sc.name in seen:
            raise UsageError(f"two scenarios are named {sc.name!r}: {seen[sc.name]} and {sc.path}")
        seen[sc.name] = sc.path
    if baseline:
        from .baseline import load_baseline
        load_baseline(baseline)                     # a bad file fails now, not after the runs
    if ci:
        scns = [sc for sc in scns if sc.ci]
    outcomes, comparison, doc = await run_suite(
        scns, os.fspath(report_dir), repeat=repeat, baseline=baseline, tolerance=tolerance,
        keep_images=keep_images, log=log, progress=progress)
    write_ci_outputs(doc, junit=junit, summary=summary, charts_url=charts_url)
    return SuiteResult(outcomes, comparison, doc)


def write_ci_outputs(doc: dict, *, junit: "str | os.PathLike | None" = None,
                     summary: "str | os.PathLike | None" = None, charts_url: str = "") -> None:
    """Write the JUnit XML and the Markdown summary (ci.py) of a report document; summary is
    appended to (a CI job's summary file may have other steps' parts)."""
    from .ci import junit_xml, summary_markdown
    if junit:
        with open(junit, "w", encoding="utf-8") as f:
            f.write(junit_xml(doc))
    if summary:
        with open(summary, "a", encoding="utf-8") as f:
            f.write(summary_markdown(doc, charts_url))


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
