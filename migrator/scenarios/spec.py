"""Scenario files: TOML read with tomllib, checked key by key into a frozen Scenario.

Every table has a fixed set of keys; an unknown key, a missing required key or a bad value is a
UsageError naming the file and the key (`idle.toml: [workload] rate: bad rate 'fast': ...`).
The format is described in docs/scenarios.md.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..guest.spec import GuestSpec, PageoutRange
from ..guest.workloads import WORKLOADS, WorkloadSpec
from ..bench.qemu_compare import METHODS as QEMU_METHODS

DEFAULT_QEMU_METHODS = ("qemu", "migrator")     # (migrator-fits: QEMU's switch-over rule, on request)
from ..qemu.testguest import GuestLayout
from ..tracking.choose import CHOICES as TRACKERS
from ..transport import DEFAULT_CHANNELS
from ..units import parse_rate, parse_size

KINDS = ("process", "qemu")
QEMU_PROGRAMS = ("testguest",)
EVENT_ACTIONS = ("pageout", "rate")
RATE_WRITERS = ("vcpu", "vhost", "pwrite")


@dataclass(frozen=True)
class LinkSpec:
    """The network between source and destination: a bandwidth cap (bytes/s, enforced by the
    sender's pacing) and an added one-way latency (a delaying proxy on loopback)."""

    bandwidth: float | None = None
    latency_ms: float = 0.0


@dataclass(frozen=True)
class PolicySpec:
    downtime_limit_ms: float = 300.0
    max_rounds: int = 30
    auto_converge: bool = False
    tracker: str = "auto"
    channels: int = DEFAULT_CHANNELS
    nonconvergence_rounds: int = 3
    min_round_s: float = 0.0
    compress: str = "auto"        # migrate --compress
    delta_cache: int | None = None   # migrate --delta-cache (bytes); None: auto, 0: no deltas


@dataclass(frozen=True)
class Event:
    """Something done to the guest during the migration: at `at_s` seconds after it starts
    (then every `every_s` seconds if set), or after each round is sent (`after_rounds`)."""

    action: str                          # pageout | rate
    at_s: float = 0.0
    every_s: float | None = None
    after_rounds: bool = False
    region: str = "shared"               # pageout: guest-ram / shared / anon
    offset: int = 0
    length: int = 0                      # 0: to the end of the populated part
    writer: str = "vcpu"                 # rate
    rate: float = 0.0                    # rate: bytes/s (< 0: as fast as possible)

    def describe(self) -> str:
        when = "after each round" if self.after_rounds else (
            f"at {self.at_s:g} s" + (f", every {self.every_s:g} s" if self.every_s else ""))
        if self.action == "pageout":
            what = f"page out {self.region}" + (f" +{self.offset}" if self.offset else "") + (
                f" ({self.length} bytes)" if self.length else "")
        else:
            what = f"{self.writer} rate {_fmt_rate(self.rate)}"
        return f"{what} {when}"


@dataclass(frozen=True)
class QemuSpec:
    """A `kind = "qemu"` scenario's VM: QEMU (TCG) with `ram` bytes of RAM in a shared memfd,
    running `program` (the project's test guest), migrated once by each of `methods`."""

    ram: int = 128 << 20
    program: str = "testguest"
    methods: tuple[str, ...] = DEFAULT_QEMU_METHODS


@dataclass(frozen=True)
class Expectations:
    """What a run must show; None = not checked.  The destination is always checked byte for
    byte against the paused source when the migration completes."""

    converges: bool = True
    max_downtime_ms: float | None = None
    max_total_s: float | None = None
    max_bytes_ratio: float | None = None     # transferred bytes / guest memory size
    max_rounds: int | None = None
    min_throttle_percent: int | None = None
    dest_runs_on: bool = True                # qemu: the destination guest runs on
    ram_pattern: bool = True                 # qemu: the destination RAM holds the guest's pattern


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    description: str
    ci: bool
    repeats: int
    warmup_s: float
    guest: GuestSpec | None                  # None for kind = "qemu"
    link: LinkSpec
    policy: PolicySpec
    events: tuple[Event, ...]
    expect: Expectations
    tolerance: float | None = None           # baseline tolerance for this scenario
    tags: tuple[str, ...] = ()
    kind: str = "process"                    # process | qemu
    qemu: QemuSpec | None = None             # kind = "qemu": the VM and the methods compared

    @property
    def memory_bytes(self) -> int:
        if self.qemu is not None:
            return self.qemu.ram
        return self.guest.shared_ram + self.guest.anon_ram

    @property
    def needs_swap(self) -> bool:
        if self.guest is None:
            return False
        return self.guest.pager_interval is not None or any(e.action == "pageout" for e in self.events)

    def line(self) -> str:
        """One line for `migrator scenario list`."""
        flags = "" if self.ci else " [not in CI]"
        if self.qemu is not None:
            return (f"{self.name:<22} {_fmt_size(self.memory_bytes):>8}  {'qemu ' + self.qemu.program:<22} "
                    f"{'compare ' + '+'.join(self.qemu.methods):<24} link {_fmt_rate(self.link.bandwidth):<18}"
                    f"{flags}  {self.description}")
        g = self.guest
        w = g.workload
        load = "idle" if w.kind == "idle" else f"{w.kind} {_fmt_rate(w.rate)}"
        side = [k for k in ("vhost", "pwrite") if getattr(g, k) is not None]
        if g.pager_interval is not None:
            side.append(f"pager/{g.pager_interval:g}s")
        if self.events:
            side.append(f"{len(self.events)} event(s)")
        link = _fmt_rate(self.link.bandwidth) if self.link.bandwidth else "unlimited"
        if self.link.latency_ms:
            link += f" +{self.link.latency_ms:g}ms"
        flags += " auto-converge" if self.policy.auto_converge else ""
        return (f"{self.name:<22} {_fmt_size(self.memory_bytes):>8}  {load:<22} "
                f"{'+'.join(side) or '-':<24} link {link:<18}{flags}  {self.description}")


def _fmt_rate(r: float | None) -> str:
    if r is None:
        return "unlimited"
    if r < 0:
        return "max"
    return f"{r / 1e6:g}MB/s"


def _fmt_size(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:g} {unit}"
    return f"{n} B"


# --- value checkers: each returns the value or raises UsageError (the key is added by the caller)

def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise UsageError(f"expected true or false, got {v!r}")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise UsageError(f"expected a string, got {v!r}")
    return v


def _num(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UsageError(f"expected a number, got {v!r}")
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise UsageError(f"{v!r} must be {'>' if lo_open else '>='} {lo:g}")
        if hi is not None and v > hi:
            raise UsageError(f"{v!r} must be <= {hi:g}")
        return float(v)
    return check


def _int(lo: int | None = None) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise UsageError(f"expected a whole number, got {v!r}")
        if lo is not None and v < lo:
            raise UsageError(f"{v!r} must be >= {lo}")
        return v
    return check


def _size(v: Any) -> int:
    if isinstance(v, bool):
        raise UsageError(f"expected a size like \"64M\", got {v!r}")
    if isinstance(v, int):
        if v < 0:
            raise UsageError(f"{v!r} must not be negative")
        return v
    if not isinstance(v, str):
        raise UsageError(f"expected a size like \"64M\", got {v!r}")
    return parse_size(v)


def _delta_cache(v: Any) -> int | None:
    """[policy] delta_cache: "auto", 0 (no deltas) or a size of at least 1 MiB."""
    if v == "auto":
        return None
    n = _size(v)
    if 0 < n < 1 << 20:
        raise UsageError(f"{v!r} must be 0 (no deltas), \"auto\" or at least 1 MiB")
    return n


def _rate(v: Any) -> float:
    if isinstance(v, str) and v.strip().lower() == "max":
        return -1.0
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise UsageError(f"expected a rate like \"40MB/s\", got {v!r}")
    if isinstance(v, (int, float)):
        if v < 0:
            raise UsageError(f"{v!r} must not be negative")
        return float(v)
    return parse_rate(v)


def _choice(options: tuple[str, ...] | list[str]) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in options:
            raise UsageError(f"{v!r} is not one of {', '.join(options)}")
        return v
    return check


def _tags(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise UsageError(f"expected a list of strings, got {v!r}")
    return tuple(v)


class _Table:
    """Reads one TOML table: known keys only, each through its checker, errors naming the key."""

    def __init__(self, file: str, where: str, data: Any):
        self.file, self.where = file, where
        if not isinstance(data, dict):
            raise UsageError(f"{file}: {where or 'top level'}: expected a table, got {data!r}")
        self.data = data
        self.used: set[str] = set()

    def key(self, k: str) -> str:
        return f"{self.where} {k}" if self.where else k

    def err(self, k: str, msg: str) -> UsageError:
        return UsageError(f"{self.file}: {self.key(k)}: {msg}")

    def get(self, k: str, check: Callable[[Any], Any], default: Any = None, *, required: bool = False) -> Any:
        self.used.add(k)
        if k not in self.data:
            if required:
                raise self.err(k, "required key is missing")
            return default
        try:
            return check(self.data[k])
        except UsageError as e:
            raise self.err(k, str(e)) from None

    def sub(self, k: str) -> "_Table | None":
        self.used.add(k)
        if k not in self.data:
            return None
        where = f"[{k}]" if not self.where else f"{self.where[:-1]}.{k}]"
        return _Table(self.file, where, self.data[k])

    def done(self) -> None:
        """Unknown keys are errors (typos must not be silently ignored)."""
        extra = sorted(set(self.data) - self.used)
        if extra:
            known = ", ".join(sorted(self.used))
            raise self.err(extra[0], f"unknown key (known here: {known})")


def _workload(t: _Table) -> WorkloadSpec:
    kind = t.get("kind", _choice(list(WORKLOADS)), "idle")
    ws = dict(kind=kind, rate=t.get("rate", _rate, 0.0), seed=t.get("seed", _int(0), 0),
              hot_fraction=t.get("hot_fraction", _num(0, 1, lo_open=True), 0.1),
              hot_share=t.get("hot_share", _num(0, 1), 0.9))
    return WorkloadSpec(**ws)


def _event(t: _Table) -> Event:
    action = t.get("action", _choice(EVENT_ACTIONS), required=True)
    at_s = t.get("at_s", _num(0), None)
    every_s = t.get("every_s", _num(0, lo_open=True), None)
    after_rounds = t.get("after_rounds", _bool, False)
    if after_rounds and (at_s is not None or every_s is not None):
        raise t.err("after_rounds", "give either after_rounds or at_s/every_s, not both")
    if not after_rounds and at_s is None:
        raise t.err("at_s", "required key is missing (or set after_rounds = true)")
    kw: dict[str, Any] = dict(action=action, at_s=at_s or 0.0, every_s=every_s, after_rounds=after_rounds)
    if action == "pageout":
        kw.update(region=t.get("region", _str, "shared"), offset=t.get("offset", _size, 0),
                  length=t.get("length", _size, 0))
    else:
        kw.update(writer=t.get("writer", _choice(RATE_WRITERS), "vcpu"),
                  rate=t.get("rate", _rate, required=True))
    t.done()
    return Event(**kw)


def parse_scenario(text: str, path: str = "<string>") -> Scenario:
    """A Scenario from TOML text.

    Raises:
        UsageError: bad TOML, unknown key, bad or missing value (the message names the key).
    """
    file = Path(path).name
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{file}: not valid TOML: {e}") from None
    top = _Table(file, "", data)
    name = top.get("name", _str, Path(path).stem)
    if not name or any(c in name for c in "/ \t"):
        raise top.err("name", f"{name!r} must be non-empty, without spaces or '/'")
    common = dict(name=name, path=str(path), description=top.get("description", _str, ""),
                  ci=top.get("ci", _bool, True), tags=top.get("tags", _tags, ()),
                  repeats=top.get("repeats", _int(1), 1), tolerance=top.get("tolerance", _num(0), None))
    if top.get("kind", _choice(KINDS), "process") == "qemu":
        return _qemu_scenario(file, top, common)
    warmup_s = top.get("warmup_s", _num(0), 0.5)
    guest = _guest(file, top)
    link, policy = _link(file, top), _policy(file, top)
    events = _events(file, top, guest)
    et = top.sub("expect") or _Table(file, "[expect]", {})
    expect = Expectations(
        **_common_expectations(et),
        max_bytes_ratio=et.get("max_bytes_ratio", _num(0, lo_open=True), None),
        max_rounds=et.get("max_rounds", _int(1), None),
        min_throttle_percent=et.get("min_throttle_percent", _int(0), None))
    et.done()
    top.done()
    return Scenario(**common, warmup_s=warmup_s, guest=guest, link=link, policy=policy,
                    events=events, expect=expect)


def _guest(file: str, top: _Table) -> GuestSpec:
    """[guest], [workload], [writers.vhost|pwrite] and [pager]: the guest process to run."""
    g = top.sub("guest") or _Table(file, "[guest]", {})
    gkw: dict[str, Any] = dict(
        shared_ram=g.get("shared_ram", _size, 64 << 20), anon_ram=g.get("anon_ram", _size, 16 << 20),
        shared_tail=g.get("shared_tail", _size, 0), anon_tail=g.get("anon_tail", _size, 0),
        target=g.get("target", _choice(("shared", "anon", "both")), "both"), uffd=True,
        content=g.get("content", _choice(("stamp", "text")), "stamp"))
    g.done()
    w = top.sub("workload")
    if w is not None:
        gkw["workload"] = _workload(w)
        w.done()
    writers = top.sub("writers")
    if writers is not None:
        for kind in ("vhost", "pwrite"):
            st = writers.sub(kind)
            if st is None:
                continue
            gkw[f"{kind}_size"] = st.get("size", _size, 0)
            gkw[kind] = _workload(st)
            st.done()
        writers.done()
    pager = top.sub("pager")
    if pager is not None:
        gkw["pager_interval"] = pager.get("interval_s", _num(0, lo_open=True), required=True)
        ranges = []
        for i, r in enumerate(pager.get("ranges", lambda v: v if isinstance(v, list) else _bad_list(v), [])):
            rt = _Table(file, f"[pager] ranges[{i}]", r)
            ranges.append(PageoutRange(region=rt.get("region", _str, required=True),
                                       offset=rt.get("offset", _size, 0), length=rt.get("length", _size, 0)))
            rt.done()
        gkw["pager_ranges"] = tuple(ranges)
        pager.done()
    try:
        return GuestSpec(**gkw)
    except UsageError as e:
        raise UsageError(f"{file}: [guest]: {e}") from None


def _link(file: str, top: _Table) -> LinkSpec:
    """[link]: the emulated link's bandwidth cap and latency."""
    lt = top.sub("link") or _Table(file, "[link]", {})
    bw = lt.get("bandwidth", _rate, None)
    if bw is not None and bw <= 0:
        raise lt.err("bandwidth", "must be a positive rate (leave it out for no cap)")
    link = LinkSpec(bandwidth=bw, latency_ms=lt.get("latency_ms", _num(0, 10_000), 0.0))
    lt.done()
    return link


def _policy(file: str, top: _Table) -> PolicySpec:
    """[policy]: the migration policy's fields a scenario may set."""
    pt = top.sub("policy") or _Table(file, "[policy]", {})
    policy = PolicySpec(
        downtime_limit_ms=pt.get("downtime_limit_ms", _num(0, lo_open=True), 300.0),
        max_rounds=pt.get("max_rounds", _int(1), 30),
        auto_converge=pt.get("auto_converge", _bool, False),
        tracker=pt.get("tracker", _choice(TRACKERS), "auto"),
        channels=pt.get("channels", _int(1), DEFAULT_CHANNELS),
        nonconvergence_rounds=pt.get("nonconvergence_rounds", _int(1), 3),
        min_round_s=pt.get("min_round_s", _num(0), 0.0),
        compress=pt.get("compress", _choice(("auto", "zstd", "lz4", "none")), "auto"),
        delta_cache=pt.get("delta_cache", _delta_cache, None))
    pt.done()
    return policy


def _events(file: str, top: _Table, guest: GuestSpec) -> tuple:
    """[[events]]: each checked against the guest (its regions, its writers)."""
    events = []
    raw_events = top.get("events", lambda v: v if isinstance(v, list) else _bad_list(v), [])
    for i, e in enumerate(raw_events):
        ev = _event(_Table(file, f"[[events]] #{i + 1}", e))
        if ev.action == "pageout":
            names = (guest.name, "shared") + (("anon",) if guest.anon_ram else ())
            if ev.region not in names:
                raise UsageError(f"{file}: [[events]] #{i + 1} region: {ev.region!r} is not one of "
                                 f"{', '.join(names)}")
        if ev.action == "rate" and ev.writer != "vcpu" and getattr(guest, ev.writer) is None:
            raise UsageError(f"{file}: [[events]] #{i + 1} writer: the guest has no {ev.writer} writer "
                             f"(add [writers.{ev.writer}])")
        events.append(ev)
    return tuple(events)


def _common_expectations(et: _Table) -> dict[str, Any]:
    return dict(converges=et.get("converges", _bool, True),
                max_downtime_ms=et.get("max_downtime_ms", _num(0, lo_open=True), None),
                max_total_s=et.get("max_total_s", _num(0, lo_open=True), None))


def _methods(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
        raise UsageError(f"expected a non-empty list of method names, got {v!r}")
    for m in v:
        _choice(QEMU_METHODS)(m)
    if len(set(v)) != len(v):
        raise UsageError(f"{v!r} names a method twice")
    if "migrator" not in v:
        raise UsageError(f"{v!r} must include \"migrator\" (the expectations apply to its run)")
    return tuple(v)


def _qemu_scenario(file: str, top: _Table, common: dict[str, Any]) -> Scenario:
    """kind = "qemu": one VM set-up migrated by each method (migrator/bench/qemu_compare.py)."""
    g = top.sub("guest") or _Table(file, "[guest]", {})
    ram = g.get("ram", _size, 128 << 20)
    floor = GuestLayout().end >> 20
    if ram % (1 << 20) or ram >> 20 <= floor:
        raise g.err("ram", f"{_fmt_size(ram)} must be a whole number of MiB above {floor} MiB (the test guest "
                           f"writes 1..{floor} MiB)")
    program = g.get("program", _choice(QEMU_PROGRAMS), "testguest")
    g.done()
    lt = top.sub("link") or _Table(file, "[link]", {})
    bw = lt.get("bandwidth", _rate, 10e9)
    if bw <= 0:
        raise lt.err("bandwidth", "must be a positive rate (both methods are capped by it; QEMU's "
                                  "own default, 32 MiB/s, would never converge)")
    lt.done()
    pt = top.sub("policy") or _Table(file, "[policy]", {})
    policy = PolicySpec(downtime_limit_ms=pt.get("downtime_limit_ms", _num(0, lo_open=True), 300.0),
                        channels=pt.get("channels", _int(1), DEFAULT_CHANNELS),
                        compress=pt.get("compress", _choice(("auto", "zstd", "lz4", "none")), "none"))
    methods = pt.get("compare", _methods, DEFAULT_QEMU_METHODS)
    pt.done()
    et = top.sub("expect") or _Table(file, "[expect]", {})
    expect = Expectations(**_common_expectations(et), dest_runs_on=et.get("dest_runs_on", _bool, True),
                          ram_pattern=et.get("ram_pattern", _bool, True))
    et.done()
    top.done()
    return Scenario(**common, warmup_s=0.0, guest=None, link=LinkSpec(bandwidth=bw), policy=policy,
                    events=(), expect=expect, kind="qemu",
                    qemu=QemuSpec(ram=ram, program=program, methods=methods))


def _bad_list(v: Any):
    raise UsageError(f"expected a list of tables, got {v!r}")


def load_scenario(path: str | Path) -> Scenario:
    """Read and check one scenario file."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UsageError(f"scenario file {str(path)!r}: {e.strerror}") from None
    return parse_scenario(text, str(path))


def suite_dir() -> Path:
    """The bundled suite: ./scenarios if it exists, else the one next to the package source."""
    here = Path("scenarios")
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[2] / "scenarios"


def resolve(args: list[str]) -> list[Path]:
    """Scenario files from command-line arguments: files, folders (their *.toml, sorted) or
    names of scenarios in the suite (`idle` for scenarios/idle.toml)."""
    out: list[Path] = []
    for a in args:
        p = Path(a)
        if p.is_dir():
            found = sorted(p.glob("*.toml"))
            if not found:
                raise UsageError(f"{a}: no *.toml scenario files in this folder")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        elif (suite_dir() / f"{a}.toml").is_file() and "/" not in a:
            out.append(suite_dir() / f"{a}.toml")
        else:
            raise UsageError(f"no scenario {a!r}: not a file, a folder, or a name in {suite_dir()}")
    return out
