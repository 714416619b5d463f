#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then run the checks CI runs: the scenario suite against
# its baseline (convergence counts), and the test suite.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== scenario suite (CI subset) against scenarios/baseline.json"
.venv/bin/migrator scenario run scenarios --ci --baseline scenarios/baseline.json --report scenario-report --quiet
echo "== tests"
exec .venv/bin/python -m pytest tests "$@"
