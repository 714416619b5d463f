"""Watching the mappings under tracked regions between collects (munmap, mremap, new mappings)."""

from __future__ import annotations

from collections.abc import Callable

from ..kernel.maps import Mapping, Region, RegionKind, mappings_in
from .base import RegionEvent


def same_backing(region: Region) -> Callable[[Mapping], bool]:
    """A test for 'this VMA still maps the region's memory at the right place'."""
    if region.kind == RegionKind.SHARED or region.inode:
        def match(m: Mapping) -> bool:
            return ((m.dev, m.inode) == (region.dev, region.inode)
                    and m.offset - (m.start - region.start) == region.offset)
    else:
        def match(m: Mapping) -> bool:
            return m.inode == 0 and m.kind == region.kind
    return match


def coverage_gaps(region: Region, covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Byte ranges of region not inside any of the covered ranges."""
    gaps = []
    pos = region.start
    for a, b in sorted(covered) + [(region.end, region.end)]:
        a, b = max(a, region.start), min(b, region.end)
        if a > pos:
            gaps.append((pos, a))
        pos = max(pos, b)
    return gaps


def unmapped_events(region: Region, maps: list[Mapping]) -> list[RegionEvent]:
    """An 'unmapped' event for each part of region no longer mapped to its memory."""
    match = same_backing(region)
    covered = [(m.start, m.end) for m in mappings_in(maps, region.start, region.end) if match(m)]
    return [RegionEvent(region.name, "unmapped",
                        f"{a:#x}-{b:#x} is no longer mapped to the region's memory")
            for a, b in coverage_gaps(region, covered)]


def pages_of(region: Region, ranges: list[tuple[int, int]], page_size: int) -> list[tuple[int, int]]:
    """Byte ranges inside region -> page index ranges relative to region.start."""
    return [((a - region.start) // page_size, (b - region.start + page_size - 1) // page_size)
            for a, b in ranges]
