"""The source side: open an authenticated session (one or more channels) and stream pages.

Page contents come from a blocking reader called in a worker thread, so the event loop never
stalls; one producer builds batches (read, zero-page scan, hash) while every channel sends the
previous ones.  A bandwidth cap, if any, is enforced here, across all channels.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import queue
import secrets
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping

import trio

from ._native import ffi, lib
from ..errors import (AuthError, CommitRefusedError, MigratorError, PeerReportedError, RegionError,
                      TransportError, first_error)
from . import wire
from .auth import client_handshake
from .compress import BatchCompressor, codec_for
from .delta import DeltaCache, DeltaTotals
from .digest import PageReader
from .framing import FrameStream, page_buffer, populate_in_background
from .wire import RegionSpec

DEFAULT_BATCH_PAGES = wire.DEFAULT_BATCH_PAGES
DEFAULT_CHANNELS = 2    # a migration's TCP connections unless told otherwise: each has its own
                        # sending thread (seal, send) and receiving pump (recv, tag check), so
                        # two use two cores on each side; one leaves a core idle (docs/protocol.md)
MAX_PIECES = 512   # reader calls per batch
PRODUCERS = min(2, os.cpu_count() or 1)   # threads building batches (plain TCP): zero-page
                                          # scanning is bound by memory bandwidth, not one core
CHUNK_PAGES = 8192      # pages a producer takes at a time
ZERO_PAGES_PER_BATCH = 16384   # zero pages marked per batch: a zero-heavy stretch still goes out
                               # in pieces the receiver applies while the rest is being scanned


@dataclass(frozen=True)
class SendStats:
    """One send_pages() call."""

    round_no: int
    bytes: int          # on the wire (headers included)
    pages_normal: int   # pages sent with their data
    pages_zero: int     # pages sent as zero markers
    batches: int
    duration: float     # seconds
    # batches packed but not sent (the send ended early, `until`): (region, data_flat, zero_flat)
    dropped: list = field(default_factory=list)
    # CPU seconds of this whole process (every thread: packing, sealing, sending, and any
    # tracking running beside) while the send ran; on a machine whose cores the receiver
    # shares, what bounds the rate
    cpu: float = 0.0

    @property
    def bandwidth(self) -> float:
        return self.bytes / self.duration if self.duration > 0 else 0.0


@dataclass(frozen=True)
class SenderStatistics:
    """Totals of a session so far."""

    transferred_bytes: int
    pages_normal: int
    pages_zero: int
    batches: int
    rounds: int          # rounds ended (acknowledged)
    channels: int
    busy_time: float     # seconds spent in send_pages() and end_round()
    # bytes/s of pages moved: transferred bytes, plus what compression saved, per busy second
    # (what estimates of the time to send N pages need); wire rate = transferred / busy_time
    bandwidth: float
    last_bandwidth: float  # the same, of the last send_pages() call
    compressed_batches: int = 0     # batches sent compressed ...
    compressed_raw_bytes: int = 0   # ... their pages' bytes ...
    compressed_wire_bytes: int = 0  # ... and what they took on the wire
    delta_batches: int = 0          # batches sent as deltas (transport/delta.py) ...
    delta_raw_bytes: int = 0        # ... their pages' bytes ...
    delta_wire_bytes: int = 0       # ... and their deltas' bytes


@dataclass(frozen=True)
class RegionVerdict:
    verified: bool
    source_digest: str
    dest_digest: str | None


@dataclass(frozen=True)
class FinishResult:
    """The receiver's verdict: complete only if every region's digest matched."""

    complete: bool
    regions: dict[str, RegionVerdict]
    message: str


class RateLimiter:
    """Paces sends to `rate` bytes/s on average (no bursts above one frame)."""

    def __init__(self, rate: float):
        if not rate > 0:
            raise ValueError(f"bandwidth must be positive, got {rate}")
        self.rate = rate
        self._next = 0.0
        self._next_wall = 0.0
        self._thread_lock = threading.Lock()

    async def take(self, nbytes: int) -> None:
        """Wait out the time slot of nbytes at the rate (a batch leaves at the end of its slot,
        so a round's measured bandwidth never exceeds the cap, even for a single batch)."""
        now = trio.current_time()
        start = max(self._next, now)
        self._next = start + nbytes / self.rate
        await trio.sleep_until(self._next)

    def take_blocking(self, nbytes: int) -> None:
        """take() for a worker thread (its own clock: a sender uses one or the other)."""
        with self._thread_lock:
            now = time.monotonic()
            start = max(self._next_wall, now)
            self._next_wall = start + nbytes / self.rate
            until = self._next_wall
        time.sleep(max(0.0, until - time.monotonic()))


# on_packed(region name, data runs, zero runs, data page hashes): see Sender.send_pages
# on_reading(region name, flat (first, count) runs): about to be read: see Sender.send_pages
OnReading = Callable[[str, list], None]
OnPacked = Callable[[str, list, list, bytes], None]


@dataclass
class KnownPages:
    """What the destination holds of one region, for Sender.send_pages(known=...)."""

    hashes: Any                       # writable buffer: the XXH3-64 of each page, 8 bytes (native order)
    force: bytearray | None = None    # bitmap of pages to send even if unchanged (PageSet.bits)
    stable: bool = False              # the region does not change during the send (source paused):
                                      # each page is hashed once, where it lies


@dataclass(frozen=True)
class _DeltaSend:
    """One send's use of the session's delta cache (see delta.py)."""

    cache: DeltaCache
    acked: int              # the last round the receiver acknowledged (copies up to it usable)
    keep: bool              # cache the pages sent (Sender.send_pages cache=)


@dataclass
class _Built:
    head: bytes
    data: Any               # a view of buf, or (sent from where they lie) views of the memory
    buf: mmap.mmap          # the pool buffer to give back once sent
    pages_normal: int
    pages_zero: int
    name: str = ""          # the region
    data_flat: list | None = None
    zero_flat: list | None = None
    region: int = 0
    round_no: int = 0
    digest: int = 0         # the batch hash (of the raw pages)
    compression: int = 0    # wire.DELTA: data is deltas (not compressed further)

    @property
    def size(self) -> int:
        """Bytes on the wire."""
        data = self.data if isinstance(self.data, tuple) else (self.data,)
        return len(self.head) + sum(len(d) for d in data)

    def compress_with(self, compressor: BatchCompressor) -> None:
        """Replace the data by its compressed bytes if that saves enough (producer thread)."""
        pieces = self.data if isinstance(self.data, tuple) else (self.data,)
        out = compressor.compress(pieces)
        if out is None:
            return
        self.release()
        # into the batch's own buffer (writable: an encrypted session seals it in place)
        self.buf[:len(out)] = out
        self.data = memoryview(self.buf)[:len(out)]
        self.head = wire.encode_batch(self.region, self.round_no, self.data_flat, self.zero_flat,
                                      len(out), self.digest, compressor.codec)

    def release(self) -> None:
        """Once sent (or dropped): release the views (those of the source's mapping would
        keep it from being closed)."""
        for d in self.data if isinstance(self.data, tuple) else (self.data,):
            if isinstance(d, memoryview):
                d.release()
        self.data = b""


class _Packer:
    """Builds batches of one send_pages() call (in a producer thread; one packer a thread).

    Each batch's data pages are packed into a buffer from a small pool: from the region's memory
    itself when the reader maps it (`mapped`: zero pages are found in place and never copied),
    else from a read of up to batch_pages pages into the buffer, packed in place.  Zero pages
    become zero runs; every data page is hashed in C right after its copy, while in cache.
    """

    def __init__(self, page_size: int, batch_pages: int, pool: "queue.Queue[mmap.mmap]",
                 stop: Callable[[], bool], on_packed: OnPacked | None = None,
                 known: Mapping[str, Any] | None = None, nocopy: bool = True,
                 compression: tuple[int, bool, list, float] | None = None,
                 delta: _DeltaSend | None = None, stable: bool = False,
                 on_reading: OnReading | None = None):
        self.ps = page_size
        self.on_reading = on_reading
        self.stable = stable         # the source is paused: pages are hashed where they lie
        self.delta = delta           # None: no deltas
        self._delta_out = None        # this packer's output buffer for deltas (made when needed)
        # (codec, auto, list every packer's compressor is added to for the totals, the last
        # measured compression speed) or None
        self.compression = compression
        self.compressor: BatchCompressor | None = None
        if compression is not None and compression[0]:
            self.compressor = BatchCompressor(compression[0], compression[1], PRODUCERS)
            self.compressor.speed = compression[3]
            compression[2].append(self.compressor)
        self.nocopy = nocopy         # stable pages may go out from where they lie (not when
                                     # frames are encrypted: that happens in the batch buffer)
        self.on_packed = on_packed
        self.batch_pages = batch_pages
        self.pool = pool
        self.stop = stop
        self.known = known or {}     # region name -> (uint64_t[], uint8_t[] or NULL, stable)
        self._zero_hash = lib.mg_hash_zero_page(page_size) if known or stable else 0
        self._arrays = None
        self._extents: dict = {}     # region name -> struct mg_extent (see mg_pack_object)

    def twin(self) -> "_Packer":
        """Another packer on the same buffers, for another producer thread."""
        return _Packer(self.ps, self.batch_pages, self.pool, self.stop, self.on_packed, self.known,
                       self.nocopy, self.compression, self.delta, self.stable, self.on_reading)

    def maybe_compress(self, built: _Built, link_bps: float) -> _Built:
        """Compress the batch if the session's policy wants it now (see compress.py)."""
        if (self.compressor is not None and built.pages_normal and not built.compression
                and self.compressor.wanted(link_bps)):
            built.compress_with(self.compressor)
        return built

    def _buffer(self) -> mmap.mmap:
        while True:
            try:
                return self.pool.get(timeout=0.2)
            except queue.Empty:
                if self.stop():
                    raise _Stopped() from None

    def _state(self, buf: mmap.mmap, name: str, region: int, round_no: int, mapped: bool = False):
        """A fresh batch of region `name` (#region) of round_no packing into buf (the run and
        hash arrays are reused: _built copies them out before the next batch starts).  mapped:
        packing from a mapping of the region, whose stable pages are then sent from where they
        lie (nocopy).  With deltas (after round 0), each data page is encoded as a delta as it
        is packed, into buf when the pages are not copied there, else into another buffer."""
        st = ffi.new("struct mg_pack *")
        known = self.known.get(name)
        if known is not None:
            st.known, st.force, st.stable = known
        elif self.stable:
            st.stable = 1
        if st.stable or known is not None:
            st.zero_hash = self._zero_hash
            st.nocopy = int(mapped and st.stable and self.nocopy)
        if self._arrays is None:
            self._arrays = (ffi.new("uint64_t[]", self.batch_pages),
                            ffi.new("uint64_t[]", 2 * wire.MAX_RUNS),
                            ffi.new("uint64_t[]", 2 * wire.MAX_RUNS))
        keep = (ffi.from_buffer(buf),) + self._arrays
        st.out, st.hashes, st.data_runs, st.zero_runs = keep
        st.out_cap = self.batch_pages
        st.run_cap = wire.MAX_RUNS
        st.zero_cap = ZERO_PAGES_PER_BATCH
        d = self.delta
        if d is not None and round_no and (d.keep or d.cache.used):
            d.cache.used = d.cache.used or d.keep
            job = ffi.new("struct mg_delta_job *")
            job.cache = d.cache.c
            job.key_base = d.cache.key_base[region]
            job.round_no = round_no
            job.base_round = max(d.acked, 0)
            job.keep = int(d.keep)
            if st.nocopy:
                job.out = st.out
            else:
                if self._delta_out is None:
                    self._delta_out = ffi.new("uint8_t[]", self.batch_pages * self.ps)
                job.out = self._delta_out
            job.cap = self.batch_pages * self.ps
            st.delta = job
            keep += (job,)
        return st, keep

    def _built(self, region: int, name: str, round_no: int, st, buf: mmap.mmap, view=None) -> _Built:
        ps = self.ps
        data_flat = ffi.unpack(st.data_runs, 2 * st.n_data_runs)
        zero_flat = ffi.unpack(st.zero_runs, 2 * st.n_zero_runs)
        hashes = bytes(ffi.buffer(st.hashes, 8 * st.out_pages))
        if self.on_packed is not None:
            self.on_packed(name, data_flat, zero_flat, hashes)
        delta_len = self._delta(st) if st.delta else None
        if delta_len is not None:
            digest = wire.batch_digest(region, round_no, data_flat, zero_flat, (), ps, hashes)
            head = wire.encode_batch(region, round_no, data_flat, zero_flat, delta_len, digest, wire.DELTA)
            return _Built(head, memoryview(buf)[:delta_len], buf, st.out_pages, st.zero_pages, name,
                          data_flat, zero_flat, region, round_no, digest, wire.DELTA)
        if st.nocopy:      # the data runs, where they lie in the mapping (the source is paused)
            mv = memoryview(view)
            data = tuple(mv[first * ps:(first + n) * ps] for first, n in zip(data_flat[::2], data_flat[1::2]))
            mv.release()
            nbytes = sum(len(d) for d in data)
        else:
            data = memoryview(buf)[:st.out_pages * ps]
            nbytes = len(data)
        digest = wire.batch_digest(region, round_no, data_flat, zero_flat, (), ps, hashes)
        head = wire.encode_batch(region, round_no, data_flat, zero_flat, nbytes, digest)
        return _Built(head, data, buf, st.out_pages, st.zero_pages, name, data_flat, zero_flat,
                      region, round_no, digest)

    def _delta(self, st) -> int | None:
        """The length of the batch's deltas, moved to its buffer (st.out) if they were encoded
        elsewhere; None if the batch does not go as deltas (see delta.py)."""
        job = st.delta
        n = self.delta.cache.count(job.st.hits, job.st.misses, job.len, st.out_pages, self.delta.acked)
        if n is not None and job.out != st.out:
            ffi.memmove(st.out, job.out, n)
        return n

    def batches(self, plan: list[tuple[int, str, list[tuple[int, int]]]], reader: PageReader,
                round_no: int) -> Iterator[_Built]:
        """The batches of plan ([(region index, name, [(first, end), ...])]), in order."""
        for idx, name, runs in plan:
            view = reader.mapped(name)
            if view is not None:
                yield from self._from_mapping(idx, name, runs, view, reader, round_no)
            else:
                yield from self._from_reads(idx, name, runs, reader, round_no)

    def _from_mapping(self, idx, name, runs, view, reader, round_no) -> Iterator[_Built]:
        """Pack straight from the mapped memory; for a memory object, its holes (pages never
        written) become zero runs without being touched: a read fault there would allocate them
        in the guest."""
        ps = self.ps
        if len(view) < max(end for _, end in runs) * ps:
            raise MigratorError(f"the mapping of region {name!r} is smaller than the region")
        obj = reader.memory_object(name) if ps == mmap.PAGESIZE else None
        hint = self._extents.get(name)      # the object's layout as found so far (this call)
        if hint is None:
            hint = self._extents[name] = ffi.new("struct mg_extent *")
        with ffi.from_buffer(view) as base:
            buf = self._buffer()
            st, keep = self._state(buf, name, idx, round_no, mapped=True)
            for first, end in runs:
                while first < end:
                    src = base + first * ps
                    n = min(end - first, CHUNK_PAGES)
                    if self.on_reading is not None:     # (a batch's worth at a time)
                        n = min(n, self.batch_pages)
                        self.on_reading(name, [first, n])
                    if obj is not None:
                        took = lib.mg_pack_object(src, obj[0], obj[1], first, n, ps, st, hint)
                    else:
                        took = lib.mg_pack_pages(src, first, n, ps, st)
                    if took < 0:
                        raise MigratorError(f"packing pages of region {name!r} failed: "
                                            f"{os.strerror(-took)}")
                    first += took
                    if took < n:           # batch full
                        yield self._built(idx, name, round_no, st, buf, view)
                        buf = self._buffer()
                        st, keep = self._state(buf, name, idx, round_no, mapped=True)
            if st.out_pages or st.zero_pages:
                yield self._built(idx, name, round_no, st, buf, view)
            else:
                self.pool.put(buf)
            del keep

    def _from_reads(self, idx, name, runs, reader, round_no) -> Iterator[_Built]:
        ps = self.ps
        for pieces in _windows(runs, self.batch_pages):
            total = sum(n for _, n in pieces)
            buf = self._buffer()
            if self.on_reading is not None:
                self.on_reading(name, [x for piece in pieces for x in piece])
            try:
                reader.read_into(name, pieces, buf, ps)
            except ValueError as e:      # (a reader that gave the wrong number of bytes)
                raise MigratorError(str(e)) from None
            st, keep = self._state(buf, name, idx, round_no)
            src = st.out
            pos = 0
            for first, n in pieces:     # in place: pages only move down in buf
                if lib.mg_pack_pages(src + pos * ps, first, n, ps, st) != n:
                    raise MigratorError(f"packing pages of region {name!r} failed")
                pos += n
            assert pos == total
            if st.out_pages or st.zero_pages:
                yield self._built(idx, name, round_no, st, buf)
            else:                       # (every page skipped: the same as known)
                self.pool.put(buf)
            del keep


class _Tally:
    """The batches of one send_pages() call: counted as they are packed, given back to the
    buffer pool once sent, or dropped (packed but not sent: the send ended early).  Producer
    and channel threads report at once: the counts are under a lock."""

    def __init__(self, pool: "queue.Queue[mmap.mmap]", delta: DeltaCache | None = None):
        self.pool = pool
        self.delta = delta
        self._lock = threading.Lock()
        self.pages_normal = 0
        self.pages_zero = 0
        self.batches = 0
        self.dropped: list[tuple[str, list | None, list | None]] = []   # (region, data_flat, zero_flat)

    def packed(self, built: _Built) -> None:
        with self._lock:
            self.pages_normal += built.pages_normal
            self.pages_zero += built.pages_zero
            self.batches += 1

    def sent(self, built: _Built) -> None:
        """Its views released, its buffer back in the pool."""
        built.release()
        self.pool.put(built.buf)

    def drop(self, built: _Built) -> None:
        """Not sent: uncounted, listed for the caller, its buffer back in the pool."""
        with self._lock:
            self.pages_normal -= built.pages_normal
            self.pages_zero -= built.pages_zero
            self.batches -= 1
            self.dropped.append((built.name, built.data_flat, built.zero_flat))
        if self.delta is not None:      # (its pages were cached as the receiver never got them)
            self.delta.forget(built.region, built.data_flat)
        self.sent(built)


def _queue_depth(channels: int) -> int:
    """Batches queued between the producers and the channels' senders."""
    return 2 * channels + 2


def _pool_size(channels: int, producers: int = PRODUCERS) -> int:
    """Buffers in use at once: queued, being sent (one per channel), being packed."""
    return _queue_depth(channels) + channels + producers


def _chunks(plan: list[tuple[int, str, list[tuple[int, int]]]], chunk_pages: int
            ) -> Iterator[tuple[int, str, list[tuple[int, int]]]]:
    """The plan cut into pieces of at most chunk_pages pages, for producers to take in turn."""
    for idx, name, runs in plan:
        part: list[tuple[int, int]] = []
        room = chunk_pages
        for first, end in runs:
            while first < end:
                n = min(end - first, room)
                part.append((first, first + n))
                first += n
                room -= n
                if room == 0:
                    yield idx, name, part
                    part, room = [], chunk_pages
        if part:
            yield idx, name, part


class _Stopped(Exception):
    """The send was stopped (another thread failed) while waiting for a buffer."""


def _windows(runs: list[tuple[int, int]], batch: int) -> Iterator[list[tuple[int, int]]]:
    """[(first, end)] cut into windows of at most batch pages and MAX_PIECES pieces:
    [(first, npages), ...] each."""
    pieces: list[tuple[int, int]] = []
    room = batch
    for first, end in runs:
        while first < end:
            n = min(end - first, room)
            pieces.append((first, n))
            first += n
            room -= n
            if room == 0 or len(pieces) >= MAX_PIECES:
                yield pieces
                pieces, room = [], batch
    if pieces:
        yield pieces


class Sender:
    """An open migration session.  Use connect_sender() to get one."""

    def __init__(self, channels: list[FrameStream], regions: list[RegionSpec], page_size: int,
                 max_bandwidth: float | None, batch_pages: int, compress: str = "none",
                 delta_cache: int = 0):
        self._channels = list(channels)   # every channel of the session
        # pages sent again go as deltas against copies of them (delta_cache bytes; 0: never)
        self._delta = DeltaCache(regions, page_size, delta_cache) if delta_cache else None
        self._delta_totals = self._delta.totals if self._delta is not None else DeltaTotals()
        self._acked = -1                  # the last round the receiver acknowledged
        self._cached_rounds: set[int] = set()   # rounds whose pages were cached (RoundEnd.warm)
        self._fs = channels               # those pages may still go on
        self._closing: list[FrameStream] = []   # sent CLOSE, CLOSED not read yet (close_secondaries)
        self._codec = codec_for(compress)
        self._auto = compress == "auto"
        self._compressed = [0, 0, 0]     # batches sent compressed, their raw and wire bytes
        self._link_bps = [0.0] * len(channels)   # each channel's send rate (moving average)
        self._compress_speed = 0.0               # a producer's, as last measured
        self.regions = regions
        self.page_size = page_size
        self._index = {r.name: i for i, r in enumerate(regions)}
        self._npages = [r.size // page_size for r in regions]
        self._limiter = RateLimiter(max_bandwidth) if max_bandwidth else None
        self._batch_pages = batch_pages
        self._round = 0
        self._pages_normal = self._pages_zero = self._batches = self._rounds = 0
        self._busy = 0.0
        self._sending_since: float | None = None   # monotonic start of the send under way
        self._last_bw = 0.0
        self._finished = False
        self._lock = trio.Lock()
        # the batch buffers up front, their memory faulted in while the session sets up
        self._buffers: list[mmap.mmap] = []
        self._pool(_pool_size(len(channels)))
        self.buffers_ready = populate_in_background(list(self._buffers))   # threading.Event

    # -- planning ----------------------------------------------------------------------------

    def _check(self, runs: Mapping[str, Iterable[tuple[int, int]]]
               ) -> list[tuple[int, str, list[tuple[int, int]]]]:
        checked = []
        for name, rl in runs.items():
            idx = self._index.get(name)
            if idx is None:
                raise RegionError(f"region {name!r} was not declared in this session")
            npages = self._npages[idx]
            rl = list(rl)
            for first, end in rl:
                if not 0 <= first < end <= npages:
                    raise RegionError(f"page run {first}-{end} outside region {name!r} ({npages} pages)")
            if rl:
                checked.append((idx, name, rl))
        return checked

    def _pool(self, size: int) -> "queue.Queue[mmap.mmap]":
        """Page buffers for size batches in flight (kept for the session, never shrunk)."""
        while len(self._buffers) < size:
            self._buffers.append(page_buffer(self._batch_pages * self.page_size))
        pool: queue.Queue[mmap.mmap] = queue.Queue()
        for b in self._buffers[:size]:
            pool.put(b)
        return pool

    # -- API ---------------------------------------------------------------------------------

    async def send_pages(self, runs: Mapping[str, Iterable[tuple[int, int]]], reader: PageReader,
                         round_no: int, on_packed: OnPacked | None = None,
                         known: Mapping[str, KnownPages] | None = None,
                         until: threading.Event | None = None, cache: bool = False,
                         stable: bool = False, on_reading: OnReading | None = None) -> SendStats:
        """Send the pages of `runs` ({region: [(first_page, end_page_exclusive), ...]}) as
        read now through `reader`, tagged with round_no (never lower than an earlier round).

        on_packed(region, data_flat, zero_flat, hashes), if given, is called (from worker
        threads, possibly two at once) for every batch as it is built: flat (first, count) runs
        of the pages sent with data and as zeros, and the XXH3-64 of each data page sent, 8
        bytes little-endian each, in order.

        known, if given: region name -> KnownPages: the XXH3-64 of each of the region's pages
        as the destination holds it (a zero page's hash for a page it holds as zeros).  Of those
        regions' pages in runs, only those whose contents hash differently (or whose force bit
        is set) are sent, and their hashes are updated: a final round that scans for changes as
        it sends.  SendStats counts the pages sent.

        until, if given and set during the send, ends it early: no batch is packed or sent after
        that (but those on the wire); SendStats.dropped lists the batches packed (on_packed saw
        them) but not sent.

        stable: the source is paused (nothing writes the pages while they are sent): each page is
        hashed where it lies, and sent from there when frames are not encrypted (no copy).  A
        page that changes anyway fails the batch's hash check at the receiver.

        cache: with deltas (the session has a delta cache), keep copies of the pages sent, so
        that if sent again in a later round they go as deltas (the caller's policy: pages the
        guest keeps rewriting).  Pages with copies go as deltas either way.

        on_reading(region, flat runs), if given, is called (from worker threads) before pages
        are read, with (first, count) runs covering them (a batch's worth or so): a caller that
        compares contents with what on_packed reports can tell pages in flight (read, not yet
        reported) from pages sent.

        Raises:
            RegionError: a run outside its region, or an undeclared region.
            TransportError: the receiver failed or went away (its reason included).
        """
        if self._finished:
            raise MigratorError("session already finished")
        if not 0 <= round_no <= wire.MAX_ROUND or round_no < self._round:
            raise ValueError(f"round {round_no} after round {self._round}")
        plan = self._check(runs)   # validates everything before the first byte goes out
        with contextlib.ExitStack() as exports:
            known_c = {}
            for name, k in (known or {}).items():
                npages = self._npages[self._index[name]] if name in self._index else -1
                with memoryview(k.hashes) as mv:
                    nbytes = mv.nbytes
                if nbytes != 8 * npages:
                    raise RegionError(f"known hashes of region {name!r}: not 8 bytes for each of its pages")
                if k.force is not None and len(k.force) != (npages + 7) // 8:
                    raise RegionError(f"forced pages of region {name!r}: not a bit for each of its pages")
                known_c[name] = (
                    exports.enter_context(ffi.from_buffer("uint64_t[]", k.hashes, require_writable=True)),
                    exports.enter_context(ffi.from_buffer("uint8_t[]", k.force)) if k.force is not None else ffi.NULL,
                    int(k.stable))
            return await self._send_pages(plan, reader, round_no, on_packed, known_c, until, cache, stable,
                                          on_reading)

    async def _send_pages(self, plan, reader: PageReader, round_no: int, on_packed: OnPacked | None,
                          known: dict[str, Any], until: threading.Event | None,
                          cache: bool = False, stable: bool = False,
                          on_reading: OnReading | None = None) -> SendStats:
        async with self._lock:
            self._round = round_no
            if cache and self._delta is not None:
                self._cached_rounds.add(round_no)
            t0 = time.monotonic()
            cpu0 = time.process_time()
            sent0 = self._sent()
            # at most one channel a batch: a channel with nothing to send would only cost a
            # thread hand-off that a small send (the pause's) waits for
            npages = sum(end - first for _, _, runs in plan for first, end in runs)
            fss = self._fs[:max(1, min(len(self._fs), -(-npages // self._batch_pages)))]
            depth = _queue_depth(len(self._fs))
            pool = self._pool(_pool_size(len(self._fs)))
            tally = _Tally(pool, self._delta)
            delta0 = self._delta.totals.raw_bytes - self._delta.totals.wire_bytes if self._delta else 0
            stop = threading.Event()
            compressors: list[BatchCompressor] = []
            packer = _Packer(self.page_size, self._batch_pages, pool, stop.is_set, on_packed, known,
                             nocopy=not any(fs.encrypts for fs in self._fs),
                             compression=(self._codec, self._auto, compressors, self._compress_speed),
                             delta=_DeltaSend(self._delta, self._acked, cache) if self._delta is not None else None,
                             stable=stable, on_reading=on_reading)
            self._sending_since = t0
            try:
                args = (plan, reader, round_no, tally, packer, depth, stop, until, fss)
                if all(fs.can_block for fs in self._fs):
                    await self._send_threaded(*args)
                else:
                    await self._send_async(*args)
            finally:
                self._sending_since = None
            dt = time.monotonic() - t0
            nbytes = self._sent() - sent0
            self._busy += dt
            self._pages_normal += tally.pages_normal
            self._pages_zero += tally.pages_zero
            self._batches += tally.batches
            # bytes compression and deltas kept off the wire in this send
            saved = self._delta.totals.raw_bytes - self._delta.totals.wire_bytes - delta0 if self._delta else 0
            for c in compressors:
                if c.speed:
                    self._compress_speed = c.speed
                self._compressed[0] += c.batches
                self._compressed[1] += c.raw_bytes
                self._compressed[2] += c.wire_bytes
                saved += c.raw_bytes - c.wire_bytes
            self._last_bw = (nbytes + saved) / dt if dt > 0 else 0.0
            return SendStats(round_no, nbytes, tally.pages_normal, tally.pages_zero, tally.batches, dt,
                             tally.dropped, cpu=time.process_time() - cpu0)

    async def _send_async(self, plan, reader, round_no, tally: _Tally, packer: _Packer, depth: int,
                          stop: threading.Event, until: threading.Event | None,
                          fss: list[FrameStream]) -> None:
        """Batches built in a worker thread, sent by trio tasks (TLS channels)."""
        send_ch, recv_ch = trio.open_memory_channel[_Built](depth)

        async def produce():
            async with send_ch:
                batches = packer.batches(plan, reader, round_no)
                while until is None or not until.is_set():
                    try:
                        built = await trio.to_thread.run_sync(next, batches, None)
                    except _Stopped:
                        return
                    if built is None:
                        return
                    tally.packed(built)
                    if packer.compressor is not None:
                        built = await trio.to_thread.run_sync(packer.maybe_compress, built,
                                                              self._link_estimate())
                    await send_ch.send(built)
                batches.close()          # ended early (until)

        async def consume(fs: FrameStream, rx):
            async with rx:
                async for built in rx:
                    if until is not None and until.is_set():
                        tally.drop(built)
                        continue
                    size = built.size
                    t0 = time.perf_counter()
                    if self._limiter is not None:
                        await self._limiter.take(size)
                    try:
                        await fs.send_raw(built.head, built.data)
                    except TransportError as e:
                        raise await _reason(fs, e) from None
                    self._measure_link(self._channels.index(fs), size, time.perf_counter() - t0)
                    tally.sent(built)

        consumers = [functools.partial(consume, fs, recv_ch.clone()) for fs in fss]
        await recv_ch.aclose()          # (the clones keep the channel open)
        await _run_all(stop, [produce, *consumers])

    async def _send_threaded(self, plan, reader, round_no, tally: _Tally, packer: _Packer, depth: int,
                             stop: threading.Event, until: threading.Event | None,
                             fss: list[FrameStream]) -> None:
        """Plain TCP: producer threads build batches from chunks of the plan taken in turn, one
        thread per channel sends them with blocking calls (no event-loop round trip per batch).
        Batches of one round may go out in any order: the receiver orders copies by round."""
        q: queue.Queue = queue.Queue(maxsize=depth)
        lock = threading.Lock()
        chunks = _chunks(plan, CHUNK_PAGES)
        npages = sum(end - first for _, _, runs in plan for first, end in runs)
        producers = [packer] + [packer.twin() for _ in range(min(PRODUCERS, -(-npages // CHUNK_PAGES)) - 1)]
        active = len(producers)         # producers still running (under lock)

        def put(item) -> None:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.2)
                    return
                except queue.Full:
                    continue

        def take():
            with lock:
                return None if until is not None and until.is_set() else next(chunks, None)

        def produce(pk: _Packer) -> None:
            nonlocal active
            try:
                while (chunk := take()) is not None:
                    batches = pk.batches([chunk], reader, round_no)
                    for built in batches:
                        if stop.is_set():
                            return
                        tally.packed(built)
                        if pk.compressor is not None:
                            pk.maybe_compress(built, self._link_estimate())
                        put(built)
                        if until is not None and until.is_set():
                            batches.close()      # (its buffer back to the pool)
                            return
            except _Stopped:
                return
            finally:
                with lock:
                    active -= 1
                    last = active == 0
                if last:                     # the last producer out tells the senders
                    for _ in fss:
                        put(None)

        index = {fs: i for i, fs in enumerate(self._channels)}

        def consume(fs: FrameStream) -> None:
            while not stop.is_set():
                try:
                    built = q.get(timeout=0.2)
                except queue.Empty:
                    continue
                if built is None:
                    return
                if until is not None and until.is_set():
                    tally.drop(built)
                    continue
                t0 = time.perf_counter()
                size = built.size
                if self._limiter is not None:
                    self._limiter.take_blocking(size)
                fs.send_blocking(built.head, built.data, stop.is_set)
                self._measure_link(index[fs], size, time.perf_counter() - t0)
                tally.sent(built)

        async def consumer(fs: FrameStream) -> None:
            try:
                await trio.to_thread.run_sync(consume, fs)
            except TransportError as e:
                stop.set()
                raise await _reason(fs, e) from None

        await _run_all(stop, [functools.partial(trio.to_thread.run_sync, produce, pk) for pk in producers]
                       + [functools.partial(consumer, fs) for fs in fss])

    async def prepare(self, runs: Mapping[str, Iterable[tuple[int, int]]]) -> None:
        """Tell the receiver which pages are about to be sent with data ({region: [(first,
        end), ...]}, e.g. round 0's plan): it allocates them in its images beside the stream.
        A hint: nothing depends on it."""
        plan = self._check(runs)
        async with self._lock:
            fs = self._fs[0]
            for idx, _name, rl in plan:
                flat = [x for first, end in rl for x in (first, end - first)]
                for i in range(0, len(flat), 2 * wire.MAX_RUNS):
                    try:
                        await fs.send(wire.Prepare(idx, tuple(flat[i:i + 2 * wire.MAX_RUNS])))
                    except TransportError as e:
                        raise await _reason(fs, e) from None

    async def end_round(self, round_no: int, final: bool = False) -> None:
        """Mark the end of round_no on every channel and wait until the receiver has written
        everything sent before it (on the channels still open: see close_secondaries).  final:
        the stop-and-copy's round (see wire.RoundEnd)."""
        async with self._lock:
            t0 = time.monotonic()
            try:
                async with trio.open_nursery() as nursery:
                    for fs in self._fs:
                        nursery.start_soon(self._ack_round, fs, round_no, final,
                                           round_no in self._cached_rounds)
            except BaseExceptionGroup as eg:
                raise first_error(eg) from None
            self._busy += time.monotonic() - t0
            self._rounds += 1
            self._acked = round_no        # (everything sent before is in the images: deltas may use it)

    async def close_secondaries(self, wait: bool = False) -> None:
        """Every send to come goes on channel 0 (the pause's, once its bulk is out): send CLOSE
        on channels 1.. now.  Their CLOSED (everything sent on them is written) is read here
        with wait (before a pause: the receiver's work on them then happens before it), else
        by finish(), by then long on its way: neither the final round's end nor finish() waits
        a round trip for them in the pause."""
        async with self._lock:
            await self._close_secondaries(wait)

    async def _close_secondaries(self, wait: bool) -> None:
        """close_secondaries() with the lock held (finish() closes the rest with wait)."""
        for fs in self._fs[1:]:
            try:
                await fs.send(wire.Close())
            except TransportError as e:
                raise await _reason(fs, e) from None
            self._closing.append(fs)
        self._fs = self._fs[:1]
        if wait:
            await self._closed()

    async def _closed(self) -> None:
        """The CLOSED of every channel sent CLOSE (everything sent on it is written)."""
        try:
            async with trio.open_nursery() as nursery:
                for fs in self._closing:
                    nursery.start_soon(fs.expect, wire.Closed)
        except BaseExceptionGroup as eg:
            raise first_error(eg) from None
        self._closing = []

    async def _ack_round(self, fs: FrameStream, round_no: int, final: bool, warm: bool) -> None:
        try:
            await fs.send(wire.RoundEnd(round_no, final, warm))
        except TransportError as e:
            raise await _reason(fs, e) from None
        ack = await fs.expect(wire.RoundAck)
        if ack.round_no != round_no:
            raise wire.ProtocolError(f"receiver acknowledged round {ack.round_no}, not {round_no}")

    async def finish(self, digests: Mapping[str, str], commit: bool = False) -> FinishResult:
        """End the migration: send each region's source digest (see region_digest) and wait for
        the receiver to verify its images against them.  commit: the receiver's manifest says
        complete only once commit() is called (after wait_synced), so a verdict lost on the way
        never leaves both the source and the destination looking valid."""
        missing = [r.name for r in self.regions if r.name not in digests]
        if missing:
            raise RegionError(f"no digest for region(s) {missing}")
        async with self._lock:
            self._finished = True
            await self._close_secondaries(wait=True)
            fs0 = self._fs[0]
            try:
                await fs0.send(wire.End(tuple(digests[r.name] for r in self.regions), commit))
            except TransportError as e:
                raise await _reason(fs0, e) from None
            res = await fs0.expect(wire.Result)
        if len(res.verified) != len(self.regions) or len(res.digests) != len(self.regions):
            raise wire.ProtocolError("RESULT does not cover every region")
        return FinishResult(
            complete=res.complete,
            regions={r.name: RegionVerdict(v, digests[r.name], d)
                     for r, v, d in zip(self.regions, res.verified, res.digests)},
            message=res.message)

    async def wait_synced(self, timeout_s: float = 120.0) -> None:
        """After a complete finish(): wait until the receiver has its images and the manifest
        saying complete on disk (it fsyncs them after its verdict, out of the downtime).

        Raises:
            MigratorError: it could not (its reason), or did not say so within timeout_s.
        """
        fs0 = self._fs[0]
        try:
            with trio.fail_after(timeout_s):
                await fs0.expect(wire.Synced)
        except trio.TooSlowError:
            raise MigratorError(f"the receiver verified the pages but did not store them within "
                                f"{timeout_s:.0f} s") from None
        except MigratorError as e:
            raise MigratorError(f"the receiver verified the pages but could not store them: {e}") from None

    async def commit(self) -> None:
        """After wait_synced() (finish(commit=True)): the migration is kept; the receiver may
        now mark its manifest complete.  Once this is called, the source must not resume: if
        it raises, whether the receiver got it is unknown.

        Raises:
            TransportError: the COMMIT could not be sent.
        """
        await self._fs[0].send(wire.Commit())

    async def wait_committed(self, timeout_s: float) -> None:
        """After commit(): the receiver says its manifest is complete, on disk (COMMITTED).

        Raises:
            CommitRefusedError: it answered that it could not write it: the manifest does not
                say complete (the source may resume).
            MigratorError: no answer within timeout_s, or the connection ended: unknown.
        """
        try:
            with trio.fail_after(timeout_s):
                await self._fs[0].expect(wire.Committed)
        except trio.TooSlowError:
            raise MigratorError(f"no word within {timeout_s:.0f} s") from None
        except PeerReportedError as e:
            raise CommitRefusedError(str(e)) from None

    def _free_buffers(self) -> None:
        if self._delta is not None:
            self._delta.close()
            self._delta = None
        for b in self._buffers:
            try:
                b.close()
            except BufferError:     # still exported by a batch in a traceback: left to the GC
                pass
        self._buffers = []

    @property
    def batch_pages(self) -> int:
        """Data pages per BATCH (a send of at most this many goes on one channel)."""
        return self._batch_pages

    @property
    def deltas(self) -> bool:
        """Pages sent again may go as deltas (the session has a delta cache)."""
        return self._delta is not None

    @property
    def open_channels(self) -> int:
        """Channels pages may still go on: all of them, until close_secondaries()."""
        return len(self._fs)

    def _sent(self) -> int:
        return sum(fs.bytes_sent for fs in self._channels)

    def _link_estimate(self) -> float:
        """The link's rate, bytes/s: what the channels measured, at most --max-bandwidth
        (known from the start); 0 if neither is known yet."""
        measured = sum(self._link_bps)
        if self._limiter is not None:
            return min(measured, self._limiter.rate) if measured else self._limiter.rate
        return measured

    def _measure_link(self, channel: int, nbytes: int, seconds: float) -> None:
        """A batch went out on a channel: its bytes per second of sending (a cap's wait
        included), averaged (for --compress auto)."""
        if seconds > 0:
            rate = nbytes / seconds
            old = self._link_bps[channel]
            self._link_bps[channel] = rate if not old else 0.8 * old + 0.2 * rate

    def statistics(self) -> SenderStatistics:
        """The figures so far, a send under way included (its time and bytes until now)."""
        sent = self._sent()
        busy = self._busy
        since = self._sending_since
        d = self._delta_totals
        if since is not None:
            busy += time.monotonic() - since
        return SenderStatistics(
            transferred_bytes=sent, pages_normal=self._pages_normal, pages_zero=self._pages_zero,
            batches=self._batches, rounds=self._rounds, channels=len(self._channels),
            busy_time=busy,
            bandwidth=(sent + self._compressed[1] - self._compressed[2] + d.raw_bytes - d.wire_bytes) / busy
            if busy > 0 else 0.0,
            last_bandwidth=self._last_bw, compressed_batches=self._compressed[0],
            compressed_raw_bytes=self._compressed[1], compressed_wire_bytes=self._compressed[2],
            delta_batches=d.batches, delta_raw_bytes=d.raw_bytes, delta_wire_bytes=d.wire_bytes)


async def _run_all(stop: threading.Event, jobs: list[Callable[[], Awaitable[Any]]]) -> None:
    """Run a send's producers and consumers at once; the first to fail sets stop (a producer
    thread waiting for a buffer, a sender thread, then give up) and its error is raised."""
    async def run(job: Callable[[], Awaitable[Any]]) -> None:
        try:
            await job()
        except BaseException:
            stop.set()
            raise

    try:
        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(run, job)
    except BaseExceptionGroup as eg:
        raise first_error(eg) from None


async def _reason(fs: FrameStream, err: TransportError) -> TransportError:
    """After a failed send: the receiver's ERROR frame if it left one, else the send error."""
    with trio.move_on_after(1.0):
        try:
            while True:
                await fs.receive(None)
        except PeerReportedError as e:
            return e
        except MigratorError:
            pass
    return err


async def _open_channel(host: str, port: int, key: bytes | None, session: bytes, channel: int,
                        ssl_context, then: wire.Message | None = None,
                        encrypt: bool = False) -> FrameStream:
    try:
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    except OSError as e:
        raise TransportError(f"cannot connect to {host}:{port}: {e.strerror or e}") from None
    peer = f"receiver {host}:{port}"
    if ssl_context is not None:
        stream = trio.SSLStream(stream, ssl_context, server_hostname=host)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as e:
            await trio.aclose_forcefully(stream)
            raise TransportError(f"TLS handshake with {peer} failed: {e.__cause__ or e}") from None
    fs = FrameStream(stream, peer)
    try:
        await client_handshake(fs, key, session, channel, then, encrypt)
    except MigratorError as e:
        await fs.send_error(f"sender gives up: {e}")
        await fs.aclose()
        raise
    return fs


@asynccontextmanager
async def connect_sender(host: str, port: int, *, key: bytes | None, regions: list[RegionSpec],
                         channels: int = 1, page_size: int = 4096,
                         max_bandwidth: float | None = None, ssl_context=None,
                         batch_pages: int = DEFAULT_BATCH_PAGES,
                         encrypt: bool = False, compress: str = "none",
                         delta_cache: int = 0) -> AsyncIterator[Sender]:
    """Open a migration session to a receiver and yield its Sender.

    Args:
        host, port: the receiver.
        key: the pre-shared key (load_key), or None if the receiver runs without one.
        regions: what will be migrated (names unique; start/end page-aligned).
        channels: parallel TCP connections (1..16).
        page_size: bytes per page (a power of two, 4 KiB..2 MiB).
        max_bandwidth: bytes/s cap over all channels, or None.
        ssl_context: client TLS context (auth.client_ssl_context), or None.
        batch_pages: pages read and sent per batch.
        encrypt: encrypt every frame after the handshake (AES-GCM; needs a key).  With a key,
            frames are always authenticated (docs/protocol.md).
        compress: "none", "zstd", "lz4" (every batch that shrinks), or "auto" (zstd, only
            while the link is the bottleneck): see transport/compress.py.
        delta_cache: bytes of copies of pages sent, against which pages sent again go as
            deltas (transport/delta.py; delta.auto_cache_bytes() for a default); 0: never.

    Raises:
        TransportError / AuthError / ProtocolError: connecting, authenticating or set-up failed.

    Leaving the block without finish() aborts the session (the receiver marks it failed).
    """
    if not 1 <= channels <= wire.MAX_CHANNELS:
        raise MigratorError(f"channels must be 1..{wire.MAX_CHANNELS}, got {channels}")
    if not (wire.MIN_PAGE_SIZE <= page_size <= wire.MAX_PAGE_SIZE and not page_size & (page_size - 1)):
        raise MigratorError(f"bad page size {page_size}")
    if not 1 <= batch_pages <= wire.MAX_DATA // page_size:
        raise MigratorError(f"batch_pages must be 1..{wire.MAX_DATA // page_size}")
    for r in regions:
        if r.start % page_size or r.end % page_size or r.end <= r.start:
            raise RegionError(f"region {r.name!r} {r.start:#x}-{r.end:#x} is not page-aligned or empty")
    if delta_cache and delta_cache < page_size:
        raise MigratorError(f"delta cache of {delta_cache} bytes: less than a page ({page_size})")
    session = secrets.token_bytes(wire.SESSION_ID_SIZE)
    opened: list[FrameStream] = []
    sender: Sender | None = None
    try:
        # (SETUP goes right after our proof, not after the receiver's WELCOME)
        fs0 = await _open_channel(host, port, key, session, 0, ssl_context,
                                  then=wire.Setup(page_size, channels, tuple(regions), codec_for(compress),
                                                  bool(delta_cache)),
                                  encrypt=encrypt)
        opened.append(fs0)
        await fs0.expect(wire.SetupOk)
        for i in range(1, channels):
            try:
                opened.append(await _open_channel(host, port, key, session, i, ssl_context, encrypt=encrypt))
            except (PeerReportedError, AuthError):
                raise
            except TransportError as e:
                # the receiver may have said why on channel 0 (it stops, the session failed)
                # before dropping this one mid-handshake
                raise await _reason(fs0, e) from None
        sender = Sender(opened, list(regions), page_size, max_bandwidth, batch_pages, compress, delta_cache)
        yield sender
        if not sender._finished:
            raise MigratorError("session left without finish()")
    except BaseException as e:
        with trio.CancelScope(shield=True):
            why = (str(e) if isinstance(e, MigratorError)
                   else "the migration was stopped" if isinstance(e, trio.Cancelled) else type(e).__name__)
            for fs in opened:
                await fs.send_error(f"sender aborted: {why}"[:wire.MAX_MESSAGE])
        raise
    finally:
        for fs in opened:
            await fs.aclose()
        if sender is not None:
            sender._free_buffers()
