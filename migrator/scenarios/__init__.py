"""Repeatable migration scenarios: a guest, its workload, side writers, swap pressure, the link
and the policy described in a TOML file (docs/scenarios.md); runs with the destination checked
byte for byte, reports (JSON, Markdown, SVG charts, JUnit XML, a job summary) and a regression
baseline.  Public API (docs/api.md): the names in __all__.

    result = await migrator.scenarios.run(["scenarios/idle.toml"], "report/", junit="junit.xml")
    assert result.passed, result.failures()
"""

from .baseline import Comparison as Comparison
from .baseline import compare as compare
from .baseline import load_baseline as load_baseline
from .baseline import save_baseline as save_baseline
from .chart import convergence_svg as convergence_svg
from .ci import junit_xml as junit_xml
from .ci import summary_markdown as summary_markdown
from .expect import Check as Check
from .report import ScenarioOutcome as ScenarioOutcome
from .report import write_reports as write_reports
from .runner import RunResult as RunResult
from .runner import run_once as run_once
from .spec import Scenario as Scenario
from .spec import load_scenario as load_scenario
from .spec import parse_scenario as parse_scenario
from .spec import resolve as resolve
from .spec import suite_dir as suite_dir
from .suite import SuiteResult as SuiteResult
from .suite import run as run
from .suite import run_suite as run_suite

__all__ = ["Check", "Comparison", "RunResult", "Scenario", "ScenarioOutcome", "SuiteResult", "compare",
           "convergence_svg", "junit_xml", "load_baseline", "load_scenario", "parse_scenario",
           "resolve", "run", "run_once", "run_suite", "save_baseline", "suite_dir",
           "summary_markdown", "write_reports"]
