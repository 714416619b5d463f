"""The public API (migrator/__init__.py, docs/api.md): its names are pinned here, and a real
migration runs through it alone (a real guest process, an in-process Receiver on loopback, the
destination checked byte for byte against the paused source)."""

import os
import subprocess
import sys

import pytest

import migrator
from migrator.scenarios.destination import compare_with_source

PUBLIC = ["Address", "AuthError", "Capabilities", "Feature", "Guest", "GuestSpec", "MigrationPolicy",
          "MigrationReport", "MigratorError", "ProtocolError", "Receiver", "RegionError",
          "RoundStats", "SessionOutcome", "StopToken", "TargetGoneError", "TransportError",
          "UnsupportedError", "UsageError", "WorkloadSpec", "__version__", "generate_key_file",
          "load_key", "migrate", "probe", "start_guest"]

SCENARIOS_PUBLIC = ["Check", "Comparison", "RunResult", "Scenario", "ScenarioOutcome", "SuiteResult",
                    "compare", "convergence_svg", "junit_xml", "load_baseline", "load_scenario",
                    "parse_scenario", "resolve", "run", "run_once", "run_suite", "save_baseline",
                    "suite_dir", "summary_markdown", "write_reports"]


def test_exported_names_are_pinned_and_documented():
    assert sorted(migrator.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        obj = getattr(migrator, name)
        if name not in ("__version__", "Address"):
            assert (obj.__doc__ or "").strip(), f"migrator.{name} has no docstring"
    import migrator.scenarios as scn
    assert sorted(scn.__all__) == sorted(SCENARIOS_PUBLIC)
    for name in SCENARIOS_PUBLIC:
        assert (getattr(scn, name).__doc__ or "").strip(), f"migrator.scenarios.{name} has no docstring"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        migrator.nope


def test_import_migrator_loads_no_data_path_module():
    # the CLI's start-up imports the package: its names load on first use only
    out = subprocess.run([sys.executable, "-c", "import sys, migrator; "
                          "print(sorted(m for m in sys.modules if m.startswith('migrator.')))"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


async def test_migrate_a_guest_through_the_public_api(tmp_path):
    key = migrator.generate_key_file(tmp_path / "k")
    assert key == migrator.load_key(tmp_path / "k")
    with migrator.start_guest(shared_ram="32M", anon_ram="16M", workload="random", rate="2MB/s",
                              seed=5) as g:
        assert isinstance(g, migrator.Guest)
        async with migrator.Receiver(tmp_path / "dest", key=key) as rx:
            assert rx.address == f"127.0.0.1:{rx.port}" and rx.port > 0
            rep = await migrator.migrate(pid=g.pid, regions=g.selectors(), to=rx,
                                         writers=list(g.writer_pids.values()),
                                         policy=migrator.MigrationPolicy(downtime_limit_ms=300,
                                                                         verify="memory"))
            assert isinstance(rep, migrator.MigrationReport)
            assert rep.status == "completed", rep.reason
            manifest = await rx.wait_manifest()
            assert manifest["complete"] is True
            anon = g.regions["anon"]
            assert sorted(r["name"] for r in manifest["regions"]) == [f"anon@{anon.start:x}", "guest-ram"]
            assert [o.complete for o in rx.outcomes] == [True]
        check = compare_with_source(g.pid, str(tmp_path / "dest"))
        assert check.identical, check.detail
        assert check.pages == (32 + 16) * 256


async def test_migrate_refuses_a_bad_address_and_a_wrong_key(tmp_path):
    with pytest.raises(migrator.UsageError, match="expected HOST:PORT"):
        await migrator.migrate(pid=os.getpid(), regions=["[heap]"], to="nowhere")
    with migrator.start_guest(shared_ram="8M", anon_ram="0") as g:
        async with migrator.Receiver(tmp_path / "dest", key=b"k" * 32) as rx:
            rep = await migrator.migrate(pid=g.pid, regions=["guest-ram"], to=rx.address, key=b"x" * 32)
        assert rep.status == "failed"
        assert "authentication" in rep.reason or "key" in rep.reason, rep.reason


def test_start_guest_names_a_bad_field():
    with pytest.raises(migrator.UsageError, match="start_guest: .*colour"):
        migrator.start_guest(shared_ram="8M", colour="blue")
    with pytest.raises(migrator.UsageError, match="not both"):
        migrator.start_guest(migrator.GuestSpec(), shared_ram="8M")


def test_probe_says_whether_this_machine_can_track():
    caps = migrator.probe()
    assert isinstance(caps, migrator.Capabilities)
    assert caps.tracking_problem() is None       # this machine: write-protect and PAGEMAP_SCAN
    no = migrator.Feature(False, "not in this kernel")
    lacking = migrator.Capabilities(**{k: no for k in caps.__dict__})
    assert "neither userfaultfd write-protect" in lacking.tracking_problem()
