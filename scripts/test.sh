#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then every check CI runs:
#   1. the test suite (pytest; extra arguments go to it),
#   2. the scenario suite against its baseline (convergence counts must not get worse),
#   3. the kernel matrix: probe + tracking tests on this kernel and on Debian 6.12 / 6.1 under qemu,
#      ending with one row per kernel.
# Every stage runs; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
failed=()
echo "== tests"
.venv/bin/python -m pytest tests "$@" || failed+=("tests")
echo "== scenario suite (CI subset) against scenarios/baseline.json"
.venv/bin/migrator scenario run scenarios --ci --baseline scenarios/baseline.json \
    --report scenario-report --junit scenario-report/junit.xml \
    --summary scenario-report/summary.md --quiet || failed+=("scenarios")
echo "== kernel matrix"
bash scripts/kernel-matrix.sh || failed+=("kernel matrix")
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
