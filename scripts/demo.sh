#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the demo: probe the kernel, then track a process
# that writes into a memfd, showing the dirty rate per second.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== what this kernel supports"
.venv/bin/migrator probe
echo
echo "== tracking a writer (64 MiB memfd 'guest-ram', ~30 MB/s of page writes) for 3 s"
.venv/bin/python tests/writer_child.py --shm-pages 16384 --anon-pages 256 --uffd > /tmp/migrator-demo.json < /dev/null &
sleep 1
pid=$(.venv/bin/python -c "import json; print(json.load(open('/tmp/migrator-demo.json'))['pid'])")
.venv/bin/migrator track --pid "$pid" --region test-shm --interval 1 --count 3 || true
kill "$pid" 2>/dev/null || true
