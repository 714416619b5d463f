"""What a CI system shows of a scenario run, made from report.json's document (report.py):

- junit_xml(): JUnit XML (the Ant/Jenkins schema every common CI reads): one <testsuite> of
  one <testcase> per scenario run, its key numbers as <property> elements, a <failure> carrying
  the failed expectations (an <error> for a run that crashed, <skipped> for one not run), and
  one test case per baseline regression, with the old and new numbers;
- summary_markdown(): a short Markdown summary for a job page (GitHub's $GITHUB_STEP_SUMMARY, a
  GitLab or Jenkins description): the table, the failures, and each run's convergence chart as
  an image link.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

PROPERTIES = ("status", "downtime_ms", "expected_downtime_ms", "total_time_ms", "rounds",
              "transferred_bytes", "final_dirty_pages", "throttle_percent", "tracker")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}".rstrip("0").rstrip(".")
    return str(v)


def junit_xml(doc: dict) -> str:
    """The JUnit XML document (str, UTF-8 declared) of a report.json document."""
    suites = ET.Element("testsuites", name="migrator scenarios")
    suite = ET.SubElement(suites, "testsuite", name="migrator scenarios",
                          timestamp=doc["created"], hostname="localhost")
    tests = failures = errors = skipped = 0
    total = 0.0
    for s in doc["scenarios"]:
        for run in s["runs"]:
            tests += 1
            wall = float(run.get("wall_s") or 0.0)
            total += wall
            tc = ET.SubElement(suite, "testcase", classname=f"migrator.scenarios.{s['name']}",
                               name=f"{s['name']} run {run['repeat']}", time=_fmt(wall))
            props = ET.SubElement(tc, "properties")
            rep = run.get("report") or {}
            for k in PROPERTIES:
                if k in rep:
                    ET.SubElement(props, "property", name=k, value=_fmt(rep[k]))
            ET.SubElement(props, "property", name="destination", value=str(run.get("destination", "")))
            ET.SubElement(props, "property", name="file", value=str(s.get("file", "")))
            if run.get("skipped"):
                skipped += 1
                ET.SubElement(tc, "skipped", message=run["skipped"])
            elif run.get("error"):
                errors += 1
                e = ET.SubElement(tc, "error", message=run["error"][:500], type="MigratorError")
                e.text = run["error"]
            else:
                bad = [c for c in run["checks"] if not c["ok"]]
                if bad:
                    failures += 1
                    f = ET.SubElement(tc, "failure", type="expectation",
                                      message="; ".join(f"{c['name']}: {c['message']}" for c in bad)[:500])
                    f.text = "\n".join(f"{c['name']}: {c['message']}" for c in bad)
    b = doc.get("baseline")
    if b is not None:
        worse = [r for r in b["rows"] if r["verdict"] == "WORSE"]
        rows_failures = set(b["failures"])
        for r in worse:
            tests += 1
            failures += 1
            tc = ET.SubElement(suite, "testcase", classname="migrator.baseline",
                               name=f"{r['scenario']} {r['metric']}", time="0")
            props = ET.SubElement(tc, "properties")
            for k in ("baseline", "now", "change"):
                ET.SubElement(props, "property", name=k, value=_fmt(r[k]))
            change = f"{r['change'] * 100:+.1f} %" if r["change"] is not None else "new"
            why = next((m for m in rows_failures if m.startswith(f"{r['scenario']}: {r['metric']} ")), "")
            f = ET.SubElement(tc, "failure", type="baseline",
                              message=f"{r['metric']}: baseline {_fmt(r['baseline'])}, now {_fmt(r['now'])} "
                                      f"({change})")
            f.text = f"{why}\nbaseline file {b['file']}"
        # failures the rows do not show (a scenario missing from the baseline, a status change)
        shown = {f"{r['scenario']}: {r['metric']} " for r in worse}
        for msg in sorted(rows_failures):
            if any(msg.startswith(x) for x in shown):
                continue
            tests += 1
            failures += 1
            tc = ET.SubElement(suite, "testcase", classname="migrator.baseline", name=msg[:120], time="0")
            ET.SubElement(tc, "failure", type="baseline", message=msg[:500]).text = f"baseline file {b['file']}"
    for el in (suite, suites):
        el.set("tests", str(tests))
        el.set("failures", str(failures))
        el.set("errors", str(errors))
        el.set("skipped", str(skipped))
        el.set("time", _fmt(round(total, 3)))
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def summary_markdown(doc: dict, charts_url: str = "") -> str:
    """A short Markdown summary: the verdict, a table of runs, the failures, and each run's
    convergence chart as an image link (charts_url + "charts/NAME-rK.svg"; give the URL or
    relative path where the report folder's charts are published)."""
    from .report import chart_name

    scen = doc["scenarios"]
    runs = [(s, r) for s in scen for r in s["runs"]]
    npass = sum(1 for _, r in runs if r["passed"] and not r.get("skipped"))
    nskip = sum(1 for _, r in runs if r.get("skipped"))
    b = doc.get("baseline")
    verdict = "passed" if doc["passed"] else "FAILED"
    L = [f"### migrator scenarios: {verdict}", "",
         f"{npass} of {len(runs)} run(s) of {len(scen)} scenario(s) passed"
         + (f", {nskip} skipped" if nskip else "")
         + ("" if b is None else f"; baseline `{b['file']}` {'passed' if b['passed'] else '**failed**'}")
         + f" (kernel {doc['host']['kernel']}, {doc['host']['cpus']} CPUs, {doc['duration_s']} s).", "",
         "| scenario | run | result | status | rounds | downtime ms | total ms | sent MB |",
         "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s, r in runs:
        rep = r.get("report") or {}
        result = "skipped" if r.get("skipped") else ("pass" if r["passed"] else "**FAIL**")
        L.append(f"| {s['name']} | {r['repeat']} | {result} | {rep.get('status', '-')} | "
                 f"{rep.get('rounds', '-')} | "
                 + (f"{rep['downtime_ms']:.1f}" if "downtime_ms" in rep else "-") + " | "
                 + (f"{rep['total_time_ms']:.0f}" if "total_time_ms" in rep else "-") + " | "
                 + (f"{rep['transferred_bytes'] / 1e6:.1f}" if "transferred_bytes" in rep else "-") + " |")
    fails = [f for s in scen for f in s["failures"]] + [f"{s['name']} run {r['repeat']}: {r['error']}"
                                                         for s, r in runs if r.get("error")]
    if b is not None:
        fails += [f"baseline: {f}" for f in b["failures"]]
    if fails:
        L += ["", "**Failures**", ""] + [f"- {f}" for f in fails]
    charts = [(s, r) for s, r in runs if r.get("timeline")]
    if charts:
        L += ["", "**Convergence** (remaining bytes per round)", ""]
        L += [f"![{s['name']} run {r['repeat']}]({charts_url}{chart_name(s['name'], r['repeat'])})"
              for s, r in charts]
    return "\n".join(L) + "\n"


__all__ = ["junit_xml", "summary_markdown"]
