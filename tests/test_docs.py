"""The CLI reference stays in step with the commands."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_reference_is_up_to_date():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "cli_reference.py"), "--check"])
    assert p.returncode == 0, "docs/cli.md is stale: run .venv/bin/python scripts/cli_reference.py"


def test_ci_guide_shows_the_sample_project_as_tested():
    # docs/ci.md's example is the sample project test_pytest_plugin.py runs: never apart
    with open(os.path.join(ROOT, "docs", "ci.md")) as f:
        doc = f.read()
    for name in ("conftest.py", "test_kvcache_migrates.py"):
        with open(os.path.join(ROOT, "tests", "sample_project", "tests", name)) as f:
            assert f"```python\n{f.read().rstrip()}\n```" in doc, f"docs/ci.md does not show tests/sample_project/tests/{name} as it is"
