"""`migrator scenario run|list`: repeatable migration scenarios with reports and a baseline."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scenario", help="run migration scenarios (TOML files) and report on them",
                       description="Repeatable migration scenarios: see docs/scenarios.md.")
    ssub = p.add_subparsers(dest="scenario_command", metavar="ACTION", required=True)
    r = ssub.add_parser("run", help="run scenarios, write report.json, report.md and charts",
                        description="Run each scenario (receiver, guest, migration; the destination is "
                                    "checked byte for byte against the paused source), write the "
                                    "reports, print a summary. Exit status 1 if any expectation or "
                                    "the baseline fails (each failure is named), 2 for a bad file.")
    r.add_argument("files", nargs="+", metavar="FILE",
                   help="scenario file, folder of *.toml, or a suite name (e.g. idle)")
    r.add_argument("--report", default="scenario-report", metavar="DIR",
                   help="where report.json, report.md and charts/ go (default ./scenario-report)")
    r.add_argument("--repeat", type=int, metavar="N", help="runs per scenario (default: its `repeats`)")
    r.add_argument("--baseline", metavar="FILE",
                   help="compare counts (rounds, bytes, pages) with this report.json or baseline")
    r.add_argument("--tolerance", type=float, default=None, metavar="F",
                   help="allowed growth of a count over the baseline, as a fraction (default 0.25)")
    r.add_argument("--save-baseline", metavar="FILE", help="also write the medians as a baseline file")
    r.add_argument("--ci", action="store_true", help="skip scenarios marked `ci = false` (e.g. the 4 GiB guest)")
    r.add_argument("--keep-images", action="store_true", help="keep the destination images under DIR/runs/")
    r.add_argument("--quiet", action="store_true", help="no per-round progress lines")
    r.add_argument("--junit", metavar="FILE",
                   help="also write JUnit XML: a test case per run (key numbers as properties, failed "
                        "expectations as failures) and one per baseline regression")
    r.add_argument("--summary", metavar="FILE",
                   help="also append a Markdown summary for a CI job page (e.g. $GITHUB_STEP_SUMMARY): "
                        "the table, the failures and the convergence charts as image links")
    r.add_argument("--charts-url", default="", metavar="URL",
                   help="prefix of the chart links in --summary (where DIR is published; default: relative to DIR)")
    r.set_defaults(handler=run)
    ls = ssub.add_parser("list", help="show the scenarios, one line each")
    ls.add_argument("files", nargs="*", metavar="FILE", help="files or folders (default: the suite)")
    ls.set_defaults(handler=list_)


def _load(files: list[str]):
    from ..errors import UsageError
    from ..scenarios import load_scenario, resolve

    scns = [load_scenario(p) for p in resolve(files)]
    seen: dict[str, str] = {}
    for s in scns:
        if s.name in seen:
            raise UsageError(f"two scenarios are named {s.name!r}: {seen[s.name]} and {s.path}")
        seen[s.name] = s.path
    return scns


def list_(args: argparse.Namespace) -> int:
    from ..scenarios import suite_dir

    for s in _load(args.files or [str(suite_dir())]):
        print(s.line())
    return 0


def run(args: argparse.Namespace) -> int:
    import trio

    from ..errors import UsageError
    from ..scenarios import run_suite
    from ..scenarios.baseline import DEFAULT_TOLERANCE
    from ..scenarios.suite import run_line

    if args.repeat is not None and args.repeat < 1:
        raise UsageError("--repeat must be at least 1")
    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    if tolerance < 0:
        raise UsageError("--tolerance must not be negative")
    scns = _load(args.files)
    if args.baseline:
        from ..scenarios import load_baseline
        load_baseline(args.baseline)                 # a bad file fails now, not after the runs
    skipped = [s for s in scns if args.ci and not s.ci]
    scns = [s for s in scns if s not in skipped]
    for s in skipped:
        print(f"{s.name}: skipped (ci = false)", file=sys.stderr)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    outcomes, comparison, doc = trio.run(lambda: run_suite(
        scns, args.report, repeat=args.repeat, baseline=args.baseline, tolerance=tolerance,
        save_baseline_to=args.save_baseline, keep_images=args.keep_images, log=log,
        progress=None if args.quiet else log))
    print()
    print(f"{'scenario':<22} result")
    for o in outcomes:
        for res in o.runs:
            print(run_line(o.scenario, res))
    failures = [f for o in outcomes for f in o.failures()]
    if comparison is not None:
        failures += [f"baseline: {f}" for f in comparison.failures]
        print(f"baseline {args.baseline}: " + ("counts within tolerance" if comparison.passed else "FAILED"))
    from ..scenarios.suite import write_ci_outputs
    write_ci_outputs(doc, junit=args.junit, summary=args.summary, charts_url=args.charts_url)
    extra = "".join(f", {p}" for p in (args.junit, args.summary) if p)
    print(f"reports: {args.report}/report.md, {args.report}/report.json, {args.report}/charts/{extra}")
    if failures:
        print(f"{len(failures)} expectation(s) failed:")
        for f in failures:
            print(f"  {f}")
        return 1
    print(f"all {sum(len(o.runs) for o in outcomes)} run(s) of {len(outcomes)} scenario(s) passed")
    return 0
