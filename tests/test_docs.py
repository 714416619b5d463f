"""The CLI reference stays in step with the commands."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_reference_is_up_to_date():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "cli_reference.py"), "--check"])
    assert p.returncode == 0, "docs/cli.md is stale: run .venv/bin/python scripts/cli_reference.py"
