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


def check_expectations(scn: "Scenario", res: "RunResult") -> list[Check]:
    if res.error:
        return [Check("run", False, f"the run failed: {res.error}")]
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

    def limit(name: str, value: float, bound: float | None, unit: str, what: str, at_least: bool = False) -> None:
        if bound is None:
            return
        ok = value >= bound if at_least else value <= bound
        op = (">=" if ok else "<") if at_least else ("<=" if ok else ">")
        out.append(Check(name, ok, f"{what} {value:g}{unit} {op} {bound:g}{unit}"))

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
