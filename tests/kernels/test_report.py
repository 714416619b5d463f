"""The kernel matrix's pure parts: pytest summary lines, probe JSON, the table, the module load
order and the initramfs archive format.  No VM is booted here."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import matrix_report as report  # noqa: E402  (tests/kernels/matrix_report.py: the pure parts)
import vmrun  # noqa: E402


# --- pytest summary lines ---------------------------------------------------------------------

@pytest.mark.parametrize("line, counts, secs", [
    ("============ 12 passed in 3.41s ============", {"passed": 12}, 3.41),
    ("==== 2 failed, 10 passed, 1 skipped in 0.50s ====",
     {"failed": 2, "passed": 10, "skipped": 1}, 0.50),
    ("1 failed, 3 passed, 2 errors in 1.00s", {"failed": 1, "passed": 3, "error": 2}, 1.0),
    ("== 1 error in 0.10s ==", {"error": 1}, 0.10),
    ("== 5 passed, 3 warnings in 61.02s (0:01:01) ==", {"passed": 5, "warning": 3}, 61.02),
    ("== 4 passed, 1 xfailed, 1 xpassed, 2 deselected in 2.00s ==",
     {"passed": 4, "xfailed": 1, "xpassed": 1, "deselected": 2}, 2.0),
    ("===== no tests ran in 0.01s =====", {}, 0.01),
])
def test_summary_line(line, counts, secs):
    s = report.parse_pytest_summary("collected 3 items\n\nsome output\n" + line + "\n")
    assert s is not None
    assert s.counts == counts
    assert s.seconds == secs


def test_summary_counts_failed_and_errors_together():
    s = report.parse_pytest_summary("== 2 failed, 7 passed, 1 error, 4 skipped in 3.00s ==")
    assert (s.passed, s.failed, s.skipped) == (7, 3, 4)


def test_summary_takes_the_last_line_and_ignores_colour():
    out = ("== 1 passed in 0.01s ==\n"
           "more output\n"
           "\x1b[31m\x1b[1m==== 3 failed, \x1b[32m1 passed in 0.20s\x1b[0m\x1b[31m ====\x1b[0m\n"
           "@@migrator-vm: done rc=1\n")
    s = report.parse_pytest_summary(out)
    assert s.counts == {"failed": 3, "passed": 1}


@pytest.mark.parametrize("out", [
    "",
    "collected 10 items\ntests/test_x.py ..F",            # killed before the summary
    "3 passed, something else\n",
    "Segmentation fault (core dumped)\n",
])
def test_no_summary(out):
    assert report.parse_pytest_summary(out) is None


# --- probe JSON -----------------------------------------------------------------------------

def test_probe_lists_and_bools():
    doc = {"kernel": {"release": "6.1.0-56-amd64", "machine": "x86_64"},
           "features": {"soft_dirty": True, "uffd_wp_async": False, "pagemap_scan": False},
           "trackers": ["softdirty", "fullhash"], "auto": "softdirty"}
    row = report.parse_probe(json.dumps(doc))
    assert row.release == "6.1.0-56-amd64"
    assert row.features == {"soft_dirty": True, "uffd_wp_async": False, "pagemap_scan": False}
    assert row.trackers == ["softdirty", "fullhash"]
    assert row.auto == "softdirty"


def test_probe_objects():
    doc = {"release": "6.12.117+deb12-amd64",
           "features": {"soft_dirty": {"supported": True, "detail": "bit 55 set"},
                        "uffd_wp_async": {"supported": True},
                        "pagemap_scan": {"available": False, "errno": 25}},
           "trackers": {"writeprotect": {"usable": False, "why": "no PAGEMAP_SCAN"},
                        "softdirty": {"usable": True}, "fullhash": True},
           "auto": {"tracker": "softdirty", "exact": True}}
    row = report.parse_probe(doc)
    assert row.release == "6.12.117+deb12-amd64"
    assert row.features == {"soft_dirty": True, "uffd_wp_async": True, "pagemap_scan": False}
    assert row.trackers == ["softdirty", "fullhash"]
    assert row.auto == "softdirty"


def test_probe_tracker_objects_in_a_list():
    row = report.parse_probe({"features": {}, "trackers": [{"name": "writeprotect", "usable": True},
                                                           {"name": "softdirty", "usable": False}]})
    assert row.trackers == ["writeprotect"]
    assert row.release is None and row.auto is None and row.features == {}
    assert row.derived is False


def _flat(**supported):
    return {k: {"supported": v, "detail": f"{k} detail"} for k, v in supported.items()}


def test_probe_flat_shape_of_migrator_probe():
    """`migrator probe --json` as it is: one {"supported", "detail"} object per feature."""
    doc = _flat(soft_dirty=True, pagemap_scan=False, uffd_wp_async_anon=False,
                uffd_wp_async_shmem=False, pidfd_getfd=True, map_files=True, swap_active=True,
                thp=False)
    row = report.parse_probe(json.dumps(doc, indent=2))
    assert row.features == {"soft_dirty": True, "pagemap_scan": False, "uffd_wp_async_anon": False,
                            "uffd_wp_async_shmem": False, "pidfd_getfd": True, "map_files": True,
                            "swap_active": True, "thp": False}
    assert row.release is None
    assert (row.trackers, row.auto, row.derived) == (["soft-dirty", "hash"], "soft-dirty", True)


@pytest.mark.parametrize("sd, wp, pidfd, trackers", [
    (True, True, True, ["wp", "soft-dirty", "hash"]),
    (False, True, True, ["wp", "hash"]),
    (True, True, False, ["soft-dirty", "hash"]),     # wp needs pidfd_getfd too
    (True, False, True, ["soft-dirty", "hash"]),
    (False, False, False, ["hash"]),
])
def test_derived_trackers(sd, wp, pidfd, trackers):
    feats = {"soft_dirty": sd, "uffd_wp_async_anon": wp, "pagemap_scan": wp, "pidfd_getfd": pidfd}
    assert report.derive_trackers(feats) == (trackers, trackers[0])


def test_probe_without_features_is_unreadable():
    with pytest.raises(ValueError):
        report.parse_probe({"usage": "migrator probe [--json]"})


def test_probe_not_an_object():
    with pytest.raises(ValueError):
        report.parse_probe("[1, 2]")
    with pytest.raises(json.JSONDecodeError):
        report.parse_probe("migrator: error: no such command")


def test_expectations():
    row = report.ProbeRow(features={"soft_dirty": True, "uffd_wp_async_anon": True})
    assert report.expectation_errors(row, {"soft_dirty": True, "uffd_wp_async_anon": True}) == []
    assert report.expectation_errors(row, {"soft_dirty": False, "pagemap_scan": False}) == [
        "soft_dirty: probe says yes, this kernel does not have it",
        "pagemap_scan: not reported by the probe (expected no)",
    ]
    assert report.expectation_errors(row, {"soft_dirty": True, "pagemap_scan": False},
                                     strict=False) == []


def test_kernel_classes():
    keys = {"soft_dirty", "pagemap_scan", "uffd_wp_async_anon", "uffd_wp_async_shmem",
            "pidfd_getfd", "map_files", "swap_active"}
    for k in vmrun.KERNELS.values():
        assert set(k.expect) == keys, k.name
        # the class's auto choice follows from its features by make_tracker's rule
        assert report.derive_trackers(k.expect)[1] == k.auto, k.name
    assert vmrun.KERNELS["host"].package_re is None
    assert [k.auto for k in vmrun.KERNELS.values()] == ["wp", "wp", "soft-dirty"]
    assert [k.expect["soft_dirty"] for k in vmrun.KERNELS.values()] == [False, True, True]
    assert [k.expect["pagemap_scan"] for k in vmrun.KERNELS.values()] == [True, True, False]


# --- the table ------------------------------------------------------------------------------

def test_table_rows_and_verdicts():
    ok = report.KernelResult("debian-6.12", "6.12.117+deb12-amd64",
                             probe=report.ProbeRow(trackers=["writeprotect", "softdirty"],
                                                   auto="writeprotect"),
                             tests=report.PytestSummary({"passed": 40, "skipped": 2}), seconds=61.4)
    failed = report.KernelResult("debian-6.1", "6.1.0-56-amd64",
                                 probe=report.ProbeRow(trackers=["softdirty"], auto="softdirty"),
                                 tests=report.PytestSummary({"passed": 39, "failed": 1}), seconds=70)
    noboot = report.KernelResult("debian-6.6", status="boot failed: no shell inside after 120s",
                                 seconds=120)
    empty = report.KernelResult("host", "6.18", tests=report.PytestSummary({}))
    assert [r.ok for r in (ok, failed, noboot, empty)] == [True, False, False, False]
    lines = report.render_table([ok, failed, noboot, empty]).splitlines()
    assert len(lines) == 6
    assert lines[0].split() == ["kernel", "release", "trackers", "(probe)", "auto", "passed",
                                "failed", "skipped", "time", "result"]
    assert lines[2].split() == ["debian-6.12", "6.12.117+deb12-amd64", "writeprotect,softdirty",
                                "writeprotect", "40", "0", "2", "61s", "PASS"]
    assert lines[3].split() == ["debian-6.1", "6.1.0-56-amd64", "softdirty", "softdirty", "39",
                                "1", "0", "70s", "FAIL"]
    assert lines[4].split() == ["debian-6.6", "?", "-", "-", "-", "-", "-", "120s", "FAIL:",
                                "boot", "failed:", "no", "shell", "inside", "after", "120s"]
    assert lines[5].split()[-1] == "FAIL"


# --- packages, modules, initramfs -----------------------------------------------------------

def test_pick_package_compares_numbers():
    names = ["linux-image-6.12.99+deb12-amd64", "linux-image-6.12.117+deb12-amd64",
             "linux-image-6.12.117+deb12-cloud-amd64", "linux-image-6.12.117+deb12-amd64-dbg",
             "linux-image-6.1.0-9-amd64", "linux-image-6.1.0-56-amd64", "linux-image-6.1.0-100-rt-amd64"]
    assert vmrun.pick_package(names, vmrun.KERNELS["debian-6.12"].package_re) == \
        "linux-image-6.12.117+deb12-amd64"
    assert vmrun.pick_package(names, vmrun.KERNELS["debian-6.1"].package_re) == \
        "linux-image-6.1.0-56-amd64"
    assert vmrun.pick_package(names, r"linux-image-5\.10\.\d+-amd64") is None


def test_load_order(tmp_path):
    (tmp_path / "modules.dep").write_text(
        "kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz\n"
        "kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/virtio/virtio.ko.xz\n"
        "kernel/net/9p/9pnet.ko.xz: kernel/fs/netfs/netfs.ko.xz\n"
        "kernel/fs/netfs/netfs.ko.xz:\n"
        "kernel/virtio/virtio.ko.xz:\n"
        "kernel/drivers/block/zram/zram.ko.xz: kernel/mm/zsmalloc.ko.xz\n")
    (tmp_path / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    by_name, deps, builtin = vmrun.read_modules(tmp_path)
    assert builtin == {"virtio_pci"}
    assert by_name["9pnet_virtio"] == "kernel/net/9p/9pnet_virtio.ko.xz"
    order = vmrun.load_order(["virtio-pci", "9pnet_virtio", "9p"], by_name, deps, builtin)
    assert order == ["kernel/fs/netfs/netfs.ko.xz", "kernel/net/9p/9pnet.ko.xz",
                     "kernel/virtio/virtio.ko.xz", "kernel/net/9p/9pnet_virtio.ko.xz",
                     "kernel/fs/9p/9p.ko.xz"]
    with pytest.raises(vmrun.VMError):
        vmrun.load_order(["overlay"], by_name, deps, builtin)


def test_cpio_newc_layout():
    c = vmrun.Cpio()
    c.dir("bin")
    c.file("init", b"#!/bin/sh\n", 0o755)
    c.symlink("bin/sh", "busybox")
    c.chardev("dev/console", 5, 1)
    data = c.finish()
    assert len(data) % 4 == 0
    # every header starts on a 4-byte boundary with the newc magic; the names in order
    names, off = [], 0
    while True:
        assert data[off:off + 6] == b"070701"
        fields = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = data[off + 110: off + 110 + namesize - 1].decode()
        names.append((name, fields[1], filesize, fields[9], fields[10]))
        off = off + 110 + namesize
        off += -off % 4
        body = data[off: off + filesize]
        off += filesize
        off += -off % 4
        if name == "TRAILER!!!":
            break
        if name == "init":
            assert body == b"#!/bin/sh\n"
        if name == "bin/sh":
            assert body == b"busybox"
    assert off == len(data)
    assert names == [("bin", 0o040755, 0, 0, 0), ("init", 0o100755, 10, 0, 0),
                     ("bin/sh", 0o120777, 7, 0, 0), ("dev/console", 0o020600, 0, 5, 1),
                     ("TRAILER!!!", 0, 0, 0, 0)]


def test_long_failures_are_cut_in_the_table():
    r = report.KernelResult("debian-6.1", status="fetch failed: E: Unable to locate package\nE: "
                            "Couldn't find any package by glob 'linux-image-6.1.0-999-amd64'")
    line = report.render_table([r]).splitlines()[2]
    assert line.endswith("FAIL: fetch failed: E: Unable to locate package E: Couldn't fin...")
    assert len(line.split("FAIL: ", 1)[1]) == 60


# --- a guest kernel that dies in its own boot is booted once more ------------------------------
# A real panic cannot be had on demand, so run_command is replaced by one returning the RunResults
# a panicking and a good boot give (the console lines are the ones CI printed on 2026-12-03).

PANIC_CONSOLE = """[    2.419747] PKRU: 55555554
[    2.419929] Kernel panic - not syncing: Fatal exception in interrupt
[    4.718148] Shutting down cpus with NMI"""


def _result(kernel, tmp_path, *, booted: bool, n: int):
    out = tmp_path / f"out{n}"
    out.mkdir()
    if not booted:
        return vmrun.RunResult(kernel, None, None, "", PANIC_CONSOLE, None, 8.0,
                               "boot failed (qemu exit status 0)", out)
    (out / "probe.json").write_text(json.dumps({
        "release": "6.12.0-test", "auto": "wp",
        "features": {"soft_dirty": False, "uffd_wp_async": True, "pagemap_scan": True}}))
    return vmrun.RunResult(kernel, 0, "6.12.0-test", "== 3 passed in 1.00s ==\n", "booted", 9.5,
                           40.0, None, out)


def test_boot_crash_names_the_panic():
    assert vmrun.boot_crash(PANIC_CONSOLE) == "Kernel panic - not syncing: Fatal exception in interrupt"
    assert vmrun.boot_crash("[ 1.0] all fine\nmigrator-vm booted") is None


@pytest.mark.parametrize("boots, rows_ok, runs", [
    ([False, True], True, 2),      # panicked once, then booted: the row passes, with a note
    ([False, False], False, 2),    # panicked twice: the row fails, booted only twice
    ([True], True, 1),             # booted at once: one run
])
def test_matrix_boots_again_after_a_boot_crash(monkeypatch, tmp_path, boots, rows_ok, runs):
    calls = []

    def fake_run_command(name, cmd, **kw):
        calls.append(name)
        return _result(name, tmp_path, booted=boots[len(calls) - 1], n=len(calls))

    monkeypatch.setattr(vmrun, "run_command", fake_run_command)
    monkeypatch.setattr(vmrun, "judge", lambda kr, res, k, standin=False: (
        setattr(kr, "status", "ok" if res.rc == 0 else (res.failure or "no result")),
        setattr(kr, "tests", report.parse_pytest_summary(res.output))))
    log_dir = tmp_path / "logs"
    [row] = vmrun.run_matrix(["debian-6.12"], python="py", probe="migrator", tests=["t.py"],
                             pytest_args=[], timeout=60, log_dir=log_dir)
    assert len(calls) == runs
    assert row.ok is rows_ok
    crashed = [n for n in row.notes if n.startswith("boot 1 failed")]
    if boots[0]:
        assert crashed == [] and not (log_dir / "debian-6.12.boot1.log").exists()
    else:
        assert crashed == ["boot 1 failed (Kernel panic - not syncing: Fatal exception in "
                           "interrupt); booted again"]
        assert (log_dir / "debian-6.12.boot1.log").read_text() == PANIC_CONSOLE
