"""PageSet: a compact set of page indices of one region (a bitmap, 1 bit per page)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ..kernel.native import check, ffi, lib

_RUN_BATCH = 4096


class PageSet:
    """Pages [0, npages) of a region, present or not.  Memory: npages / 8 bytes."""

    __slots__ = ("npages", "bits")

    def __init__(self, npages: int, bits: bytearray | None = None):
        self.npages = npages
        self.bits = bits if bits is not None else bytearray((npages + 7) // 8)
        if len(self.bits) != (npages + 7) // 8:
            raise ValueError("bitmap size does not match npages")

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def of(cls, npages: int, pages: Iterable[int]) -> "PageSet":
        s = cls(npages)
        for p in pages:
            s.add(p)
        return s

    @classmethod
    def full(cls, npages: int) -> "PageSet":
        s = cls(npages)
        s.add_range(0, npages)
        return s

    def add(self, page: int) -> None:
        if not 0 <= page < self.npages:
            raise IndexError(f"page {page} outside 0..{self.npages}")
        self.bits[page >> 3] |= 1 << (page & 7)

    def add_range(self, first: int, end: int) -> None:
        """Add pages [first, end)."""
        if not 0 <= first <= end <= self.npages:
            raise IndexError(f"range {first}..{end} outside 0..{self.npages}")
        while first < end and first & 7:
            self.add(first)
            first += 1
        full_bytes = (end - first) >> 3
        if full_bytes:
            self.bits[first >> 3:(first >> 3) + full_bytes] = b"\xff" * full_bytes
            first += full_bytes << 3
        while first < end:
            self.add(first)
            first += 1

    def update(self, other: "PageSet") -> None:
        """In-place union."""
        self._same_shape(other)
        with ffi.from_buffer(self.bits) as d, ffi.from_buffer(other.bits) as s:
            lib.mg_bitmap_or(d, s, len(self.bits))     # (in C, without the GIL)

    def __or__(self, other: "PageSet") -> "PageSet":
        out = self.copy()
        out.update(other)
        return out

    def __sub__(self, other: "PageSet") -> "PageSet":
        self._same_shape(other)
        out = PageSet(self.npages)
        with ffi.from_buffer(out.bits) as d, ffi.from_buffer(self.bits) as a, \
                ffi.from_buffer(other.bits) as b:
            lib.mg_bitmap_andnot(d, a, b, len(self.bits))
        return out

    def copy(self) -> "PageSet":
        return PageSet(self.npages, bytearray(self.bits))

    def _same_shape(self, other: "PageSet") -> None:
        if other.npages != self.npages:
            raise ValueError(f"page sets of different regions ({self.npages} vs {other.npages} pages)")

    # --- queries ------------------------------------------------------------------------------
    def __len__(self) -> int:
        with ffi.from_buffer(self.bits) as b:
            return lib.mg_bitmap_count(b, len(self.bits))

    def __bool__(self) -> bool:
        return len(self) > 0

    def __contains__(self, page: int) -> bool:
        return 0 <= page < self.npages and bool(self.bits[page >> 3] & (1 << (page & 7)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PageSet) and other.npages == self.npages and other.bits == self.bits

    def runs(self) -> Iterator[tuple[int, int]]:
        """(first, end) of each run of consecutive pages, in order."""
        pos = ffi.new("uint64_t *", 0)
        buf = ffi.new("uint64_t[]", 2 * _RUN_BATCH)
        src = ffi.from_buffer(self.bits)
        while pos[0] < self.npages:
            n = check(lib.mg_bitmap_runs(src, self.npages, pos, buf, _RUN_BATCH), "bitmap_runs")
            for k in range(n):
                yield (buf[2 * k], buf[2 * k + 1])
            if n < _RUN_BATCH:
                break

    def pages(self) -> list[int]:
        """All pages, ascending (for tests and small sets)."""
        return [p for a, b in self.runs() for p in range(a, b)]

    def __iter__(self) -> Iterator[int]:
        for a, b in self.runs():
            yield from range(a, b)

    def __repr__(self) -> str:
        shown = []
        for a, b in self.runs():
            shown.append(str(a) if b == a + 1 else f"{a}-{b - 1}")
            if len(shown) > 8:
                shown.append("...")
                break
        return f"PageSet({len(self)}/{self.npages}: {','.join(shown)})"
