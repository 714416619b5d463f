#!/usr/bin/env bash
# Kernel matrix (issue 7): `migrator probe` and the tracking tests on every kernel class -- this
# machine's kernel directly, Debian 6.12 and 6.1 booted under qemu (TCG) -- then one table row per
# kernel.  Exit status 1 if any kernel failed to fetch or boot, or any test failed.
# Run after scripts/setup.sh (it needs .venv); root (apt, qemu's 9p export of /).
# Arguments go to tests/kernels/vmrun.py --matrix (e.g. -k debian-6.1, --tests FILE..., -j 2).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="qemu-system-x86 kmod busybox-static"
if [ "$(id -u)" != 0 ]; then
    echo "kernel-matrix: needs root" >&2
    exit 1
fi
missing=""
for p in $APT_PACKAGES; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "kernel-matrix: apt-get install$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# kernels are cached here between runs (CI may keep this directory)
export MIGRATOR_KERNEL_CACHE="${MIGRATOR_KERNEL_CACHE:-/var/cache/migrator-kernels}"
mkdir -p reports
exec .venv/bin/python tests/kernels/vmrun.py --matrix --quiet --log-dir reports/kernels "$@"
