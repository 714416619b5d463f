"""Watching the VMAs under tracked regions between collects (munmap, mremap, new mappings)."""

from __future__ import annotations

from ..kernel.maps import Mapping, Region, mappings_in
from .base import RegionEvent


def vma_identities(maps: list[Mapping], region: Region) -> dict[tuple, Mapping]:
    return {m.identity: m for m in mappings_in(maps, region.start, region.end)}


def diff_layout(region: Region, before: dict[tuple, Mapping], after: dict[tuple, Mapping]
                ) -> tuple[list[tuple[int, int]], list[RegionEvent]]:
    """Compare the VMAs under region.  Returns (byte ranges now covered by VMAs that were not there
    before, clipped to the region) and the events to report.  Ranges no longer mapped are events
    ("unmapped"): those pages cannot be read any more."""
    new_ranges: list[tuple[int, int]] = []
    events: list[RegionEvent] = []
    for ident, m in after.items():
        if ident not in before:
            a, b = max(m.start, region.start), min(m.end, region.end)
            new_ranges.append((a, b))
            events.append(RegionEvent(region.name, "remapped",
                                      f"new mapping {a:#x}-{b:#x} ({m.path or 'anonymous'}): all its pages reported"))
    covered = sorted((max(m.start, region.start), min(m.end, region.end)) for m in after.values())
    pos = region.start
    for a, b in covered + [(region.end, region.end)]:
        if a > pos:
            events.append(RegionEvent(region.name, "unmapped", f"{pos:#x}-{a:#x} is no longer mapped"))
        pos = max(pos, b)
    return new_ranges, events


def pages_of(region: Region, ranges: list[tuple[int, int]], page_size: int) -> list[tuple[int, int]]:
    """Byte ranges inside region -> page index ranges relative to region.start."""
    return [((a - region.start) // page_size, (b - region.start + page_size - 1) // page_size)
            for a, b in ranges]
