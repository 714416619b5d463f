"""Shared test helpers.

Tests run against the real kernel.  A test that needs root, swap or a kernel feature calls
require(): outside CI it skips with the reason printed; under CI=true it fails, because CI must
prove the feature, not silently pass without it.
"""

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    """Skip (outside CI) or fail (CI=true) when condition is false."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required for this test under CI=true: {reason}")
    print(f"SKIP: {reason}")
    pytest.skip(reason)


# Features a kernel class of the matrix (tests/kernels/vmrun.py) legitimately lacks: a test that
# needs one skips there, and still fails under CI=true on any other kernel.
KERNEL_CLASS = os.environ.get("MIGRATOR_EXPECT_KERNEL", "this")
CLASS_LACKS = {
    "debian-6.1": {"pagemap_scan", "uffd_wp_async_anon", "uffd_wp_async_shmem"},
}


def require_feature(feature: str, supported: bool) -> None:
    """Like require(), for a `migrator probe` feature: skips on a kernel class known to lack it."""
    if not supported and feature in CLASS_LACKS.get(KERNEL_CLASS, set()):
        pytest.skip(f"kernel class {KERNEL_CLASS} has no {feature} (expected)")
    require(supported, f"kernel lacks {feature}")


def swap_active() -> bool:
    with open("/proc/swaps") as f:
        return len(f.read().strip().splitlines()) > 1


@pytest.fixture
def root():
    require(os.geteuid() == 0, "needs root (CAP_SYS_ADMIN for map_files, pidfd_getfd)")



# The kernel tests run inside the kernel matrix (tests/kernels/vmrun.py sets MIGRATOR_KERNEL to the
# kernel class); a plain pytest run collects only the runner's own unit tests there.
collect_ignore = [] if os.environ.get("MIGRATOR_KERNEL") else [
    "kernels/test_kernel_facts.py", "kernels/test_softdirty_tracker.py"]
# a project of its own, with its own test suite (run by test_pytest_plugin.py as a user would)
collect_ignore.append("sample_project")
