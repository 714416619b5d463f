"""`migrator probe` on this kernel, run as a user would: the console command, both outputs."""

import json
import os
import subprocess
import sys

from conftest import swap_active

KEYS = ["soft_dirty", "pagemap_scan", "uffd_wp_async_anon", "uffd_wp_async_shmem", "pidfd_getfd",
        "map_files", "swap_active", "thp"]


def run(*args):
    return subprocess.run([sys.executable, "-m", "migrator", *args], capture_output=True, text=True, timeout=60)


def test_probe_json_keys_and_values():
    p = run("probe", "--json")
    assert p.returncode == 0, p.stderr
    caps = json.loads(p.stdout)
    assert list(caps) == KEYS
    for v in caps.values():
        assert set(v) == {"supported", "detail"} and isinstance(v["supported"], bool) and v["detail"]
    assert caps["swap_active"]["supported"] == swap_active()
    if os.environ.get("MIGRATOR_EXPECT_KERNEL", "this") == "this":
        # this machine's kernel (see ../shared/kernel-notes.md)
        assert caps["soft_dirty"]["supported"] is False
        assert "CONFIG_MEM_SOFT_DIRTY" in caps["soft_dirty"]["detail"]
        for k in ("pagemap_scan", "uffd_wp_async_anon", "uffd_wp_async_shmem", "pidfd_getfd", "map_files"):
            assert caps[k]["supported"] is True, (k, caps[k])


def test_probe_table():
    p = run("probe")
    assert p.returncode == 0
    lines = p.stdout.splitlines()
    assert [l.split()[0] for l in lines] == KEYS
    assert all(l.split()[1] in ("yes", "no") for l in lines)


def test_unknown_command_is_a_usage_error():
    p = run("frobnicate")
    assert p.returncode == 2 and "invalid choice" in p.stderr and "Traceback" not in p.stderr
