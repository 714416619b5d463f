#!/usr/bin/env bash
# Set up a fresh machine for migrator: system packages, a virtual environment with the package
# (building csrc/), and swap on zram for the swap-out tests.  Idempotent; root for the system parts.
set -euo pipefail
cd "$(dirname "$0")/.."

# libxxhash-dev, gcc: the C fast paths; qemu-system-x86, kmod, busybox-static: the kernel matrix
# (tests/kernels) and the real-QEMU tests; nasm: checks the QEMU test guest assembles to the same bytes
APT_PACKAGES="libxxhash-dev gcc qemu-system-x86 kmod busybox-static nasm"
if [ "$(id -u)" = 0 ]; then
    missing=""
    for p in $APT_PACKAGES; do
        dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        echo "setup: apt-get install$missing"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    fi
else
    echo "setup: not root: skipping apt packages ($APT_PACKAGES) and zram swap" >&2
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import migrator._kernel_c, migrator._stream_c, migrator._guest_c" || { echo "setup: the C extensions did not build" >&2; exit 1; }

# swap on zram, for the tests that push pages out to swap
if [ "$(id -u)" = 0 ] && [ "$(wc -l < /proc/swaps)" -le 1 ]; then
    if [ ! -e /sys/block/zram0 ]; then modprobe zram 2>/dev/null || true; fi
    if [ -e /sys/block/zram0 ]; then
        if [ "$(cat /sys/block/zram0/disksize)" = 0 ]; then
            echo 2G > /sys/block/zram0/disksize
        fi
        mkswap /dev/zram0 >/dev/null && swapon /dev/zram0 && echo "setup: swap on /dev/zram0 active"
    else
        echo "setup: no zram device: swap tests will fail under CI" >&2
    fi
fi
