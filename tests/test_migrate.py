"""End-to-end live migrations: a guest process and a receiver process, the pre-copy controller in
the test; the destination is checked byte for byte against the paused source."""

import os
import signal

import pytest
import trio

from conftest import require, swap_active
from migration_helpers import ReceiverProcess, assert_images_equal_source, manifest
from stall_watch import StallWatch
from waiting import await_until
from migrator.errors import UsageError
from migrator.guest.launcher import start_guest
from migrator.guest.spec import GuestSpec
from migrator.guest.workloads import WorkloadSpec
from migrator.kernel.process import process_state
from migrator.precopy.controller import MigrationPolicy, MigrationTarget, migrate

MB = 1 << 20


@pytest.fixture
def prepares(monkeypatch):
    """The PREPAREs a migration sends (Sender.prepare's calls, passed through): the regions'
    page counts announced, one dict a call."""
    from migrator.transport.sender import Sender
    calls = []
    real = Sender.prepare

    async def spy(self, runs):
        runs = {name: list(rl) for name, rl in runs.items()}
        calls.append({name: sum(end - first for first, end in rl) for name, rl in runs.items()})
        await real(self, runs)
    monkeypatch.setattr(Sender, "prepare", spy)
    return calls


@pytest.fixture
def receiver(tmp_path, root):
    r = ReceiverProcess(str(tmp_path / "out"))
    yield r
    r.stop()


async def session_started(receiver) -> None:
    """Until round 0 is under way: the receiver logged the session's set-up, and the first MiB of
    its first image holds data (the guest's random pages; the image was preallocated as zeros).
    At 20 MB/s, ~2 s of round 0's 40 MiB are then left."""
    await await_until(lambda: "region(s)" in receiver.text(), 30, "the receiver's session set-up line")

    def first_data() -> bool:
        try:
            image = manifest(receiver.out_dir, 0)["regions"][0]["image"]
            with open(os.path.join(receiver.out_dir, image), "rb") as f:
                return f.read(1 << 20).strip(b"\0") != b""
        except (OSError, KeyError, IndexError, ValueError):
            return False        # (not written yet, or being replaced)
    await await_until(first_data, 30, "round 0's first pages in the receiver's image")


def target_of(g, writers=()):
    sel = ["guest-ram"]
    if "anon" in g.regions:
        a = g.regions["anon"]
        sel.append(f"{a.start:x}-{a.end:x}")
    return MigrationTarget(pid=g.pid, regions=sel, writers=list(writers), uffd_fd=g.uffd_fd)


async def run(g, receiver, writers=(), **policy):
    policy.setdefault("verify", "memory")       # the paused source compared with what was sent
    rep = await migrate(target_of(g, writers), "127.0.0.1", receiver.port, key=None,
                        policy=MigrationPolicy(**policy))
    if rep.status == "completed":
        assert rep.verify_memory_ms > 0
    return rep


def guest(workload="idle", rate=0.0, shared=32 * MB, anon=8 * MB, **kw):
    return start_guest(GuestSpec(shared_ram=shared, anon_ram=anon, uffd=True,
                                 workload=WorkloadSpec(kind=workload, rate=rate, seed=3), **kw))


@pytest.mark.parametrize("workload,rate", [("idle", 0)] + [pytest.param(*p, marks=pytest.mark.slow) for p in
                                             [("random", 20e6), ("hotcold", 40e6), ("sweep", 30e6)]])
async def test_workloads_migrate_exactly(receiver, prepares, workload, rate):
    with guest(workload, rate) as g:
        # 50 ms: resending all 40 MiB at 400 MB/s (~105 ms) would not fit, so each round's
        # collect runs and decides
        rep = await run(g, receiver, max_bandwidth=400e6, min_round_s=0.05, downtime_limit_ms=50)
        assert rep.status == "completed", rep.reason
        assert rep.tracker == "wp+wp-mappers+ledger"
        assert rep.source_state == "paused" and process_state(g.pid) == "T"
        assert_images_equal_source(g, receiver.out_dir)
        assert rep.rounds >= 2 and rep.per_round[-1].stop_and_copy
        assert "collect1-done" in rep.timeline and not any(k.endswith("-skipped") for k in rep.timeline)
        # every mapper write-protected, no write calls: page tables prove the memfd's other
        # pages unchanged, so the ledger never sweeps it
        assert rep.final_scanned == [] and rep.sweeps == []
        if workload == "idle":
            assert rep.final_dirty_pages == 0
        # round 0 cannot be cut (deltas are on): every page of its plan is written in a live
        # round, so the receiver is not asked to allocate them beside the stream
        assert prepares == []


@pytest.mark.slow
async def test_collect_skipped_when_everything_would_fit(receiver):
    """After round 0, resending every page (40 MiB at 400 MB/s, ~105 ms) fits the 2 s limit: no
    collect can change the decision, so none runs while the guest runs and the final collect
    finds every page written since round 0 (the images prove none was missed).  Without
    deltas: with them, round 0's collect decides whether a round caches the rewritten pages
    (tests/test_migrate_delta.py)."""
    with guest("random", 20e6) as g:
        rep = await run(g, receiver, max_bandwidth=400e6, downtime_limit_ms=2000, delta_cache=0)
        assert rep.status == "completed", rep.reason
        assert "collect1-skipped" in rep.timeline and "collect1-start" not in rep.timeline
        # (20 MB/s rewrites a few % of what round 0 sent: not cut, see the test below)
        assert "round0-cut" not in rep.timeline and rep.events == []
        # (no wait for round 0's acknowledgement either: the final round's covers it)
        assert "round0-sent" in rep.timeline and "round0-acked" not in rep.timeline
        assert rep.rounds == 2 and rep.per_round[1].stop_and_copy
        assert rep.per_round[1].pages_dirtied == rep.final_dirty_pages > 0
        # CPU time of this process while sending: some, and never more than every core for
        # the whole send (a clock tick of slack)
        for r in rep.per_round:
            assert 0 <= r.cpu_ms <= r.duration_ms * os.cpu_count() + 10
        assert rep.per_round[0].cpu_ms > 0
        # the final collect is page tables only: nothing but page-table writes happened
        assert rep.final_scanned == [] and rep.sweeps == []
        assert rep.expected_downtime_ms <= 2000
        assert_images_equal_source(g, receiver.out_dir)


@pytest.mark.slow
async def test_switchover_fits_cuts_round_0(receiver, prepares):
    """Switch-over rule "fits" (QEMU's): 136 MiB at 400 MB/s (~0.35 s) fits the 2 s limit, so
    once the bandwidth is measured (50 ms) round 0 is cut short; the pages it did not send (and
    the batches it had packed but not sent) go out in the stop-and-copy, and the images prove
    none was lost."""
    with guest("random", 20e6, shared=128 * MB) as g:
        rep = await run(g, receiver, max_bandwidth=400e6, downtime_limit_ms=2000, switchover="fits")
        assert rep.status == "completed", rep.reason
        assert "round0-cut" in rep.timeline and "round0-acked" not in rep.timeline
        assert rep.rounds == 2 and rep.per_round[1].stop_and_copy
        r0, final = rep.per_round
        assert 0 < r0.pages_sent < r0.pages_dirtied          # (round 0's plan: every populated page)
        assert final.pages_sent >= r0.pages_dirtied - r0.pages_sent
        # the receiver was told round 0's whole plan first, so the pages the cut left were
        # allocated beside the stream, not in the pause
        [announced] = prepares
        assert sum(announced.values()) == r0.pages_dirtied and "guest-ram" in announced
        assert rep.final_scanned == [] and rep.sweeps == []
        assert_images_equal_source(g, receiver.out_dir)


@pytest.mark.slow
async def test_converge_cuts_round_0_when_it_is_rewritten_as_it_goes(receiver):
    """Default rule: a guest sweeping all its memory faster than round 0 sends it (as QEMU's
    test guest does): a sample of the pages round 0 sent shows them rewritten already, so round 0
    is cut once the whole memory would fit the limit: going on could not shorten the pause.
    (Without deltas: with them, round 1 would make the pause send deltas: not cut.)"""
    with guest("sweep", -1, shared=128 * MB, anon=0) as g:     # as fast as it can
        rep = await run(g, receiver, max_bandwidth=400e6, downtime_limit_ms=2000, delta_cache=0)
        assert rep.status == "completed", rep.reason
        assert "round0-cut" in rep.timeline, rep.timeline
        [why] = rep.events
        assert why.startswith("round 0 cut after ") and "rewritten already" in why, why
        r0, final = rep.per_round
        assert 0 < r0.pages_sent < r0.pages_dirtied and final.stop_and_copy
        assert_images_equal_source(g, receiver.out_dir)


async def test_switchover_rule_is_checked(receiver):
    with guest() as g:
        with pytest.raises(UsageError, match="switch-over rule 'soon'"):
            await run(g, receiver, switchover="soon")


@pytest.mark.slow
async def test_shmem_swapped_out_between_rounds(receiver):
    """The kernel thread's case: shmem pages pushed out to swap while the guest writes."""
    require(swap_active(), "needs active swap (zram)")
    with guest("random", 20e6, pager_interval=0.02) as g:
        rep = await run(g, receiver, writers=g.writer_pids.values(), max_bandwidth=200e6, min_round_s=0.1)
        assert rep.status == "completed", rep.reason
        assert_images_equal_source(g, receiver.out_dir)


@pytest.mark.slow
async def test_side_writers_vhost_and_pwrite(receiver):
    """A vhost-user-like process writing the memfd and a pwrite writer: both paused with the
    guest, both write paths caught by the ledger."""
    side = WorkloadSpec(kind="random", rate=10e6, seed=5)
    with guest("random", 10e6, vhost=side, pwrite=side) as g:
        assert set(g.writer_pids) == {"vhost", "pwrite"}
        rep = await run(g, receiver, writers=g.writer_pids.values(), max_bandwidth=300e6, min_round_s=0.05)
        assert rep.status == "completed", rep.reason
        assert_images_equal_source(g, receiver.out_dir)
        stats = g.stats().writers
        assert stats["vhost"].pages > 0 and stats["pwrite"].pages > 0
        # the pwrite writer's write calls made the ledger sweep, and the report says so
        pw = g.writer_pids["pwrite"]
        assert rep.sweeps and all(f"process {pw} made" in s["reason"] for s in rep.sweeps), rep.sweeps
        assert all(s["regions"] == ["guest-ram"] and s["bytes"] == 32 * MB for s in rep.sweeps)


@pytest.mark.slow
async def test_vhost_writer_tracked_by_page_tables(receiver):
    """A vhost-user-like process writing the memfd through its own mapping: write-protected like
    the guest, so the ledger never sweeps."""
    side = WorkloadSpec(kind="random", rate=10e6, seed=5)
    with guest("random", 10e6, vhost=side) as g:
        rep = await run(g, receiver, writers=g.writer_pids.values(), max_bandwidth=300e6, min_round_s=0.05)
        assert rep.status == "completed", rep.reason
        assert rep.sweeps == [] and rep.final_scanned == []
        assert_images_equal_source(g, receiver.out_dir)
        assert g.stats().writers["vhost"].pages > 0


@pytest.mark.slow
async def test_verify_memory_finds_writes_after_the_pause(receiver):
    """A writer left running (not given as a writer) goes on writing the memfd after the pause:
    --verify memory reads the paused source again and finds pages that differ from what was
    sent; the migration fails and the source is resumed."""
    side = WorkloadSpec(kind="random", rate=50e6, seed=5)
    with guest("idle", 0, vhost=side) as g:
        rep = await run(g, receiver, max_bandwidth=300e6)
        assert rep.status == "failed"
        assert rep.reason.startswith("--verify memory: the paused source differs from what was sent in guest-ram"), rep.reason
        assert any("was not paused" in e for e in rep.events), rep.events
        assert rep.source_state == "running"


@pytest.mark.slow
async def test_direct_io_reads_into_the_memory_during_a_migration(receiver, tmp_path):
    """A process mapping the guest's memfd reads a file with O_DIRECT into it all along: the
    device writes pinned pages without a fault, so the ledger sweeps, and the copy is exact."""
    from child import Child
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(256 * 4096))
    with guest("random", 5e6) as g:
        shared = next(r for r in g.regions.values() if r.kind == "shared")
        reader = Child("--shm-from", f"/proc/{g.pid}/fd/{shared.fd}", "--shm-pages", str(shared.size // 4096),
                       "--anon-pages", "1", "--no-populate", "--close-memfd")
        try:
            reader.cmd("direct_loop", region="shm", path=str(disk), file_pages=256, interval=0.002)
            rep = await run(g, receiver, writers=[reader.pid], max_bandwidth=300e6, min_round_s=0.05)
            assert rep.status == "completed", rep.reason
            assert rep.sweeps and any(f"process {reader.pid} completed" in s["reason"] and "O_DIRECT" in s["reason"]
                                      for s in rep.sweeps), rep.sweeps
            assert_images_equal_source(g, receiver.out_dir)
        finally:
            reader.kill()


async def test_pages_punched_and_read_back_during_a_migration(receiver):
    """A process punches pages of its memfd through its own mapping (MADV_REMOVE, as a balloon
    frees guest RAM: no write call, no write fault, no inotify event on a memfd's own
    descriptor) and reads each back at once: a zero page where data was.  Those pages left
    migrator's view of the memfd and are hashed alone, with no sweep; the copy is exact."""
    from child import Child
    from migrator.scenarios.destination import compare_with_source
    c = Child("--shm-pages", "8192", "--anon-pages", "16")
    try:
        c.cmd("balloon_loop", region="shm", interval=0.001)
        rep = await migrate(MigrationTarget(pid=c.pid, regions=["test-shm"]), "127.0.0.1", receiver.port,
                            key=None, policy=MigrationPolicy(verify="memory", max_bandwidth=100e6,
                                                             min_round_s=0.05))
        assert rep.status == "completed", rep.reason
        assert rep.tracker == "wp-mappers+ledger" and rep.sweeps == [], rep.sweeps
        assert any("left migrator's view" in e for e in rep.events), rep.events
        check = compare_with_source(c.pid, receiver.out_dir)
        assert check.identical, check.detail
    finally:
        c.kill()


@pytest.mark.slow
async def test_dirty_rate_above_the_link_without_auto_converge(receiver):
    with guest("random", 80e6, shared=8 * MB, anon=0) as g:
        rep = await run(g, receiver, max_bandwidth=20e6, nonconvergence_rounds=2, max_rounds=20)
        assert rep.status == "not-converged"
        assert "auto-converge" in rep.reason
        assert rep.source_state == "running" and process_state(g.pid) != "T"
        before = g.stats().writers["vcpu"].pages
        await await_until(lambda: g.stats().writers["vcpu"].pages > before, 10,
                          "the guest to write on after the migration gave up")
        assert manifest(receiver.out_dir)["complete"] is False


@pytest.mark.slow
async def test_dirty_rate_above_the_link_with_auto_converge(receiver):
    with guest("random", 80e6, shared=8 * MB, anon=0) as g:
        rep = await run(g, receiver, max_bandwidth=20e6, nonconvergence_rounds=1, max_rounds=30,
                        auto_converge=True)
        assert rep.status == "completed", rep.reason
        assert rep.throttle_percent >= 20
        # converged by throttling, not forced by max_rounds
        assert rep.rounds < 30 and rep.expected_downtime_ms <= 300, (rep.rounds, rep.expected_downtime_ms)
        assert_images_equal_source(g, receiver.out_dir)


@pytest.mark.slow
async def test_receiver_killed_mid_migration(receiver):
    """The source is resumed and nothing is lost: the guest keeps running with its memory."""
    with guest("random", 10e6) as g:
        async with trio.open_nursery() as n:
            async def kill_soon():
                await session_started(receiver)
                receiver.kill()
            n.start_soon(kill_soon)
            rep = await run(g, receiver, max_bandwidth=20e6)
        assert rep.status == "failed"
        assert rep.source_state == "running" and process_state(g.pid) != "T"
        assert "receiver" in rep.reason or "connection" in rep.reason.lower(), rep.reason
        before = g.stats().writers["vcpu"].pages
        await await_until(lambda: g.stats().writers["vcpu"].pages > before, 10,
                          "the guest to write on after the receiver died")


@pytest.mark.slow
async def test_guest_exits_mid_migration(receiver):
    with guest("random", 10e6) as g:
        async with trio.open_nursery() as n:
            async def kill_soon():
                await session_started(receiver)
                os.killpg(g.pgid, signal.SIGKILL)
            n.start_soon(kill_soon)
            rep = await run(g, receiver, max_bandwidth=20e6)
        assert rep.status == "failed"
        assert f"process {g.pid}" in rep.reason and "exited" in rep.reason, rep.reason
        assert rep.source_state == "exited"
        assert manifest(receiver.out_dir)["complete"] is False


@pytest.mark.slow
async def test_cgroup_freezer_pauses_guest_and_writers(receiver, tmp_path):
    """--cgroup: the switch-over freezes the whole cgroup (v1 freezer) instead of signalling."""
    base = "/sys/fs/cgroup/freezer"
    require(os.path.exists(f"{base}/freezer.state") or os.path.isdir(base), "needs the cgroup v1 freezer")
    cg = f"{base}/migrator-test-{os.getpid()}"
    os.makedirs(cg, exist_ok=True)
    side = WorkloadSpec(kind="random", rate=10e6, seed=5)
    try:
        with guest("random", 20e6, pwrite=side) as g:
            for pid in g.pids:
                with open(f"{cg}/cgroup.procs", "w") as f:
                    f.write(str(pid))
            t = target_of(g)
            t.cgroup = cg
            rep = await migrate(t, "127.0.0.1", receiver.port, key=None,
                                policy=MigrationPolicy(max_bandwidth=300e6))
            assert rep.status == "completed", rep.reason
            assert open(f"{cg}/freezer.state").read().strip() == "FROZEN"
            assert_images_equal_source(g, receiver.out_dir)
            with open(f"{cg}/freezer.state", "w") as f:
                f.write("THAWED")
    finally:
        with open(f"{cg}/freezer.state", "w") as f:
            f.write("THAWED")
        for pid in open(f"{cg}/cgroup.procs").read().split():
            with open(f"{base}/cgroup.procs", "w") as f:
                f.write(pid)
        os.rmdir(cg)


@pytest.mark.slow
async def test_non_cooperating_guest_and_its_mapper_tracked_by_injected_write_protect(receiver):
    """A guest that made no userfaultfd, with a vhost-like writer mapping its memfd: migrator
    injects one into each (write-protect for the guest's private RAM, and on every mapper of the
    shared RAM), the ledger beside them; the copy is exact and no process keeps a userfaultfd."""
    side = WorkloadSpec(kind="random", rate=10e6, seed=5)
    spec = GuestSpec(shared_ram=32 * MB, anon_ram=8 * MB, uffd=False, vhost=side,
                     workload=WorkloadSpec(kind="random", rate=20e6, seed=3))
    with start_guest(spec) as g:
        vhost = g.writer_pids["vhost"]
        rep = await run(g, receiver, writers=[vhost], max_bandwidth=300e6, min_round_s=0.05,
                        downtime_limit_ms=50)
        assert rep.status == "completed", rep.reason
        assert rep.tracker == "wp+wp-mappers+ledger"
        assert f"pid {g.pid}: injected into thread {g.pid} in " in rep.tracker_detail, rep.tracker_detail
        assert f"pid {vhost}: injected into thread {vhost} in " in rep.tracker_detail, rep.tracker_detail
        assert rep.rounds >= 2
        assert_images_equal_source(g, receiver.out_dir)
        for pid in (g.pid, vhost):
            assert not [n for n in os.listdir(f"/proc/{pid}/fd")
                        if os.readlink(f"/proc/{pid}/fd/{n}") == "anon_inode:[userfaultfd]"]


@pytest.mark.slow
async def test_a_sweep_every_collect_that_overruns_the_limit_is_not_converging(receiver):
    """A pwrite writer makes every collect sweep the 64 MiB memfd (~5-15 ms); with a 1 ms limit
    the final collect alone overruns it, whatever the rounds: the migration stops, says why, and
    the guest runs on."""
    side = WorkloadSpec(kind="random", rate=5e6, seed=5)
    with guest("random", 1e6, shared=64 * MB, pwrite=side) as g:
        rep = await run(g, receiver, writers=g.writer_pids.values(), max_bandwidth=300e6,
                        min_round_s=0.05, downtime_limit_ms=1)
        assert rep.status == "not-converged", rep.reason
        pw = g.writer_pids["pwrite"]
        assert "the shmem ledger must sweep guest-ram (64 MiB) at every collect" in rep.reason, rep.reason
        assert f"process {pw} made" in rep.reason
        assert rep.source_state == "running" and process_state(g.pid) != "T"


@pytest.mark.slow
async def test_event_loop_never_blocked(receiver):
    """No task step of a whole migration (set-up, rounds with collects beside them, the pause,
    verification, settling) holds the event loop over 50 ms while sleeping in the kernel: every
    wait on a thread, a process or a retry goes through trio.to_thread.  (StallWatch tells a
    blocked step from one starved of CPU by its voluntary context switches; a step can still
    wait that long for the GIL on a loaded machine, so a migration with stalls is run once more,
    and only stalls in both runs fail.)"""
    runs = []
    for _ in range(2):
        watch = StallWatch(threshold_s=0.05)
        trio.lowlevel.add_instrument(watch)
        try:
            with guest("random", 20e6) as g:
                rep = await run(g, receiver, max_bandwidth=400e6, min_round_s=0.05,
                                downtime_limit_ms=50, auto_converge=True)
                assert rep.status == "completed", rep.reason
        finally:
            trio.lowlevel.remove_instrument(watch)
        assert watch.steps > 50          # (it watched the migration's steps)
        runs.append(watch.stalls)
        if not watch.stalls:
            break
    assert not all(runs), "\n".join(f"{s.wall_ms:.0f} ms ({s.voluntary_switches} sleeps) in {s.task}: "
                                     f"{s.where}" for r in runs for s in r)
