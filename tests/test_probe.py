"""`migrator probe` on this kernel, run as a user would: the console command, both outputs."""

import json
import os
import subprocess
import sys

import pytest

from conftest import swap_active

KEYS = ["soft_dirty", "pagemap_scan", "uffd_wp_async_anon", "uffd_wp_async_shmem", "pidfd_getfd",
        "map_files", "swap_active", "thp", "uffd_injection"]


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
        if os.geteuid() == 0:
            assert caps["uffd_injection"]["supported"] is True, caps["uffd_injection"]


def test_probe_table():
    p = run("probe")
    assert p.returncode == 0
    lines = p.stdout.splitlines()
    assert [l.split()[0] for l in lines] == KEYS
    assert all(l.split()[1] in ("yes", "no") for l in lines)


def test_unknown_command_is_a_usage_error():
    p = run("frobnicate")
    assert p.returncode == 2 and "invalid choice" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_track_and_regions_commands_on_a_real_process():
    """`migrator regions` lists the memfd by name; `migrator track` reports exactly the pages the
    child wrote between collects (the ledger counts content changes), and says when and why the
    ledger swept."""
    from child import Child
    c = Child("--shm-pages", "32", "--anon-pages", "8")
    try:
        p = run("regions", "--pid", str(c.pid))
        assert p.returncode == 0
        assert any(l.split()[-1] == "test-shm" and " shared " in l for l in p.stdout.splitlines())
        p = subprocess.Popen([sys.executable, "-m", "migrator", "track", "--pid", str(c.pid),
                              "--region", "test-shm", "--json", "--interval", "0.3", "--count", "2"],
                             stdout=subprocess.PIPE, text=True)
        first = json.loads(p.stdout.readline())
        c.cmd("pwrite", pages=[3])       # a write call: no page table sees it, the ledger does
        second = json.loads(p.stdout.readline())
        assert first["pages"] == {"test-shm": 0} and second["pages"] == {"test-shm": 1}
        [sweep] = second["sweeps"]
        assert sweep["regions"] == ["test-shm"]
        from migrator.kernel.probe import probe_pagemap_scan, probe_uffd_wp_async_shmem
        if probe_pagemap_scan().supported and probe_uffd_wp_async_shmem().supported:
            # page tables prove the memfd unchanged until the write call
            assert first["sweeps"] == [] and f"process {c.pid} made" in sweep["reason"], sweep
        else:                            # (a kernel without write-protect: a sweep every collect)
            assert all(s["reason"].startswith("no page-table tracking of its mappers")
                       for s in first["sweeps"] + second["sweeps"]), (first, second)
        p.wait(timeout=30)
        bad = run("track", "--pid", str(c.pid), "--region", "no-such-region")
        assert bad.returncode == 2
        assert bad.stderr.strip() == "migrator: error: no mapping matches 'no-such-region' (try `migrator regions --pid PID` to list them)"
    finally:
        c.exit()
