"""A Python model of the guest's C page generator (csrc/guest.c), for exact pattern tests:
given seed and writer, which page the k-th write (seq k) hits."""

from __future__ import annotations

import struct

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
HDR = struct.Struct("<IHHQQQ")        # magic, region, writer, index, seq, checksum


def mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


class Model:
    def __init__(self, kind: str, seed: int, writer: int, total: int,
                 hot: tuple[int, int] = (0, 0), hot_share: float = 0.9) -> None:
        self.kind, self.total, self.hot, self.hot_share = kind, total, hot, hot_share
        self.s = mix64(seed ^ (writer << 32) ^ 0x6D69677261746F72)
        self.cursor = 0

    def _next(self) -> int:
        self.s = (self.s + GOLDEN) & M64
        return mix64(self.s)

    def _below(self, n: int) -> int:
        return (self._next() * n) >> 64

    def pick(self) -> int:
        if self.kind == "random":
            return self._below(self.total)
        if self.kind == "hotcold":
            hs, he = self.hot
            hn = he - hs
            if hn == self.total or (self._next() >> 11) * 2.0**-53 < self.hot_share:
                return hs + self._below(hn)
            j = self._below(self.total - hn)
            return j if j < hs else j + hn
        p = self.cursor
        self.cursor = (self.cursor + 1) % self.total
        return p

    def last_writes(self, n: int) -> dict[int, int]:
        """page -> seq of its last write among seqs 1..n."""
        last = {}
        for seq in range(1, n + 1):
            last[self.pick()] = seq
        return last


def stamps(image: bytes, page_size: int = 4096) -> list[tuple[int, int, int, int, int]]:
    """(magic, region, writer, index, seq) of every page."""
    return [HDR.unpack_from(image, i)[:5] for i in range(0, len(image), page_size)]
