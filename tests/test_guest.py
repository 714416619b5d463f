"""The guest on real processes: start line and maps, pause, rates measured by changed pages,
pattern shapes (exact, against a model of the generator), the checker on real memory, the pager.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import require, swap_active
from guest_model import Model, stamps
from waiting import wait_until
from migrator.guest import GuestSpec, PageoutRange, WorkloadSpec, changed_pages, start_guest, verify_image
from migrator.guest.stamp import stamp_page, WRITER_POPULATE, REGION_ANON, REGION_SHARED, WRITER_PWRITE, WRITER_VCPU, WRITER_VHOST

PS = 4096
M = 1 << 20
MAGIC = 0x4750474D


def wait_for(cond, what: str, limit: float = 10.0) -> None:
    """Poll cond() until true (a condition, not a fixed sleep)."""
    wait_until(cond, limit, what, interval_s=0.002)


def hold(seconds: float) -> None:
    """Let the clock run: the time itself is under test (the interval over which pages are
    counted, or over which a paused guest must write nothing), not a wait for an event."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(end - time.monotonic())


def maps_lines(pid: int) -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return f.read().splitlines()


def test_start_line_maps_tail_and_uffd():
    spec = GuestSpec(shared_ram=16 * M, anon_ram=4 * M, shared_tail=1 * M, anon_tail=256 * 1024,
                     workload=WorkloadSpec("random", 20e6, seed=5),
                     vhost=WorkloadSpec("random", 4e6), pwrite=WorkloadSpec("sweep", 4e6),
                     pager_interval=30.0, pager_ranges=(PageoutRange("anon", 0, 64 * 1024),),
                     uffd=True)
    with start_guest(spec) as g:
        info = g.info
        assert info["page_size"] == PS and info["pid"] == g.pid == g.pgid
        sh, an = g.regions["guest-ram"], g.regions["anon"]
        assert (sh.kind, sh.size, sh.end - sh.start, sh.populated) == ("shared", 16 * M, 16 * M, 15 * M)
        assert (an.kind, an.size, an.end - an.start, an.populated) == ("anon", 4 * M, 4 * M, 3840 * 1024)
        assert sorted(g.writer_pids) == ["pager", "pwrite", "vhost"]
        for pid in g.writer_pids.values():
            assert os.getpgid(pid) == g.pgid
        lines = maps_lines(g.pid)
        memfd = [l for l in lines if l.endswith("/memfd:guest-ram (deleted)")]
        assert len(memfd) == 1 and memfd[0].split()[0] == f"{sh.start:x}-{sh.end:x}"
        assert memfd[0].split()[1] == "rw-s"
        anon = [l for l in lines if l.split()[0] == f"{an.start:x}-{an.end:x}"]
        assert len(anon) == 1 and anon[0].split()[1] == "rw-p" and len(anon[0].split()) == 5
        assert os.readlink(f"/proc/{g.pid}/fd/{g.uffd_fd}") == "anon_inode:[userfaultfd]"
        # the vhost writer maps the same memfd
        assert any(l.endswith("/memfd:guest-ram (deleted)") for l in maps_lines(g.writer_pids["vhost"]))
        wait_for(lambda: all(g.stats().writers[k].pages > 10 for k in ("vcpu", "vhost", "pwrite")),
                 "every writer to write")
        g.pause()
        img, aimg = g.read_region("guest-ram"), g.read_region("anon")
        res = verify_image(img, "guest-ram")
        assert res.ok and res.counts == {"ok": 3840, "zero": 256}
        assert img[15 * M:] == bytes(M)
        res = verify_image(aimg, "anon")
        assert res.ok and res.counts == {"ok": 960, "zero": 64}
        # every writer left stamps in its own area only
        by_writer = {}
        for i, (magic, region, writer, index, seq) in enumerate(stamps(img)):
            if magic == MAGIC:
                assert (region, index) == (REGION_SHARED, i)
                by_writer.setdefault(writer, []).append(i)
        areas = sh.areas
        assert all(areas["vhost"][0] <= i < areas["vhost"][1] for i in by_writer[WRITER_VHOST])
        assert all(areas["pwrite"][0] <= i < areas["pwrite"][1] for i in by_writer[WRITER_PWRITE])
        assert all(i < areas["vcpu"][1] for i in by_writer[WRITER_VCPU])
        g.resume()
        status = g.stop()
    assert status == 0
    for pid in [g.pid, *g.writer_pids.values()]:
        assert not os.path.exists(f"/proc/{pid}")


def test_pause_stops_every_writer():
    spec = GuestSpec(shared_ram=32 * M, anon_ram=8 * M, workload=WorkloadSpec("random", 200e6, seed=1),
                     vhost=WorkloadSpec("random", 50e6, seed=2), pwrite=WorkloadSpec("random", 50e6, seed=3))
    with start_guest(spec) as g:
        wait_for(lambda: all(w.pages > 100 for w in g.stats().writers.values()), "all writers writing")
        g.pause()
        for pid in g.pids:
            with open(f"/proc/{pid}/stat") as f:
                assert f.read().rsplit(")", 1)[1].split()[0] == "T"
        s0 = g.stats()
        h0 = (g.page_hashes("guest-ram"), g.page_hashes("anon"))
        hold(0.3)                     # (nothing may change while paused: the time is the test)
        h1 = (g.page_hashes("guest-ram"), g.page_hashes("anon"))
        s1 = g.stats()
        assert h0 == h1
        assert {k: w.pages for k, w in s0.writers.items()} == {k: w.pages for k, w in s1.writers.items()}
        g.resume()
        wait_for(lambda: all(g.stats().writers[k].pages > s1.writers[k].pages for k in s1.writers),
                 "every writer to write again")
        h2 = (g.page_hashes("guest-ram"), g.page_hashes("anon"))
        assert sum(changed_pages(h1[0], h2[0])) > 0 and sum(changed_pages(h1[1], h2[1])) > 0


def measured_rate(g, region: str, area: tuple[int, int], kind: str, seconds: float) -> float:
    """Bytes/s written into area, from the pages that changed while the guest ran `seconds`
    (hashes taken while paused; random writes corrected for pages written twice)."""
    g.pause()
    h0 = g.page_hashes(region)
    g.resume()
    t0 = time.monotonic()
    hold(seconds)
    t1 = time.monotonic()
    g.pause()
    h1 = g.page_hashes(region)
    g.resume()
    changed = sum(changed_pages(h0, h1)[area[0]:area[1]])
    n = area[1] - area[0]
    writes = changed if kind == "sweep" else -n * math.log(1 - changed / n)
    return writes * PS / (t1 - t0)


@pytest.mark.slow
@pytest.mark.parametrize("writer,kind,rate,size,seconds", [
    ("vcpu", "sweep", 4e6, 16 * M, 0.5),
    ("vcpu", "random", 100e6, 64 * M, 0.5),
    ("vcpu", "sweep", 1e9, 512 * M, 0.3),
    ("vhost", "sweep", 20e6, 64 * M, 0.5),
    ("pwrite", "random", 20e6, 64 * M, 0.5),
])
def test_rate_within_20_percent(writer, kind, rate, size, seconds):
    ws = WorkloadSpec(kind, rate, seed=11)
    spec = GuestSpec(shared_ram=size, anon_ram=0, target="shared",
                     workload=ws if writer == "vcpu" else WorkloadSpec("idle"),
                     **({writer: ws} if writer != "vcpu" else {}))
    with start_guest(spec) as g:
        area = g.regions["guest-ram"].areas[writer]
        got = measured_rate(g, "guest-ram", area, kind, seconds)
        assert 0.8 * rate <= got <= 1.2 * rate, f"{got / 1e6:.1f} MB/s for {rate / 1e6:.1f} MB/s"


@pytest.mark.slow
def test_set_rate_while_running():
    spec = GuestSpec(shared_ram=64 * M, anon_ram=0, workload=WorkloadSpec("sweep", 0, seed=1))
    with start_guest(spec) as g:
        area = g.regions["guest-ram"].areas["vcpu"]
        assert measured_rate(g, "guest-ram", area, "sweep", 0.2) == 0
        g.set_rate(40e6)
        got = measured_rate(g, "guest-ram", area, "sweep", 0.5)
        assert 32e6 <= got <= 48e6


def paused_stamps(g, region: str):
    g.pause()
    return stamps(g.read_region(region)), g.stats()


def test_sweep_writes_every_page_in_order():
    spec = GuestSpec(shared_ram=8 * M, anon_ram=1 * M, target="both",
                     workload=WorkloadSpec("sweep", 20e6, seed=1))
    with start_guest(spec) as g:
        wait_for(lambda: g.stats().writers["vcpu"].pages > 2500, "more than a full pass")
        st_sh, stats = paused_stamps(g, "guest-ram")
        st_an = stamps(g.read_region("anon"))
    n_sh, total = 2048, 2048 + 256
    last = stats.writers["vcpu"].last_seq
    assert last > total
    # page p of the page space (shared, then anon) last got seq s with (s - 1) % total == p
    pages = [(REGION_SHARED, i, s) for i, s in enumerate(st_sh)] + \
            [(REGION_ANON, i, s) for i, s in enumerate(st_an)]
    for p, (region, i, (magic, reg, writer, index, seq)) in enumerate(pages):
        assert (magic, reg, writer, index) == (MAGIC, region, WRITER_VCPU, i)
        assert seq == last - ((last - 1 - p) % total)
    assert n_sh == len(st_sh)


def test_counter_rewrites_only_the_header():
    """counter: the pages in order as sweep, but only a page's 32-byte header changes: its body
    stays the one the guest's populate stamped (writer populate, seq 0)."""
    spec = GuestSpec(shared_ram=8 * M, anon_ram=0, target="shared",
                     workload=WorkloadSpec("counter", 20e6, seed=1))
    with start_guest(spec) as g:
        wait_for(lambda: g.stats().writers["vcpu"].pages > 2 * 2048 + 100, "more than two passes")
        g.pause()
        mem, stats = g.read_region("guest-ram"), g.stats()
    st = stamps(mem)
    last = stats.writers["vcpu"].last_seq
    for p, (magic, reg, writer, index, seq) in enumerate(st):
        assert (magic, reg, writer, index) == (MAGIC, REGION_SHARED, WRITER_VCPU, p)
        assert seq == last - ((last - 1 - p) % 2048) and seq > 2048
        first = stamp_page(REGION_SHARED, WRITER_POPULATE, p, 0)
        assert mem[p * 4096 + 32:(p + 1) * 4096] == first[32:]
    assert verify_image(mem, "guest-ram").ok


@pytest.mark.parametrize("kind", ["random", "hotcold"])
def test_pattern_is_exactly_the_seeded_sequence(kind):
    ws = WorkloadSpec(kind, 40e6, seed=1234, hot_fraction=0.1, hot_share=0.9)
    spec = GuestSpec(shared_ram=16 * M, anon_ram=0, target="shared", workload=ws)
    with start_guest(spec) as g:
        wait_for(lambda: g.stats().writers["vcpu"].pages > 1500, "writes")
        st, stats = paused_stamps(g, "guest-ram")
        hot = tuple(g.info["workload"]["hot"] or (0, 0))
    n = len(st)
    last = stats.writers["vcpu"].last_seq
    expect = Model(kind, 1234, WRITER_VCPU, n, hot, 0.9).last_writes(last)
    got = {i: s[4] for i, s in enumerate(st) if s[2] == WRITER_VCPU}
    assert got == expect
    assert all(s[4] == 0 and s[2] == 0 for i, s in enumerate(st) if i not in expect)
    if kind == "hotcold":
        assert hot[1] - hot[0] == round(0.1 * n)
        model = Model(kind, 1234, WRITER_VCPU, n, hot, 0.9)
        picks = [model.pick() for _ in range(last)]
        share = sum(hot[0] <= p < hot[1] for p in picks) / last
        assert 0.87 <= share <= 0.93
        # the hot set is really hot: pages changed per page, hot vs cold, from memory alone
        hot_frac = sum(hot[0] <= i < hot[1] for i in got) / (hot[1] - hot[0])
        cold_frac = sum(not hot[0] <= i < hot[1] for i in got) / (n - (hot[1] - hot[0]))
        assert hot_frac > 20 * cold_frac


def test_checker_on_real_memory_flipped_byte_and_stale_page(tmp_path):
    spec = GuestSpec(shared_ram=8 * M, anon_ram=0, workload=WorkloadSpec("random", 40e6, seed=9))
    with start_guest(spec) as g:
        g.pause()
        before = g.read_region("guest-ram")
        g.resume()
        c = g.stats().writers["vcpu"].pages
        wait_for(lambda: g.stats().writers["vcpu"].pages > c + 500, "writes")
        g.pause()
        final = g.read_region("guest-ram")
        assert g.save_region("guest-ram", tmp_path / "final") == len(final)
    assert verify_image(final, "guest-ram", tmp_path / "final").counts == {"ok": 2048}
    old = [i for i in range(2048) if before[i * PS:(i + 1) * PS] != final[i * PS:(i + 1) * PS]]
    stale_page, flip_page = old[len(old) // 2], 77
    img = bytearray(final)
    img[stale_page * PS:(stale_page + 1) * PS] = before[stale_page * PS:(stale_page + 1) * PS]
    img[flip_page * PS + 2000] ^= 0x40
    res = verify_image(bytes(img), "guest-ram", final)
    assert sorted((f.page, f.status) for f in res.findings) == sorted([(stale_page, "stale"), (flip_page, "corrupt")])
    stale = next(f for f in res.findings if f.status == "stale")
    assert stale.expected_writer == "vcpu" and stale.seq < stale.expected_seq
    # without the expected image, the stale page is consistent: only the flip shows
    assert [(f.page, f.status) for f in verify_image(bytes(img), "guest-ram").findings] == [(flip_page, "corrupt")]


def count_present(pid: int, start: int, npages: int) -> int:
    from migrator.guest._native import lib
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        return lib.mg_count_present(fd, start, npages, PS)
    finally:
        os.close(fd)


def test_pager_pushes_out_but_not_pages_the_vhost_writer_maps():
    """MADV_PAGEOUT skips pages mapped by more than one process.  The vhost writer maps the
    whole memfd but faults in only the pages of its area; once both it and the guest map a page,
    the pager cannot push that page out of the guest.  Everything else goes out; contents
    survive (swap)."""
    require(swap_active(), "needs active swap (MADV_PAGEOUT of shmem and anon writes to swap)")
    spec = GuestSpec(shared_ram=8 * M, anon_ram=2 * M, workload=WorkloadSpec("idle"),
                     vhost=WorkloadSpec("sweep", 200e6), vhost_size=256 * 1024, pager_interval=0.05)
    with start_guest(spec) as g:
        sh, an = g.regions["guest-ram"], g.regions["anon"]
        vs, ve = sh.areas["vhost"]
        wait_for(lambda: g.stats().writers["vhost"].pages >= ve - vs, "vhost to touch its whole area")
        r = g.stats().writers["pager"].rounds
        wait_for(lambda: g.stats().writers["pager"].rounds >= r + 1, "a pager round")
        # fault every shared page back into the guest's page table (a read through /proc/PID/mem)
        fd = os.open(f"/proc/{g.pid}/mem", os.O_RDONLY)
        try:
            assert len(os.pread(fd, sh.size, sh.start)) == sh.size
        finally:
            os.close(fd)
        # pages still in a per-CPU LRU batch are skipped by a round: the next ones get them
        wait_for(lambda: count_present(g.pid, sh.start, vs) == 0, "the guest-only pages to go out")
        r = g.stats().writers["pager"].rounds
        wait_for(lambda: g.stats().writers["pager"].rounds >= r + 2, "two more pager rounds")
        # The vhost writer stops writing first: a SIGSTOP can land between the stores of a
        # page's stamp, and the stamp check below would count that torn page as corrupt.
        # Two of its rate slices after the rate went to 0, no write is in progress.
        g.set_rate(0, "vhost")
        r = g.stats().writers["vhost"].rounds
        wait_for(lambda: g.stats().writers["vhost"].rounds >= r + 2, "the vhost writer to go idle")
        g.pause()
        assert count_present(g.pid, sh.start, vs) == 0
        assert count_present(g.pid, an.start, an.size // PS) == 0
        assert count_present(g.pid, sh.start + vs * PS, ve - vs) == ve - vs
        assert g.stats().writers["pager"].not_present == vs + an.size // PS
        assert verify_image(g.read_region("guest-ram"), "guest-ram").counts == {"ok": 2048}
        assert verify_image(g.read_region("anon"), "anon").counts == {"ok": 512}


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "migrator", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args,message", [
    (["guest", "--shared-ram", "12Q"], "migrator: error: bad size '12Q'"),
    (["guest", "--rate", "10MB"], "migrator: error: bad rate '10MB'"),
    (["guest", "--workload", "bursty"], "migrator: error: unknown workload 'bursty'"),
    (["guest", "--shared-ram", "1M", "--tail", "2M"], "migrator: error: a never-touched tail"),
    (["guest", "--pager-interval", "x"], "migrator: error: bad number 'x'"),
    (["guest", "--pager-interval", "1", "--pageout", "disk:0:4M"], "migrator: error: pageout range names"),
    (["guest", "--anon-ram", "1M", "--pageout", "anon:0:2M"], "migrator: error: pageout range anon:0"),
])
def test_cli_bad_input_is_one_line(args, message):
    r = run_cli(*args)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith(message)


@pytest.mark.slow
def test_cli_guest_then_verify(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "migrator", "guest", "--shared-ram", "4M",
                          "--anon-ram", "1M", "--workload", "sweep", "--rate", "20000pages/s",
                          "--seed", "3", "--vhost-rate", "1MB/s"], stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(p.stdout.readline())
        assert [r["name"] for r in info["regions"]] == ["guest-ram", "anon"]
        assert [w["kind"] for w in info["writers"]] == ["vhost"]
        assert info["uffd_fd"] is None and info["workload"]["rate"] == 20000 * PS
        os.killpg(info["pgid"], signal.SIGSTOP)
        fd = info["regions"][0]["fd"]
        with open(f"/proc/{info['pid']}/fd/{fd}", "rb") as f:
            img = bytearray(f.read())
        os.killpg(info["pgid"], signal.SIGCONT)
    finally:
        p.terminate()
        assert p.wait(10) == 0
    (tmp_path / "good").write_bytes(img)
    img[5 * PS + 100] ^= 1
    (tmp_path / "bad").write_bytes(img)
    r = run_cli("verify", str(tmp_path / "good"))
    assert r.returncode == 0 and "OK" in r.stdout
    r = run_cli("verify", str(tmp_path / "bad"), "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 1 and [(f["page"], f["status"]) for f in out["findings"]] == [(5, "corrupt")]
    r = run_cli("verify", str(tmp_path / "bad"), "--expected", str(tmp_path / "good"))
    assert r.returncode == 1 and "page 5: corrupt" in r.stdout


def test_uffd_lets_a_tracker_see_the_vcpu_writes():
    """The guest's userfaultfd (created in its mm) taken with pidfd_getfd, registered for async
    write-protect: PAGEMAP_SCAN reports exactly the pages the vcpu wrote."""
    from migrator.kernel.native import ffi, lib

    spec = GuestSpec(shared_ram=4 * M, anon_ram=4 * M, target="anon",
                     workload=WorkloadSpec("sweep", 0), uffd=True)
    with start_guest(spec) as g:
        an = g.region("anon")
        pidfd = lib.mg_pidfd_open(g.pid)
        uffd = lib.mg_pidfd_getfd(pidfd, g.uffd_fd)
        assert pidfd >= 0 and uffd >= 0
        pm = os.open(f"/proc/{g.pid}/pagemap", os.O_RDONLY)
        try:
            wp_async, wp_unpopulated = 1 << 15, 1 << 13
            assert lib.mg_uffd_api(uffd, wp_async | wp_unpopulated, ffi.NULL, ffi.NULL) == 0
            assert lib.mg_uffd_register_wp(uffd, an.start, an.size) == 0
            assert lib.mg_uffd_writeprotect(uffd, an.start, an.size, 1) == 0
            vec = ffi.new("struct mg_page_region[]", 256)
            written = 1 << 1

            def scan() -> int:
                bm = ffi.new("uint8_t[]", an.size // PS // 8)
                return lib.mg_pagemap_scan_bitmap(pm, an.start, an.end, 1, written, written, PS,
                                                  vec, 256, bm, ffi.NULL)

            assert scan() == 0
            g.set_rate(200 * PS)
            wait_for(lambda: g.stats().writers["vcpu"].pages >= 20, "writes")
            g.pause()
            assert scan() == g.stats().writers["vcpu"].pages
        finally:
            os.close(pm)
            os.close(uffd)
            os.close(pidfd)
