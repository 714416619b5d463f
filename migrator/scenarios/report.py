"""Reports of a suite run: report.json (everything, machine-readable; also usable as a baseline),
report.md (a summary table, then per scenario min/median/max across repeats and a table per
round of each run) and one convergence chart per run (charts/NAME-rN.svg)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field

from .baseline import Comparison
from ..bench.qemu_compare import TABLE_NOTE, Run, markdown_table, table_rows
from .chart import convergence_svg
from .runner import PAGE_SIZE, RunResult
from .spec import Scenario

FORMAT = "migrator-scenario-report/1"
# metrics summarised across repeats: name -> how to get it from a run's report
METRICS = {
    "total_time_ms": lambda r, m: r["total_time_ms"],
    "downtime_ms": lambda r, m: r["downtime_ms"],
    "expected_downtime_ms": lambda r, m: r["expected_downtime_ms"],
    "setup_time_ms": lambda r, m: r["setup_time_ms"],
    "rounds": lambda r, m: r["rounds"],
    "transferred_bytes": lambda r, m: r["transferred_bytes"],
    "pages": lambda r, m: r["pages_normal"] + r["pages_zero"],
    "final_dirty_pages": lambda r, m: r["final_dirty_pages"],
    "throttle_percent": lambda r, m: r["throttle_percent"],
    "bytes_ratio": lambda r, m: r["transferred_bytes"] / m if m else 0.0,
}


@dataclass
class ScenarioOutcome:
    scenario: Scenario
    runs: list[RunResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.runs) and all(r.passed for r in self.runs)

    def failures(self) -> list[str]:
        """One line per failed expectation: `NAME: run K: CHECK: message`."""
        out = []
        for r in self.runs:
            for c in r.checks:
                if not c.ok:
                    out.append(f"{self.scenario.name}: run {r.repeat}: {c.name}: {c.message}")
        return out

    def summary(self) -> dict[str, dict[str, float]]:
        """min/median/max of each metric over the runs that produced a report."""
        reps = [r for r in self.runs if r.report]
        out: dict[str, dict[str, float]] = {}
        for name, get in METRICS.items():
            vals = [get(r.report, r.memory_bytes) for r in reps]
            if vals:
                out[name] = {"min": _r(min(vals)), "median": _r(statistics.median(vals)), "max": _r(max(vals))}
        return out

    def compared(self) -> list[Run]:
        """kind = "qemu": every method's run, over all repeats."""
        return [Run(**m) for r in self.runs for m in r.methods]

    def side_by_side(self) -> list[dict]:
        """kind = "qemu": one row per method (medians over the repeats), as in the bench."""
        rows = table_rows(self.compared())
        return [dict(zip(rows[0], row)) for row in rows[1:]]

    def to_json(self) -> dict:
        s = self.scenario
        extra = {} if s.qemu is None else {
            "qemu": {"ram": s.qemu.ram, "program": s.qemu.program, "methods": list(s.qemu.methods)},
            "side_by_side": self.side_by_side()}
        return {"name": s.name, "file": s.path, "description": s.description, "ci": s.ci, "kind": s.kind,
                **extra, "memory_bytes": s.memory_bytes, "tolerance": s.tolerance,
                "link": {"bandwidth": s.link.bandwidth, "latency_ms": s.link.latency_ms},
                "policy": vars(s.policy).copy(), "events": [e.describe() for e in s.events],
                "passed": self.passed, "failures": self.failures(),
                "statuses": [r.status for r in self.runs], "summary": self.summary(),
                "runs": [r.to_json() for r in self.runs]}


def _r(v: float) -> float:
    return round(v, 3) if isinstance(v, float) else v


def chart_name(name: str, repeat: int) -> str:
    return f"charts/{name}-r{repeat}.svg"


def write_reports(out_dir: str, outcomes: list[ScenarioOutcome], comparison: Comparison | None,
                  started: float) -> dict:
    """Write report.json, report.md and the charts into out_dir; return the JSON document."""
    os.makedirs(os.path.join(out_dir, "charts"), exist_ok=True)
    for o in outcomes:
        for r in o.runs:
            if r.report and r.timeline:
                with open(os.path.join(out_dir, chart_name(o.scenario.name, r.repeat)), "w") as f:
                    f.write(convergence_svg(o.scenario.name, r))
    doc = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
           "duration_s": round(time.time() - started, 1),
           "host": {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version()},
           "passed": all(o.passed for o in outcomes) and (comparison is None or comparison.passed),
           "scenarios": [o.to_json() for o in outcomes],
           "baseline": comparison.to_json() if comparison else None}
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown(doc))
    return doc


def _num(v: float) -> str:
    if isinstance(v, int) or float(v).is_integer():
        return f"{int(v)}"
    return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def _mmm(s: dict, key: str, fmt=lambda v: f"{v:g}") -> str:
    if key not in s:
        return "-"
    m = s[key]
    if m["min"] == m["max"]:
        return fmt(m["median"])
    return f"{fmt(m['min'])} / {fmt(m['median'])} / {fmt(m['max'])}"


def markdown(doc: dict) -> str:
    """report.md from the JSON document."""
    scen = doc["scenarios"]
    L = _overview(doc)
    fails = [f for s in scen for f in s["failures"]]
    if fails:
        L += ["", "## Failed expectations", ""] + [f"- {f}" for f in fails]
    if doc["baseline"] is not None:
        L += _baseline_section(doc["baseline"])
    for s in scen:
        L += _scenario_section(s)
    return "\n".join(L) + "\n"


def _overview(doc: dict) -> list[str]:
    """The heading and one line per scenario."""
    scen = doc["scenarios"]
    npass = sum(1 for s in scen if s["passed"])
    L = ["# Migration scenarios", "",
         f"{doc['created']}, kernel {doc['host']['kernel']}, {doc['host']['cpus']} CPUs, "
         f"{doc['duration_s']} s. **{npass} of {len(scen)} scenarios passed**"
         + ("" if doc["baseline"] is None else
            f"; baseline {'passed' if doc['baseline']['passed'] else '**failed**'}") + ".", "",
         "Values across repeats are min / median / max (one value when all agree).", "",
         "| scenario | result | status | rounds | downtime ms | total s | sent MB | sent / memory |",
         "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in scen:
        sm = s["summary"]
        L.append(f"| [{s['name']}](#{s['name']}) | {'pass' if s['passed'] else '**FAIL**'} | "
                 f"{', '.join(sorted(set(s['statuses'])))} | {_mmm(sm, 'rounds')} | "
                 f"{_mmm(sm, 'downtime_ms', lambda v: f'{v:.1f}')} | "
                 f"{_mmm(sm, 'total_time_ms', lambda v: f'{v / 1000:.2f}')} | "
                 f"{_mmm(sm, 'transferred_bytes', _mb)} | {_mmm(sm, 'bytes_ratio', lambda v: f'{v:.2f}')} |")
    return L


def _baseline_section(b: dict) -> list[str]:
    L = ["", "## Against the baseline", "",
         f"Baseline `{b['file']}`; counts gated at +{b['tolerance'] * 100:g} % "
         "(rounds also +1); times reported, not gated.", "",
         "| scenario | metric | baseline | now | change | verdict |", "| --- | --- | --- | --- | --- | --- |"]
    for row in b["rows"]:
        ch = f"{row['change'] * 100:+.1f} %" if row["change"] is not None else "-"
        L.append(f"| {row['scenario']} | {row['metric']} | {row['baseline']:g} | {row['now']:g} | {ch} | "
                 f"{row['verdict']} |")
    for n in b["notes"]:
        L.append(f"\n- {n}")
    return L


def _scenario_section(s: dict) -> list[str]:
    """A scenario's set-up, its summary across repeats, then each run."""
    L = ["", f"## {s['name']}", ""]
    if s["description"]:
        L += [s["description"], ""]
    link = f"{s['link']['bandwidth'] / 1e6:g} MB/s" if s["link"]["bandwidth"] else "unlimited"
    if s["link"]["latency_ms"]:
        link += f", +{s['link']['latency_ms']:g} ms each way"
    p = s["policy"]
    if s.get("kind") == "qemu":
        L += _qemu_section(s, link)
    else:
        L += [f"`{s['file']}`: {s['memory_bytes'] / (1 << 20):g} MiB guest, link {link}, downtime limit "
              f"{p['downtime_limit_ms']:g} ms, max rounds {p['max_rounds']}, tracker {p['tracker']}, "
              f"{p['channels']} channel(s)" + (", auto-converge" if p["auto_converge"] else "") + "."
              + (f" Events: {'; '.join(s['events'])}." if s["events"] else ""), ""]
    sm = s["summary"]
    if sm:
        L += ["| metric | min | median | max |", "| --- | --- | --- | --- |"]
        for k, m in sm.items():
            L.append(f"| {k} | {_num(m['min'])} | {_num(m['median'])} | {_num(m['max'])} |")
    for run in s["runs"]:
        L += _run_section(s["name"], run)
    return L


def _run_section(name: str, run: dict) -> list[str]:
    """One run: its error, its report with the per-round table and chart, events, checks."""
    L = ["", f"### {name}, run {run['repeat']}: " + ("pass" if run["passed"] else "**FAIL**"), ""]
    if run["error"]:
        L += [f"Error: {run['error']}", ""]
    if run.get("skipped"):
        L += [f"Skipped: {run['skipped']}", ""]
    if run.get("methods"):
        L += _side_by_side([Run(**m) for m in run["methods"]]) + [""]
    rep = run["report"]
    if rep:
        L += [f"Status **{rep['status']}**" + (f" ({rep['reason']})" if rep["reason"] else "")
              + f"; tracker {rep['tracker']}; destination {run['destination']}; "
              f"downtime {rep['downtime_ms']:.1f} ms (expected {rep['expected_downtime_ms']:.1f} ms); "
              f"total {rep['total_time_ms'] / 1000:.2f} s; {_mb(rep['transferred_bytes'])} MB sent; "
              f"throttle {rep['throttle_percent']} %.", ""]
        if run["timeline"]:
            L += [f"![convergence chart]({chart_name(name, run['repeat'])})", ""]
        L += ["| round | pages dirtied | pages sent | zero pages | MB sent | ms | Mbit/s | "
              "dirty MB/s | expected downtime ms | tracker ms | throttle % |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for rs in rep["per_round"]:
            rname = "stop-and-copy" if rs["stop_and_copy"] else str(rs["round"])
            L.append(f"| {rname} | {rs['pages_dirtied']} | {rs['pages_sent']} | {rs['pages_zero']} | "
                     f"{_mb(rs['bytes'])} | {rs['duration_ms']:.1f} | {rs['bandwidth_mbps']:.0f} | "
                     f"{rs['dirty_rate_pps'] * PAGE_SIZE / 1e6:.1f} | {rs['expected_downtime_ms']:.1f} | "
                     f"{rs['tracker_ms']:.1f} | {rs['throttle_percent']} |")
    if run["events"]:
        L += ["", "Events: " + "; ".join(f"{e['t_s']:.2f} s {e['what']}"
                                         + (f" ({e['detail']})" if e["detail"] else "")
                                         for e in run["events"][:20])
              + (f"; … {len(run['events']) - 20} more" if len(run["events"]) > 20 else "")]
    L += [""] + [f"- {'ok' if c['ok'] else '**FAILED**'} {c['name']}: {c['message']}" for c in run["checks"]]
    return L


def _side_by_side(runs: list[Run]) -> list[str]:
    """The table, then each method that did not complete with its reason (never hidden)."""
    return markdown_table(runs) + [""] + [
        f"- **{r.method} {r.status}**: {r.reason or r.pattern}" for r in runs if not r.ok]


def _qemu_section(s: dict, link: str) -> list[str]:
    q = s["qemu"]
    return [f"`{s['file']}`: QEMU VM (TCG), {q['ram'] / (1 << 20):g} MiB, {q['program']}; link {link} "
            f"(loopback); downtime limit {s['policy']['downtime_limit_ms']:g} ms; compared: "
            f"{', '.join(q['methods'])} (one fresh VM per method and run). Expectations apply to the "
            "migrator-driven run; its RAM report follows per run.", "",
            "Side by side (medians over the runs):", "",
            *markdown_table([Run(**m) for r in s["runs"] for m in r.get("methods", [])]), "", TABLE_NOTE, ""]
