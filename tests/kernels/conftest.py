"""The kernel tests run inside the kernel matrix (tests/kernels/vmrun.py sets MIGRATOR_KERNEL to
the kernel class); a plain pytest run collects only the runner's own unit tests here."""

import os

collect_ignore = [] if os.environ.get("MIGRATOR_KERNEL") else [
    "test_kernel_facts.py", "test_softdirty_tracker.py"]
