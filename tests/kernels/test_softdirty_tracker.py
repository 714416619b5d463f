"""The soft-dirty tracker for real, on kernels that have soft-dirty (the kernel matrix runs these
in the Debian 6.12 and 6.1 guests; on this machine's kernel they skip).

- exact page sets for private and shared memory;
- the kernel thread's case: shmem pages written, then swapped out (MADV_PAGEOUT), then written
  again or not: soft-dirty alone loses them, the composite (soft-dirty + shmem ledger) is exact;
- VM_SOFTDIRTY false positives of a new mapping: reported by one collect, not by the next;
- an end-to-end migration with the soft-dirty tracker, byte-identical.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vmrun  # noqa: E402
from child import Child  # noqa: E402  (tests/child.py: tests/ is on sys.path via its conftest)
from conftest import require, swap_active  # noqa: E402
from migrator.kernel.probe import probe  # noqa: E402
from migrator.tracking.choose import make_tracker  # noqa: E402
from migrator.tracking.softdirty import SoftDirtyTracker  # noqa: E402

KERNEL = os.environ.get("MIGRATOR_KERNEL")
N = 64


@pytest.fixture(scope="module")
def caps():
    c = probe()
    if not c.soft_dirty.supported:
        if KERNEL in vmrun.KERNELS and vmrun.KERNELS[KERNEL].expect["soft_dirty"]:
            pytest.fail(f"{KERNEL} has soft-dirty, but the probe did not find it: {c.soft_dirty.detail}")
        pytest.skip("this kernel has no soft-dirty (CONFIG_MEM_SOFT_DIRTY): the kernel matrix runs these")
    return c


@pytest.fixture
def child(root, caps):
    require(caps.map_files.supported, "needs /proc/PID/map_files (CAP_SYS_ADMIN)")
    c = Child("--shm-pages", str(N), "--anon-pages", str(N))
    yield c
    c.exit()


def pages(tracker):
    return {k: v.pages() for k, v in tracker.collect().pages.items()}


def need_swap():
    require(swap_active(), "needs active swap (the matrix turns on zram in every guest)")


@pytest.mark.parametrize("region", ["anon", "shm"])
def test_exact_pages(child, region):
    with SoftDirtyTracker(child.pid, [child.region(region)]) as t:
        assert pages(t) == {region: []}
        child.write(region, [0, 31, N - 1])
        child.write(region, [31])
        assert pages(t) == {region: [0, 31, N - 1]}
        assert pages(t) == {region: []}
        child.write(region, [7])
        assert pages(t) == {region: [7]}


def test_both_regions_one_tracker(child):
    with SoftDirtyTracker(child.pid, [child.region("anon"), child.region("shm")]) as t:
        child.write("anon", [1, 2])
        child.write("shm", [3])
        assert pages(t) == {"anon": [1, 2], "shm": [3]}
        assert pages(t) == {"anon": [], "shm": []}


def test_anon_swapped_out_keeps_soft_dirty(child):
    """Private memory: the swap entry keeps the bit, so soft-dirty alone is exact."""
    need_swap()
    with SoftDirtyTracker(child.pid, [child.region("anon")]) as t:
        child.write("anon", [0, 1, 2, 3, 40])
        child.cmd("madvise", region="anon", advice="pageout", first=0, n=N)
        assert pages(t) == {"anon": [0, 1, 2, 3, 40]}
        assert pages(t) == {"anon": []}
        child.write("anon", [2])                     # swapped in by the write
        assert pages(t) == {"anon": [2]}


WRITTEN = [0, 1, 2, 3, 4, 5, 6, 7]


def _kernel_thread_case(child, tracker):
    """Written shmem pages pushed out to swap before the collect; then one written again."""
    first = pages(tracker)
    child.write("shm", WRITTEN)
    child.write("anon", [9])
    child.cmd("madvise", region="shm", advice="pageout", first=0, n=N)
    second = pages(tracker)
    child.write("shm", [3])                          # after the swap-out: faults back in
    third = pages(tracker)
    return first, second, third


def test_kernel_thread_case_soft_dirty_alone_loses_shmem(child):
    need_swap()
    with SoftDirtyTracker(child.pid, [child.region("anon"), child.region("shm")]) as t:
        first, second, third = _kernel_thread_case(child, t)
    assert first == {"anon": [], "shm": []}
    # the loss: 8 shmem pages written, none reported (their PTEs were cleared by the swap-out)
    assert second == {"anon": [9], "shm": []}
    assert third == {"anon": [], "shm": [3]}


def test_kernel_thread_case_composite_is_exact(child):
    need_swap()
    with make_tracker(child.pid, [child.region("anon"), child.region("shm")], "soft-dirty") as t:
        assert t.name == "soft-dirty+ledger"
        first, second, third = _kernel_thread_case(child, t)
    assert first == {"anon": [], "shm": []}
    assert second == {"anon": [9], "shm": WRITTEN}
    assert third == {"anon": [], "shm": [3]}


def test_composite_other_write_paths(child):
    """pwrite and hole punching never touch the target's PTEs: the ledger sees them."""
    with make_tracker(child.pid, [child.region("anon"), child.region("shm")], "soft-dirty") as t:
        assert pages(t) == {"anon": [], "shm": []}
        child.cmd("pwrite", pages=[12])
        child.cmd("punch", first=20, n=2)
        child.write("anon", [0])
        assert pages(t) == {"anon": [0], "shm": [12, 20, 21]}
        assert pages(t) == {"anon": [], "shm": []}


def test_auto_without_userfaultfd(child, caps):
    """A target holding no userfaultfd: auto injects one where the kernel has async write-protect
    (6.12), else takes soft-dirty, the best exact tracker left (6.1); with injection off, soft-dirty
    on both, and the report says why."""
    regions = [child.region("anon"), child.region("shm")]
    wp = caps.uffd_wp_async_anon.supported and caps.pagemap_scan.supported
    with make_tracker(child.pid, regions, "auto") as t:
        assert t.name == ("wp+wp-mappers+ledger" if wp else "soft-dirty+ledger")
        child.write("anon", [4])
        child.write("shm", [5])
        assert pages(t) == {"anon": [4], "shm": [5]}
    with make_tracker(child.pid, regions, "auto", inject=False) as t:
        assert t.name == "soft-dirty+ledger"
        assert "no write-protect: " in t.statistics().detail


def test_new_mapping_false_positives_reported_once(child):
    """VM_SOFTDIRTY: a mapping made after begin() reads soft-dirty on every page, unwritten
    ones (holes) included.  Reported by the next collect, then cleared: never a second time."""
    with SoftDirtyTracker(child.pid, [child.region("anon")]) as t:
        assert pages(t) == {"anon": []}
        child.cmd("remap", region="anon", first=16, n=8)     # fresh anonymous pages, unwritten
        got = pages(t)["anon"]
        assert set(range(16, 24)) <= set(got)
        # the kernel may merge the new VMA with its neighbours and mark the merged VMA soft-dirty:
        # then the whole region is reported once (the cost of the false positives)
        assert got in (list(range(16, 24)), list(range(N))), got
        print(f"VM_SOFTDIRTY false positives on an 8-page remap: {len(got)} pages reported once")
        assert pages(t) == {"anon": []}
        child.write("anon", [17])
        assert pages(t) == {"anon": [17]}


# --- an end-to-end migration with the soft-dirty tracker ------------------------------------

MB = 1 << 20


@pytest.fixture
def receiver(tmp_path, root, caps):
    from migration_helpers import ReceiverProcess
    r = ReceiverProcess(str(tmp_path / "out"))
    yield r
    r.stop()


@pytest.mark.parametrize("workload,rate,pager", [("idle", 0, False), ("random", 2e6, True)])
async def test_migration_with_soft_dirty_is_byte_identical(receiver, workload, rate, pager):
    """pager: the guest pushes its memory out to swap every 0.1 s during the migration (the
    kernel thread's case, end to end)."""
    from migration_helpers import assert_images_equal_source
    from migrator.guest.launcher import start_guest
    from migrator.guest.spec import GuestSpec
    from migrator.guest.workloads import WorkloadSpec
    from migrator.precopy.controller import MigrationPolicy, MigrationTarget, migrate

    if KERNEL not in (None, "debian-6.12"):
        pytest.skip("the end-to-end migration runs in the debian-6.12 guest (CI time budget)")
    if pager:
        need_swap()
    spec = GuestSpec(shared_ram=8 * MB, anon_ram=4 * MB, uffd=False,
                     workload=WorkloadSpec(kind=workload, rate=rate, seed=5),
                     pager_interval=0.1 if pager else None)
    with start_guest(spec) as g:
        sel = ["guest-ram"]
        if "anon" in g.regions:
            a = g.regions["anon"]
            sel.append(f"{a.start:x}-{a.end:x}")
        target = MigrationTarget(pid=g.pid, regions=sel, writers=[], uffd_fd=g.uffd_fd)
        rep = await migrate(target, "127.0.0.1", receiver.port, key=None,
                            policy=MigrationPolicy(tracker="soft-dirty", max_bandwidth=200e6,
                                                   min_round_s=0.05, auto_converge=True,
                                                   verify="memory"))
        assert rep.status == "completed", rep.reason
        assert rep.tracker == "soft-dirty+ledger"
        # no write-protect on the mappers: soft-dirty loses a written shmem page on swap-out and
        # on MADV_DONTNEED, so the ledger sweeps the shared memory at every collect, and says why
        assert rep.sweeps and all(s["reason"].startswith("no page-table tracking of its mappers")
                                  for s in rep.sweeps), rep.sweeps
        assert rep.sweeps[-1]["round"] == "final" and rep.verify_memory_ms > 0
        assert rep.rounds >= 2 and rep.per_round[-1].stop_and_copy
        assert_images_equal_source(g, receiver.out_dir)
        if workload == "idle":
            assert rep.final_dirty_pages == 0
