#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then the demo: probe the kernel and run the default
# migration scenario (scenarios/default.toml: a QEMU-like guest with shared memfd RAM, private
# RAM, a vhost-user-like side writer, migrated live to a receiver process over loopback), with
# live progress per round, the destination checked byte for byte, and a report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== what this kernel supports"
.venv/bin/migrator probe
echo
echo "== scenario: default"
.venv/bin/migrator scenario run default --repeat 1 --report demo-report "$@"
echo
echo "report: demo-report/report.md (chart: demo-report/charts/)"
