"""The tracker interface and what a collect returns."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Mapping, Protocol

from ..kernel.maps import Region
from .pageset import PageSet


@dataclass(frozen=True)
class RegionEvent:
    """Something that happened to a tracked region's mappings between two collects."""

    region: str
    what: str      # "remapped" (a VMA under it was replaced: all its pages reported), "unmapped"
    detail: str


@dataclass
class DirtyPages:
    """Result of one collect: region name -> pages written since the previous collect."""

    pages: dict[str, PageSet]
    events: list[RegionEvent] = field(default_factory=list)
    cost_s: float = 0.0          # wall time the collect took (seconds)
    sweeps: list = field(default_factory=list)      # sweepgate.Sweep: objects the ledger swept
    unswept: set[str] = field(default_factory=set)  # regions whose sweep the caller must do
                                                    # (collect(defer=...))
    parts_ms: dict[str, float] = field(default_factory=dict)   # where a collect's time went

    def count(self) -> int:
        """Total dirty pages across regions."""
        return sum(len(s) for s in self.pages.values())

    def merge(self, other: "DirtyPages") -> None:
        for name, s in other.pages.items():
            if name in self.pages:
                self.pages[name].update(s)
            else:
                self.pages[name] = s
        self.events.extend(other.events)
        self.cost_s += other.cost_s
        self.sweeps.extend(other.sweeps)
        self.unswept |= other.unswept


@dataclass(frozen=True)
class TrackerStatistics:
    """Debug figures of a tracker (like trio's *Statistics objects)."""

    name: str
    collects: int
    pages_reported: int
    tracked_pages: int
    memory_bytes: int            # tracker-side memory for per-page state
    last_cost_s: float
    detail: str = ""


class ContentBaseline(Protocol):
    """What a tracker that compares page contents with what was sent (the shmem ledger, inside
    the composite tracker) offers the pre-copy controller, got from Tracker.content_baseline():
    round 0's sends become the baseline (no sweep first), the sender keeps it up to date, and
    the final collect can leave a sweep to the sender, which compares every page as it sends."""

    def use_views(self, views: Mapping[str, object]) -> None:
        """Region name -> a read-only mapping of its object (or None), before begin: what the
        ledger sweeps from (the sweep gate keeps views of its own)."""

    def begin_from_sends(self) -> set[str]:
        """Arm, taking what record_sent() is given as the ledger's baseline instead of sweeping
        now: returns the regions whose every page the caller must then send (round 0)."""

    def record_sent(self, region_name: str, data_flat, zero_flat, hashes: bytes) -> None:
        """The sender's on_packed hook: these pages went out with these hashes (or as zeros)."""

    def mark_reading(self, region_name: str, flat) -> None:
        """The sender's on_reading hook (live rounds): these pages are being read; until
        record_sent() reports them, they count as changed."""

    def rewritten_fraction(self, samples: dict[str, list[int]]) -> float | None:
        """Of sampled pages sent (region name -> page numbers), the fraction rewritten already;
        None if it cannot tell."""

    def known_hashes(self) -> dict[str, object]:
        """Region name -> the hashes of what the destination holds (8 bytes a page, writable),
        for a sender doing the final sweep of those regions itself (Sender.send_pages known=)."""

    def collect(self, final: bool = False, exclude: frozenset[str] = frozenset(),
                defer: frozenset[str] = frozenset()) -> "DirtyPages":
        """Tracker.collect, leaving the sweeps of the regions in defer to the caller (listed in
        the result's `unswept`)."""


class Tracker(abc.ABC):
    """Reports, per collect, the pages of its regions written since the previous collect.

    begin() arms tracking (after it, every write is seen by the next collect); collect() returns
    the written pages and re-arms atomically where the mechanism allows; end() disarms and frees.
    """

    name: str = "tracker"

    def __init__(self, pid: int, regions: list[Region]):
        self.pid = pid
        self.regions = list(regions)
        self._collects = 0
        self._reported = 0
        self._last_cost = 0.0

    @abc.abstractmethod
    def begin(self) -> None: ...

    @abc.abstractmethod
    def collect(self, final: bool = False) -> DirtyPages:
        """Pages written since the previous collect (or begin).  final=True: the last collect
        of a migration, target paused: do every check, however costly."""

    def end(self) -> None:
        """Disarm; safe to call twice and after the target exited."""

    def final_collect_estimate_s(self) -> float:
        """How long the final collect (the source paused) should take, seconds: the last
        collect's cost; 0 before the first (scanning page tables costs little).  Trackers that
        read memory override it."""
        return self._last_cost

    def memory_bytes(self) -> int:
        return 0

    def content_baseline(self) -> ContentBaseline | None:
        """The content-baseline features, where this tracker has them (None: page tables or
        plain hashing only)."""
        return None

    def writer_pids(self) -> set[int]:
        """Processes besides the target found writing the tracked memory (other mappers of its
        shared objects): a switch-over must pause them too."""
        return set()

    def statistics(self) -> TrackerStatistics:
        return TrackerStatistics(
            name=self.name, collects=self._collects, pages_reported=self._reported,
            tracked_pages=sum(r.npages for r in self.regions), memory_bytes=self.memory_bytes(),
            last_cost_s=self._last_cost,
        )

    def _account(self, result: DirtyPages) -> DirtyPages:
        self._collects += 1
        self._reported += result.count()
        self._last_cost = result.cost_s
        return result

    def __enter__(self) -> "Tracker":
        self.begin()
        return self

    def __exit__(self, *exc) -> None:
        self.end()
