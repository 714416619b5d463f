#!/usr/bin/env bash
# Kernel matrix (issue 7): `migrator probe` and the tracking tests on every kernel class -- this
# machine's kernel directly, Debian 6.12 and 6.1 booted under qemu (TCG) -- then one table row per
# kernel.  Exit status 1 if any kernel failed to fetch or boot, or any test failed.
# Run after scripts/setup.sh (it installs the packages and .venv); as root (qemu exports / over 9p).
# Arguments go to tests/kernels/vmrun.py --matrix (e.g. -k debian-6.1, --tests FILE..., -j 2).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "kernel-matrix: needs root (qemu's 9p export of /)" >&2
    exit 1
fi
for tool in qemu-system-x86_64 depmod busybox; do
    command -v "$tool" >/dev/null || [ -x "/sbin/$tool" ] || [ -x "/usr/sbin/$tool" ] || {
        echo "kernel-matrix: $tool missing: run scripts/setup.sh first (it installs qemu-system-x86, kmod, busybox-static)" >&2
        exit 1
    }
done

# kernels are cached here between runs (CI may keep this directory)
export MIGRATOR_KERNEL_CACHE="${MIGRATOR_KERNEL_CACHE:-/var/cache/migrator-kernels}"
mkdir -p reports
exec .venv/bin/python tests/kernels/vmrun.py --matrix --quiet --log-dir reports/kernels --timeout 1200 "$@"
