"""Scenario files: parsing, defaults, and errors that name the key; the bundled suite parses;
`migrator scenario list`."""

import pytest

from migrator.cli import main
from migrator.errors import UsageError
from migrator.scenarios import load_scenario, parse_scenario, resolve, suite_dir
from migrator.scenarios.chart import nice_ticks

MINIMAL = """
[guest]
shared_ram = "8M"
anon_ram = "4M"
"""


def err(text: str) -> str:
    with pytest.raises(UsageError) as ei:
        parse_scenario(text, "/x/bad.toml")
    return str(ei.value)


def test_minimal_file_gets_defaults():
    s = parse_scenario(MINIMAL, "/x/small.toml")
    assert s.name == "small" and s.ci and s.repeats == 1
    assert s.guest.shared_ram == 8 << 20 and s.guest.anon_ram == 4 << 20 and s.guest.uffd
    assert s.guest.workload.kind == "idle"
    assert s.link.bandwidth is None and s.link.latency_ms == 0
    assert s.policy.downtime_limit_ms == 300 and s.policy.max_rounds == 30 and s.policy.tracker == "auto"
    assert s.policy.delta_cache is None         # auto
    assert parse_scenario(MINIMAL + '[policy]\ndelta_cache = 0\n', "/x/a.toml").policy.delta_cache == 0
    assert parse_scenario(MINIMAL + '[policy]\ndelta_cache = "auto"\n', "/x/a.toml").policy.delta_cache is None
    assert s.expect.converges and s.expect.max_downtime_ms is None
    assert s.memory_bytes == 12 << 20 and not s.needs_swap


def test_full_file():
    s = parse_scenario("""
name = "full"
description = "d"
ci = false
repeats = 3
warmup_s = 0.2
tolerance = 0.1
[guest]
shared_ram = "32M"
anon_ram = 0
[workload]
kind = "hotcold"
rate = "40MB/s"
seed = 7
hot_fraction = 0.2
hot_share = 0.8
[writers.vhost]
kind = "random"
rate = "max"
size = "4M"
[writers.pwrite]
kind = "sweep"
rate = 1000000
[pager]
interval_s = 0.5
ranges = [{region = "shared", offset = "1M", length = "2M"}]
[[events]]
action = "pageout"
at_s = 0.5
every_s = 0.25
region = "guest-ram"
[[events]]
action = "rate"
after_rounds = true
writer = "vhost"
rate = "5MB/s"
[link]
bandwidth = "50MB/s"
latency_ms = 20
[policy]
downtime_limit_ms = 100
max_rounds = 10
auto_converge = true
tracker = "hash"
channels = 2
nonconvergence_rounds = 2
min_round_s = 0.05
delta_cache = "64M"
[expect]
converges = false
max_downtime_ms = 500
max_total_s = 9
max_bytes_ratio = 3
max_rounds = 8
min_throttle_percent = 20
""", "/x/whatever.toml")
    assert s.name == "full" and not s.ci and s.repeats == 3 and s.tolerance == 0.1
    assert s.guest.workload.rate == 40e6 and s.guest.workload.hot_share == 0.8
    assert s.guest.vhost.rate == -1.0 and s.guest.vhost_size == 4 << 20 and s.guest.pwrite.kind == "sweep"
    assert s.guest.pager_interval == 0.5 and s.guest.pager_ranges[0].offset == 1 << 20
    assert [e.action for e in s.events] == ["pageout", "rate"]
    assert s.events[0].every_s == 0.25 and s.events[1].after_rounds and s.events[1].rate == 5e6
    assert s.link.bandwidth == 50e6 and s.link.latency_ms == 20
    assert s.policy.channels == 2 and s.policy.tracker == "hash" and s.policy.auto_converge
    assert s.policy.delta_cache == 64 << 20
    assert not s.expect.converges and s.expect.min_throttle_percent == 20
    assert s.needs_swap
    assert "[not in CI]" in s.line() and "50MB/s +20ms" in s.line()


@pytest.mark.parametrize("text,expected", [
    ('colour = "red"\n' + MINIMAL, "bad.toml: colour: unknown key"),
    ('[guest]\nsharedram = "8M"\n', "bad.toml: [guest] sharedram: unknown key (known here: anon_ram, "),
    ('[workload]\nkind = "random"\nrate = "fast"\n', "bad.toml: [workload] rate: bad rate 'fast'"),
    ('[guest]\nshared_ram = "lots"\n', "bad.toml: [guest] shared_ram: bad size 'lots'"),
    ('[guest]\nshared_ram = true\n', "bad.toml: [guest] shared_ram: expected a size"),
    ('[workload]\nkind = "chaos"\n', "bad.toml: [workload] kind: 'chaos' is not one of idle, random, hotcold, sweep"),
    ('[workload]\nhot_fraction = 0\n', "bad.toml: [workload] hot_fraction: 0 must be > 0"),
    ('[policy]\ntracker = "magic"\n', "bad.toml: [policy] tracker: 'magic' is not one of auto, wp, soft-dirty, hash"),
    ('[policy]\nmax_rounds = 0\n', "bad.toml: [policy] max_rounds: 0 must be >= 1"),
    ('[policy]\ndelta_cache = "512K"\n', "bad.toml: [policy] delta_cache: '512K' must be 0 (no deltas), \"auto\" or at least 1 MiB"),
    ('[policy]\ndelta_cache = true\n', "bad.toml: [policy] delta_cache: expected a size like \"64M\", got True"),
    ('[policy]\nauto_converge = "yes"\n', "bad.toml: [policy] auto_converge: expected true or false"),
    ('[link]\nbandwidth = "0MB/s"\n', "bad.toml: [link] bandwidth: must be a positive rate"),
    ('[link]\nlatency_ms = -1\n', "bad.toml: [link] latency_ms: -1 must be >= 0"),
    ('[expect]\nmax_downtime = 3\n', "bad.toml: [expect] max_downtime: unknown key"),
    ('[expect]\nmax_rounds = 2.5\n', "bad.toml: [expect] max_rounds: expected a whole number"),
    ('repeats = 0\n', "bad.toml: repeats: 0 must be >= 1"),
    ('name = "a b"\n', "bad.toml: name: 'a b' must be non-empty"),
    ('[[events]]\nat_s = 1\n', "bad.toml: [[events]] #1 action: required key is missing"),
    ('[[events]]\naction = "pageout"\n', "bad.toml: [[events]] #1 at_s: required key is missing"),
    ('[[events]]\naction = "pageout"\nat_s = 1\nregion = "disk"\n',
     "bad.toml: [[events]] #1 region: 'disk' is not one of guest-ram, shared, anon"),
    ('[[events]]\naction = "rate"\nat_s = 1\nwriter = "vhost"\nrate = "1MB/s"\n',
     "bad.toml: [[events]] #1 writer: the guest has no vhost writer"),
    ('[[events]]\naction = "rate"\nat_s = 1\n', "bad.toml: [[events]] #1 rate: required key is missing"),
    ('[[events]]\naction = "pageout"\nat_s = 1\nafter_rounds = true\n',
     "bad.toml: [[events]] #1 after_rounds: give either after_rounds or at_s"),
    ('[[events]]\naction = "pageout"\nat_s = 1\nrate = "1MB/s"\n', "bad.toml: [[events]] #1 rate: unknown key"),
    ('[pager]\nranges = []\n', "bad.toml: [pager] interval_s: required key is missing"),
    ('[pager]\ninterval_s = 1\nranges = [{region = "shared", size = 1}]\n',
     "bad.toml: [pager] ranges[0] size: unknown key"),
    ('[writers.dma]\nkind = "random"\n', "bad.toml: [writers] dma: unknown key"),
    ('[writers.vhost]\nkind = "random"\nsize = "1G"\n', "bad.toml: [guest]: side writer areas"),
    ('guest = 3\n', "bad.toml: [guest]: expected a table"),
    ('[guest\n', "bad.toml: not valid TOML"),
    ('kind = "vm"\n', "bad.toml: kind: 'vm' is not one of process, qemu"),
])
def test_errors_name_the_key(text, expected):
    assert expected in err(text)


QEMU = """
kind = "qemu"
description = "vm"
[guest]
ram = "256M"
[link]
bandwidth = "1GB/s"
[policy]
downtime_limit_ms = 100
compare = ["migrator", "qemu"]
[expect]
converges = true
dest_runs_on = false
max_downtime_ms = 500
max_total_s = 9
"""


def test_qemu_kind():
    s = parse_scenario(QEMU, "/x/vm.toml")
    assert s.kind == "qemu" and s.guest is None and s.events == ()
    assert s.qemu.ram == 256 << 20 and s.qemu.program == "testguest" and s.qemu.methods == ("migrator", "qemu")
    assert s.memory_bytes == 256 << 20 and not s.needs_swap
    assert s.link.bandwidth == 1e9 and s.policy.downtime_limit_ms == 100 and s.policy.channels == 2
    assert s.expect.converges and not s.expect.dest_runs_on and s.expect.ram_pattern
    assert s.expect.max_downtime_ms == 500 and s.expect.max_total_s == 9
    assert "qemu testguest" in s.line() and "compare migrator+qemu" in s.line() and "1000MB/s" in s.line()
    d = parse_scenario('kind = "qemu"\n', "/x/d.toml")         # defaults: 128 MiB, 10 GB/s, both methods
    assert d.qemu.ram == 128 << 20 and d.link.bandwidth == 10e9 and d.qemu.methods == ("qemu", "migrator")
    assert d.policy.downtime_limit_ms == 300 and d.expect.dest_runs_on and d.expect.ram_pattern


Q = 'kind = "qemu"\n'


@pytest.mark.parametrize("text,expected", [
    (Q + 'warmup_s = 1\n', "bad.toml: warmup_s: unknown key (known here: ci, description, expect, guest, kind, "),
    (Q + '[workload]\nkind = "random"\n', "bad.toml: workload: unknown key"),
    (Q + '[guest]\nshared_ram = "8M"\n', "bad.toml: [guest] shared_ram: unknown key (known here: program, ram)"),
    (Q + '[guest]\nram = "64M"\n', "bad.toml: [guest] ram: 64 MiB must be a whole number of MiB above 100 MiB"),
    (Q + '[guest]\nram = "lots"\n', "bad.toml: [guest] ram: bad size 'lots'"),
    (Q + '[guest]\nprogram = "linux"\n', "bad.toml: [guest] program: 'linux' is not one of testguest"),
    (Q + '[link]\nbandwidth = "max"\n', "bad.toml: [link] bandwidth: must be a positive rate"),
    (Q + '[link]\nlatency_ms = 5\n', "bad.toml: [link] latency_ms: unknown key (known here: bandwidth)"),
    (Q + '[policy]\ncompare = ["qemu"]\n', "bad.toml: [policy] compare: ['qemu'] must include \"migrator\""),
    (Q + '[policy]\ncompare = ["xen", "migrator"]\n', "bad.toml: [policy] compare: 'xen' is not one of qemu, migrator"),
    (Q + '[policy]\ncompare = ["migrator", "migrator"]\n', "bad.toml: [policy] compare: ['migrator', 'migrator'] names a method twice"),
    (Q + '[policy]\ncompare = "qemu"\n', "bad.toml: [policy] compare: expected a non-empty list of method names"),
    (Q + '[policy]\ntracker = "hash"\n', "bad.toml: [policy] tracker: unknown key"),
    (Q + '[policy]\ndowntime_limit_ms = 0\n', "bad.toml: [policy] downtime_limit_ms: 0 must be > 0"),
    (Q + '[expect]\nram_pattern = "yes"\n', "bad.toml: [expect] ram_pattern: expected true or false"),
    (Q + '[expect]\nmax_rounds = 3\n', "bad.toml: [expect] max_rounds: unknown key"),
    ('[expect]\ndest_runs_on = true\n', "bad.toml: [expect] dest_runs_on: unknown key"),   # process kind
])
def test_qemu_kind_errors_name_the_key(text, expected):
    assert expected in err(text)


def test_the_suite_parses_and_covers_the_cases():
    files = resolve([str(suite_dir())])
    scns = {s.name: s for s in map(load_scenario, files)}
    for name in ("idle", "steady-random", "hotcold", "sweep", "shmem-swapout", "vhost-writer",
                 "pwrite-writer", "overload", "overload-autoconverge", "large-guest", "thin-link", "default", "qemu"):
        assert name in scns, name
    assert scns["large-guest"].memory_bytes >= 4 << 30 and not scns["large-guest"].ci
    assert all(s.ci for n, s in scns.items() if n != "large-guest")
    assert scns["thin-link"].link.bandwidth == 50e6 and scns["thin-link"].link.latency_ms > 0
    assert not scns["overload"].expect.converges and not scns["overload"].policy.auto_converge
    assert scns["overload-autoconverge"].policy.auto_converge
    assert scns["shmem-swapout"].needs_swap
    q = scns["qemu"]
    assert q.kind == "qemu" and q.ci and q.qemu.ram == 128 << 20 and q.link.bandwidth == 10e9
    assert q.policy.downtime_limit_ms == 300 and q.qemu.methods == ("qemu", "migrator", "migrator-fits")
    assert scns["vhost-writer"].guest.vhost is not None and scns["pwrite-writer"].guest.pwrite is not None


def test_resolve_names_files_and_folders(tmp_path):
    assert resolve(["idle"]) == [suite_dir() / "idle.toml"]
    with pytest.raises(UsageError, match="no scenario 'nope'"):
        resolve(["nope"])
    with pytest.raises(UsageError, match="no \\*.toml"):
        resolve([str(tmp_path)])


def test_list_prints_one_line_each(capsys):
    assert main(["scenario", "list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(resolve([str(suite_dir())]))
    assert any(line.startswith("idle ") for line in lines)


def test_cli_bad_file_is_one_line_error(tmp_path, capsys):
    f = tmp_path / "oops.toml"
    f.write_text('[guest]\nshared_rma = "8M"\n')
    assert main(["scenario", "run", str(f), "--report", str(tmp_path / "r")]) == 2
    e = capsys.readouterr().err
    assert e.strip() == ("migrator: error: oops.toml: [guest] shared_rma: unknown key (known here: "
                         "anon_ram, anon_tail, content, shared_ram, shared_tail, target)")
    assert not (tmp_path / "r").exists()


def test_duplicate_names_are_refused(tmp_path, capsys):
    for n in ("a", "b"):
        (tmp_path / f"{n}.toml").write_text('name = "same"\n')
    assert main(["scenario", "list", str(tmp_path)]) == 2
    assert "two scenarios are named 'same'" in capsys.readouterr().err


def test_nice_ticks():
    assert nice_ticks(83.9) == [0, 20, 40, 60, 80, 100]
    assert nice_ticks(1.47, 6) == [0, 0.5, 1.0, 1.5]
    assert nice_ticks(0) == [0.0, 1.0]
