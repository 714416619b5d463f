"""Migration statistics, per round and overall, in QEMU's query-migrate vocabulary where it fits."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field


class Timeline(dict):
    """Named wall-clock stamps (time.time(), the clock QEMU stamps its QMP events with, so the
    two sides of a migration on one host line up).  Safe to mark from worker threads."""

    def mark(self, name: str, at: float | None = None) -> None:
        self[name] = time.time() if at is None else at

    def relative_ms(self, origin: float) -> dict[str, float]:
        return {k: round((v - origin) * 1000, 1) for k, v in sorted(self.items(), key=lambda kv: kv[1])}


@dataclass
class RoundStats:
    """One pre-copy round (round 0 sends every populated page; the last one is stop-and-copy)."""

    round: int
    pages_dirtied: int          # pages the collect before this round reported
    pages_sent: int             # pages_normal + pages_zero sent in this round
    pages_zero: int
    bytes: int                  # bytes on the wire
    duration_ms: float          # sending time
    tracker_ms: float           # cost of the collect that found the pages
    bandwidth_mbps: float       # megabits/s of this round
    dirty_rate_pps: float       # pages dirtied per second since the previous collect
    expected_downtime_ms: float
    throttle_percent: int = 0
    stop_and_copy: bool = False
    cpu_ms: float = 0.0         # CPU time of the migrating process (all threads) while sending


@dataclass
class MigrationReport:
    status: str = "setup"               # completed, failed, not-converged
    reason: str = ""
    total_time_ms: float = 0.0
    setup_time_ms: float = 0.0
    downtime_ms: float = 0.0            # pause to verified
    expected_downtime_ms: float = 0.0   # the estimate when stop-and-copy was decided
    transferred_bytes: int = 0
    remaining_bytes: int = 0
    compress: str = ""                  # the --compress policy
    compressed_batches: int = 0         # batches sent compressed ...
    compressed_raw_bytes: int = 0       # ... their pages' bytes ...
    compressed_wire_bytes: int = 0      # ... and what they took on the wire
    delta_batches: int = 0              # batches sent as deltas (transport/delta.py) ...
    delta_raw_bytes: int = 0            # ... their pages' bytes ...
    delta_wire_bytes: int = 0           # ... and their deltas' bytes
    pages_normal: int = 0
    pages_zero: int = 0
    dirty_pages_rate: float = 0.0       # pages/s, last measured
    rounds: int = 0
    mbps: float = 0.0                   # megabits/s over the whole migration
    throttle_percent: int = 0
    tracker: str = ""
    tracker_detail: str = ""
    downtime_limit_ms: float = 0.0
    bandwidth_bytes_per_s: float = 0.0  # measured, used for the expected downtime
    final_dirty_pages: int = 0
    final_scanned: list[str] = field(default_factory=list)   # regions whose final collect was the send's scan
    verify_ms: float = 0.0
    durable_ms: float = 0.0             # after the downtime: until the images were on disk and committed
    committing: bool = False            # the commit went out (or may have): the source stays paused
    verify_memory_ms: float = 0.0       # --verify memory: the paused source read and compared
    final_collect_ms: dict = field(default_factory=dict)   # the final collect's time, by part
    sweeps: list[dict] = field(default_factory=list)   # ledger sweeps: round, regions, bytes, reason
    source_state: str = ""              # paused (postmigrate) or running
    regions: list[dict] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    per_round: list[RoundStats] = field(default_factory=list)
    timeline: Timeline = field(default_factory=Timeline)    # wall-clock stamps of the steps

    def to_json(self) -> dict:
        d = asdict(self)
        d["timeline"] = dict(self.timeline)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = round(v, 3)
        d["per_round"] = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                          for r in d["per_round"]]
        return d

    def summary(self) -> str:
        lines = [f"migration {self.status}" + (f": {self.reason}" if self.reason else ""),
                 f"  total {self.total_time_ms:.0f} ms, downtime {self.downtime_ms:.1f} ms "
                 f"(expected {self.expected_downtime_ms:.1f} ms, limit {self.downtime_limit_ms:.0f} ms), "
                 f"setup {self.setup_time_ms:.0f} ms",
                 f"  {self.rounds} rounds, {self.transferred_bytes / 1e6:.1f} MB sent "
                 f"({self.pages_normal} pages + {self.pages_zero} zero pages), {self.mbps:.0f} Mbit/s",
                 f"  tracker {self.tracker}, throttle {self.throttle_percent} %, source {self.source_state}"]
        if self.sweeps:
            final = [s for s in self.sweeps if s["round"] == "final"]
            lines.append(f"  ledger sweeps: {len(self.sweeps)} ({sum(s['bytes'] for s in self.sweeps) / 2**20:.0f} MiB)"
                         + (f", in the pause: {final[0]['reason']}" if final else ""))
        if self.compressed_batches:
            lines.append(f"  compressed ({self.compress}): {self.compressed_batches} batches, "
                         f"{self.compressed_raw_bytes / 1e6:.1f} MB of pages in "
                         f"{self.compressed_wire_bytes / 1e6:.1f} MB")
        if self.delta_batches:
            lines.append(f"  deltas: {self.delta_batches} batches, {self.delta_raw_bytes / 1e6:.1f} MB of pages "
                         f"sent again in {self.delta_wire_bytes / 1e6:.2f} MB")
        if self.verify_memory_ms:
            lines.append(f"  source memory verified against what was sent in {self.verify_memory_ms:.0f} ms")
        return "\n".join(lines)
