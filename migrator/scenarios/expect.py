"""Expectations: what each run must show, as named checks (`max_downtime_ms: downtime 412.0 ms >
300`).  The destination check and a clean outcome are always there; the rest come from the
scenario's [expect] table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runner import RunResult
    from .spec import Scenario


@dataclass(frozen=True)
class Check:
    name: str           # the [expect] key, or "destination" / "run"
    ok: bool
    message: str        # what was measured against what was expected

    def to_json(self) -> dict:
        return {"name": self.name, "ok": self.ok, "message": self.message}

    @classmethod
    def from_json(cls, d: dict) -> "Check":
        return cls(d["name"], d["ok"], d["message"])


def forced_switchover(scn: "Scenario", rep: dict) -> bool:
    """True when stop-and-copy came from reaching max_rounds, not from the rest fitting the
    downtime limit (the migration completes, but it did not converge)."""
    rounds = rep.get("per_round") or []
    return (bool(rounds) and rounds[-1]["round"] >= scn.policy.max_rounds
            and rep["expected_downtime_ms"] > scn.policy.downtime_limit_ms)


def _limit(out: list[Check], name: str, value: float, bound: float | None, unit: str, what: str,
           at_least: bool = False) -> None:
    if bound is None:
        return
    ok = value >= bound if at_least else value <= bound
    op = (">=" if ok else "<") if at_least else ("<=" if ok else ">")
    out.append(Check(name, ok, f"{what} {value:g}{unit} {op} {bound:g}{unit}"))


def check_expectations(scn: "Scenario", res: "RunResult") -> list[Check]:
    if res.error:
        return [Check("run", False, f"the run failed: {res.error}")]
    if res.skipped:
        return []
    if scn.kind == "qemu":
        return _qemu_checks(scn, res)
    rep = res.report
    e = scn.expect
    out: list[Check] = []
    status = rep["status"]
    if e.converges:
        forced = status == "completed" and forced_switchover(scn, rep)
        if forced:
            out.append(Check("converges", False,
                             f"completed only because max_rounds ({scn.policy.max_rounds}) forced the "
                             f"switch-over: expected downtime {rep['expected_downtime_ms']:.0f} ms > limit "
                             f"{scn.policy.downtime_limit_ms:g} ms"))
        else:
            out.append(Check("converges", status == "completed",
                             f"status {status}" + (f" ({rep['reason']})" if rep.get("reason") else "")
                             + ", expected completed"))
        if status == "completed":
            out.append(Check("destination", res.destination == "identical",
                             f"destination {res.destination} ({res.pages_compared} pages compared "
                             "with the paused source)"))
    else:
        out.append(Check("converges", status == "not-converged",
                         f"status {status}, expected not-converged"))
        if status == "not-converged":
            out.append(Check("guest keeps running", bool(res.guest_running_after),
                             "the guest runs on after giving up" if res.guest_running_after
                             else "the guest was left stopped after giving up"))
        elif status == "completed":     # still proves nothing was lost
            out.append(Check("destination", res.destination == "identical", f"destination {res.destination}"))

    def limit(*a, **kw) -> None:
        _limit(out, *a, **kw)

    completed = status == "completed"
    if completed:
        limit("max_downtime_ms", round(rep["downtime_ms"], 1), e.max_downtime_ms, " ms", "downtime")
    limit("max_total_s", round(rep["total_time_ms"] / 1000, 2), e.max_total_s, " s", "total time")
    ratio = rep["transferred_bytes"] / res.memory_bytes if res.memory_bytes else 0.0
    limit("max_bytes_ratio", round(ratio, 3), e.max_bytes_ratio, "", "bytes sent / memory")
    limit("max_rounds", rep["rounds"], e.max_rounds, "", "rounds")
    limit("min_throttle_percent", rep["throttle_percent"], e.min_throttle_percent, " %", "throttle",
          at_least=True)
    return out


def _qemu_checks(scn: "Scenario", res: "RunResult") -> list[Check]:
    """kind = "qemu": the expectations apply to the migrator-driven run (QEMU's own run is
    reported beside it, never checked).  Downtime is STOP -> destination RESUME, total is start ->
    destination running, as in the side-by-side table."""
    e = scn.expect
    rep = res.report
    mig = next(m for m in res.methods if m["method"] == "migrator")
    status = rep["status"]
    why = f" ({rep['reason']})" if rep.get("reason") else ""
    out: list[Check] = []
    if e.converges:
        out.append(Check("converges", status == "completed", f"status {status}{why}, expected completed"))
    else:
        out.append(Check("converges", status == "not-converged", f"status {status}{why}, expected not-converged"))
        if status == "not-converged":
            out.append(Check("guest keeps running", rep["source_state"] == "running",
                             f"the source VM is {rep['source_state'] or 'in an unknown state'} after giving up"))
    if status != "completed":
        return out
    if e.dest_runs_on:
        out.append(Check("dest_runs_on", bool(mig["runs_on"]),
                         "the destination guest runs on" if mig["runs_on"] else
                         "the destination guest wrote no serial marker after the migration"))
    if e.ram_pattern:
        out.append(Check("ram_pattern", bool(mig["pattern_ok"]), f"destination RAM: {mig['pattern']}"))
    _limit(out, "max_downtime_ms", round(mig["downtime_ms"], 1), e.max_downtime_ms, " ms", "downtime")
    _limit(out, "max_total_s", round(mig["total_ms"] / 1000, 2), e.max_total_s, " s", "total time")
    return out
