"""make_tracker's choice on real processes: the cooperative uffd first, else an injected one; a
refused injection falls back to the next mechanism and says why; --tracker wp refuses instead."""

import pytest

from child import Child
from conftest import require_feature
from tracer import Tracer
from migrator.errors import UnsupportedError
from migrator.kernel.probe import probe_uffd_wp_async_anon, probe_uffd_wp_async_shmem
from migrator.tracking.choose import make_tracker


@pytest.fixture
def wp_kernel(root):
    require_feature("uffd_wp_async_anon", probe_uffd_wp_async_anon().supported)
    require_feature("uffd_wp_async_shmem", probe_uffd_wp_async_shmem().supported)


def regions(c):
    return [c.region("anon"), c.region("shm")]


def pages(t):
    return {k: v.pages() for k, v in t.collect().pages.items()}


def test_cooperative_uffd_preferred(wp_kernel):
    c = Child("--uffd", "--shm-pages", "16", "--anon-pages", "16")
    try:
        with make_tracker(c.pid, regions(c), "auto") as t:
            assert t.name == "wp+wp-mappers+ledger"
            assert t.statistics().detail == (f"wp: anon (its own userfaultfd (fd {c.info['uffd_fd']})); "
                                               f"wp-mappers: shm (pid {c.pid}: its own userfaultfd (fd {c.info['uffd_fd']})); ledger: shm")
            c.write("anon", [3])
            c.write("shm", [4])
            assert pages(t) == {"anon": [3], "shm": [4]}
    finally:
        c.exit()


def test_non_cooperating_target_injected(wp_kernel):
    c = Child("--shm-pages", "16", "--anon-pages", "16")
    try:
        with make_tracker(c.pid, regions(c), "auto") as t:
            assert t.name == "wp+wp-mappers+ledger"
            assert f"(injected into thread {c.pid} in " in t.statistics().detail
            c.write("anon", [0, 15])
            c.write("shm", [1])
            c.cmd("pwrite", pages=[2])
            assert pages(t) == {"anon": [0, 15], "shm": [1, 2]}
    finally:
        c.exit()


def test_traced_target_falls_back_and_says_why(wp_kernel):
    c = Child("--shm-pages", "16", "--anon-pages", "16")
    holder = Tracer(c.pid)
    try:
        with make_tracker(c.pid, regions(c), "auto") as t:
            assert t.name in ("hash+ledger", "soft-dirty+ledger")
            detail = t.statistics().detail
            assert (f"no write-protect: will not inject into process {c.pid}: process {c.pid} is already "
                    f"traced by pid {holder.pid} (python)") in detail, detail
            c.write("anon", [5])
            c.write("shm", [6])
            assert pages(t) == {"anon": [5], "shm": [6]}
        with pytest.raises(UnsupportedError, match=f"write-protect tracking of process {c.pid}: .*already traced"):
            make_tracker(c.pid, regions(c), "wp")
        assert open(f"/proc/{c.pid}/status").read().count(f"TracerPid:\t{holder.pid}") == 1
    finally:
        holder.close()
        c.exit()


def test_no_inject_keeps_todays_choice(wp_kernel):
    c = Child("--shm-pages", "16", "--anon-pages", "16")
    try:
        with make_tracker(c.pid, regions(c), "auto", inject=False) as t:
            assert t.name in ("hash+ledger", "soft-dirty+ledger")
            assert "injection is off (--no-inject)" in t.statistics().detail
        with pytest.raises(UnsupportedError, match="injection is off"):
            make_tracker(c.pid, regions(c), "wp", inject=False)
    finally:
        c.exit()


def test_hash_chosen_by_user_injects_nothing(wp_kernel):
    c = Child("--shm-pages", "16", "--anon-pages", "16")
    try:
        with make_tracker(c.pid, regions(c), "hash") as t:
            assert t.name == "hash+ledger"
            assert open(f"/proc/{c.pid}/status").read().count("TracerPid:\t0") == 1
    finally:
        c.exit()



def test_without_map_files_private_tracker_beside_full_hashing(wp_kernel):
    """Where the shared objects cannot be opened (/proc/PID/map_files refused, as for a
    non-root user: simulated here by the capabilities passed in, since this test runs as root),
    the private memory keeps its page-table tracker and the shared memory is hashed through the
    target's mappings: every write path still found, exactly, and no content baseline offered."""
    import dataclasses

    from migrator.kernel.probe import Feature, probe
    from migrator.tracking.composite import PairTracker
    caps = dataclasses.replace(probe(), map_files=Feature(False, "test: map_files refused"))
    c = Child("--shm-pages", "16", "--anon-pages", "16")
    try:
        with make_tracker(c.pid, regions(c), "auto", caps=caps) as t:
            assert isinstance(t, PairTracker) and t.name == "wp+hash"
            assert t.content_baseline() is None
            assert "shared memory hashed through the target's mappings: test: map_files refused" \
                in t.statistics().detail
            c.write("anon", [2, 9])
            c.write("shm", [5])
            c.cmd("pwrite", pages=[11])
            assert pages(t) == {"anon": [2, 9], "shm": [5, 11]}
            assert pages(t) == {"anon": [], "shm": []}     # (nothing written since)
            assert t.final_collect_estimate_s() >= 0 and t.memory_bytes() > 0
    finally:
        c.exit()
