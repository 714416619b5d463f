"""Regression mode: compare a suite run with a stored one.

Counts (rounds, bytes sent, pages sent; medians across repeats) fail when they grow beyond a
tolerance (default 25 %; rounds may also always grow by one, a round being a coarse unit), and a
scenario that completed in the baseline must still complete.  Times (total, downtime) depend on
the machine and its load: they are reported beside the counts, never gated.

A baseline is either a report.json written by `migrator scenario run` or the smaller file written
by `--save-baseline` (only the medians).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
    from .report import ScenarioOutcome

BASELINE_FORMAT = "migrator-scenario-baseline/1"
GATED = ("rounds", "transferred_bytes", "pages")
REPORTED = ("total_time_ms", "downtime_ms")
DEFAULT_TOLERANCE = 0.25


@dataclass(frozen=True)
class Row:
    scenario: str
    metric: str
    baseline: float
    now: float
    verdict: str            # ok | better | WORSE | reported

    @property
    def change(self) -> float | None:
        return (self.now - self.baseline) / self.baseline if self.baseline else None

    def to_json(self) -> dict:
        c = self.change
        return {"scenario": self.scenario, "metric": self.metric, "baseline": self.baseline,
                "now": self.now, "change": round(c, 4) if c is not None else None, "verdict": self.verdict}


@dataclass
class Comparison:
    file: str
    tolerance: float
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict:
        return {"file": self.file, "tolerance": self.tolerance, "passed": self.passed,
                "failures": self.failures, "notes": self.notes, "rows": [r.to_json() for r in self.rows]}


def _entry(summary: dict, statuses: list[str]) -> dict:
    e = {m: summary[m]["median"] for m in (*GATED, *REPORTED) if m in summary}
    e["status"] = Counter(statuses).most_common(1)[0][0] if statuses else "error"
    return e


def load_baseline(path: str) -> dict[str, dict]:
    """{scenario name: {metric: median, ..., "status": most common status}}."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as e:
        raise UsageError(f"baseline {path!r}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"baseline {path!r}: not JSON: {e}") from None
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if fmt == BASELINE_FORMAT:
        return doc["scenarios"]
    if fmt == "migrator-scenario-report/1":
        return {s["name"]: _entry(s["summary"], s["statuses"]) for s in doc["scenarios"]}
    raise UsageError(f"baseline {path!r}: not a scenario report or baseline (format {fmt!r})")


def baseline_document(outcomes: list["ScenarioOutcome"]) -> dict:
    return {"format": BASELINE_FORMAT,
            "note": "medians across repeats; written by migrator scenario run --save-baseline",
            "scenarios": {o.scenario.name: _entry(o.summary(), [r.status for r in o.runs])
                          for o in outcomes if o.runs and not all(r.skipped for r in o.runs)}}


def save_baseline(path: str, outcomes: list["ScenarioOutcome"]) -> None:
    """Write the outcomes' medians (rounds, bytes, pages, times) and statuses as a baseline
    file for later runs' --baseline."""
    with open(path, "w") as f:
        json.dump(baseline_document(outcomes), f, indent=1, sort_keys=True)
        f.write("\n")


def _rounds_seen(o: "ScenarioOutcome") -> str:
    """What each run's rounds did (pages sent / ms, then the pause's pages and expected ms): a
    count that grew is a matter of timing or of tracking, and the CI log is often all there is."""
    seen = []
    for r in o.runs:
        rep = r.report
        rounds = rep.get("per_round") or []
        if rounds:
            seen.append(" ".join(f"{p['pages_sent']}/{p['duration_ms']:.0f}" for p in rounds)
                        + f" | pause {rep.get('final_dirty_pages', '?')} pages, expected "
                          f"{rep.get('expected_downtime_ms', 0):.0f} ms")
    return "; rounds (pages/ms): " + "; ".join(seen) if seen else ""


def compare(path: str, outcomes: list["ScenarioOutcome"], tolerance: float = DEFAULT_TOLERANCE) -> Comparison:
    """Each outcome against the baseline entry of the same name."""
    base = load_baseline(path)
    cmp = Comparison(file=path, tolerance=tolerance)
    for o in outcomes:
        name = o.scenario.name
        if o.runs and all(r.skipped for r in o.runs):
            cmp.notes.append(f"{name}: skipped ({o.runs[0].skipped}), not compared")
            continue
        if name not in base:
            cmp.notes.append(f"{name}: not in the baseline, not compared")
            continue
        tol = o.scenario.tolerance if o.scenario.tolerance is not None else tolerance
        b = base[name]
        now = _entry(o.summary(), [r.status for r in o.runs])
        if b.get("status") == "completed" and now["status"] != "completed":
            cmp.failures.append(f"{name}: completed in the baseline, now {now['status']}")
        for m in GATED:
            if m not in b or m not in now:
                continue
            allowed = b[m] * (1 + tol)
            if m == "rounds":
                allowed = max(allowed, b[m] + 1)
            if now[m] > allowed:
                verdict = "WORSE"
                cmp.failures.append(f"{name}: {m} {now[m]:g} > baseline {b[m]:g} + {tol * 100:g} % "
                                    f"(allowed {allowed:g}){_rounds_seen(o)}")
            else:
                verdict = "better" if now[m] < b[m] else "ok"
            cmp.rows.append(Row(name, m, b[m], now[m], verdict))
        for m in REPORTED:
            if m in b and m in now:
                cmp.rows.append(Row(name, m, b[m], now[m], "reported"))
    return cmp
