"""Batch compression for thin links: zstd (level 1) or lz4 (block), from well-kept libraries.

The sender compresses a BATCH's page data in its producer threads (both libraries release the
GIL), and keeps the result only when it is smaller than the raw data; the receiver decompresses
into exactly the size the batch's runs announce (a bomb or garbage is a ProtocolError naming the
batch).  The page hashes and the batch hash are those of the raw pages, checked after
decompression; a sealed session authenticates the compressed bytes.

`auto` (the default) compresses when the measured link is slower than the compressors, by a
margin of AUTO_MARGIN: the channels' send rate (bytes on the wire per second of sending, the
waits of a --max-bandwidth cap included, which is also known from the start) against the
producers' compression rate (raw bytes per second of a producer's CPU time, times their
number; each producer times its first two batches to know it).  On a fast loopback link nothing
is compressed; on a thin one everything is.  Pages that do not compress (encrypted or random
memory) make it back off: after a batch that saved less than 1/8,
only one batch in 16 is tried.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from ..errors import ProtocolError, UsageError

NONE, ZSTD, LZ4 = 0, 1, 2
CODEC_IDS = {"none": NONE, "zstd": ZSTD, "lz4": LZ4}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}
CHOICES = ("auto", "zstd", "lz4", "none")
ZSTD_LEVEL = 1
MIN_SAVING = 1 / 8          # a batch must shrink by this much to count as compressible
AUTO_MARGIN = 2.0           # auto: the compressors must outpace the link this many times (the
                            # receiver decompresses, and the CPUs may be shared with it)
BACKOFF_BATCHES = 16        # after an incompressible batch, try one in this many


def codec_for(choice: str) -> int:
    """The codec a session announces for a --compress choice ("auto" uses zstd)."""
    if choice not in CHOICES:
        raise UsageError(f"bad --compress {choice!r}: one of {', '.join(CHOICES)}")
    return ZSTD if choice == "auto" else CODEC_IDS[choice]


class BatchCompressor:
    """One producer thread's compressor (not shared between threads)."""

    def __init__(self, codec: int, auto: bool, producers: int = 2):
        self.codec = codec
        self.auto = auto
        self.producers = producers
        self.speed = 0.0          # raw bytes per second of compressing (moving average)
        self._measured = 0        # compressions timed by this compressor
        self._skip = 0
        self._seen = 0
        self.batches = 0          # batches sent compressed
        self.raw_bytes = 0        # their raw size
        self.wire_bytes = 0       # their compressed size
        if codec == ZSTD:
            import zstandard
            self._zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)

    def wanted(self, link_bps: float) -> bool:
        """Compress this batch?  link_bps: the channels' measured send rate (0: not yet)."""
        if self.codec == NONE:
            return False
        self._seen += 1
        if self._skip:
            self._skip -= 1
            return False
        if not self.auto:
            return True
        if self._measured < 2:        # measure (the first call also pays the library's set-up)
            return True
        if not link_bps:
            return self._seen % BACKOFF_BATCHES == 1
        return link_bps * AUTO_MARGIN < self.speed * self.producers

    def compress(self, pieces: Sequence[Any]) -> bytes | None:
        """The pieces' bytes compressed, or None when that would not save MIN_SAVING."""
        raw = sum(len(p) for p in pieces)
        t0 = time.thread_time()      # (CPU time: what compressing costs, not the machine's load)
        if self.codec == ZSTD:
            if len(pieces) == 1:
                out = self._zstd.compress(pieces[0])
            else:
                c = self._zstd.compressobj(size=raw)
                out = b"".join([c.compress(p) for p in pieces] + [c.flush()])
        else:
            import lz4.block
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            out = lz4.block.compress(data, store_size=False)
        dt = time.thread_time() - t0
        self._measured += 1
        if dt > 0:
            rate = raw / dt
            self.speed = rate if self._measured <= 2 else 0.7 * self.speed + 0.3 * rate
        if len(out) > raw * (1 - MIN_SAVING):
            self._skip = BACKOFF_BATCHES - 1
            return None
        self.batches += 1
        self.raw_bytes += raw
        self.wire_bytes += len(out)
        return out


def decompress(codec: int, data: Any, size: int, what: str) -> bytes:
    """Exactly `size` bytes from a compressed batch (what: names it in errors)."""
    try:
        if codec == ZSTD:
            import zstandard
            # a frame's header declares its size, which decompress() would allocate blindly
            declared = zstandard.get_frame_parameters(data).content_size
            if declared != size:
                raise ProtocolError(f"{what}: zstd frame declares "
                                    f"{'no size' if declared < 0 else f'{declared} bytes'}, "
                                    f"its runs announce {size}")
            out = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
        elif codec == LZ4:
            import lz4.block
            out = lz4.block.decompress(data, uncompressed_size=size)
        else:
            raise ProtocolError(f"{what}: unknown compression {codec}")
    except ProtocolError:
        raise
    except Exception as e:          # (each library raises its own error types)
        raise ProtocolError(f"{what}: bad {CODEC_NAMES.get(codec, codec)} data "
                            f"({type(e).__name__}: {e})") from None
    if len(out) != size:
        raise ProtocolError(f"{what}: {CODEC_NAMES[codec]} data decompresses to {len(out)} bytes, "
                            f"its runs announce {size}")
    return out


__all__ = ["BatchCompressor", "decompress", "codec_for", "CHOICES", "CODEC_IDS", "CODEC_NAMES",
           "NONE", "ZSTD", "LZ4"]
