"""The frame decoder: bytes in, checked messages out, with no I/O of its own (sans-IO).

Every way of reading frames (FrameStream.receive on the event loop, receive_blocking in a
worker thread) drives one FrameDecoder, so the frame state machine, the header's limits and
type check, the seal's tag check and the BATCH checks are written once, here:

    decoder = FrameDecoder("sender 1.2.3.4:5")
    while not isinstance(step := decoder.next_frame(expect), RawFrame):
        if step.into is None:                       # header, meta or tag bytes
            decoder.feed(read_at_least(step.nbytes))   # b"" once the peer closed
        else:                                       # page data: straight into our buffer
            k = recv_into(step.into)
            decoder.filled(k)                       # (0 < k <= len(step.into); or eof())
    message = decoder.decode(step, page_size)       # the CPU work: tag, msgpack, batch hash

A frame moves through four states: header (12 bytes, checked by wire.parse_header before
anything else is read), meta, page data (BATCH only, read into one of three reusable page
buffers: the I/O side reads it there itself, so page data is never copied through the decoder),
tag (16 bytes, once armed with a FrameSeal).  decode() is apart so that a caller may run it off
the event loop for a large batch.
"""

from __future__ import annotations

import dataclasses
import enum
import mmap
from dataclasses import dataclass

from ..errors import PeerClosed, PeerReportedError, ProtocolError, TruncatedFrameError
from . import compress, wire
from .seal import TAG_SIZE, FrameSeal


def page_buffer(nbytes: int) -> mmap.mmap:
    """An anonymous mapping for page data (memory taken as it is written, never zeroed up front
    as a bytearray would be; see framing.populate_in_background)."""
    return mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


@dataclass(frozen=True)
class Need:
    """What the decoder needs before it can go on: at least nbytes more bytes.  into is None:
    give them to feed() (read as many as convenient: the rest is kept for the next frames);
    else read exactly len(into) bytes of page data straight into that view, then filled()."""

    nbytes: int
    into: memoryview | None = None


@dataclass(frozen=True)
class RawFrame:
    """A whole frame as read, not yet checked beyond its header: see FrameDecoder.decode."""

    t: wire.T
    header: bytes
    meta: bytes
    data: memoryview | None     # BATCH page data (a view of a page buffer), else None
    tag: bytes                  # b"" when not sealed

    @property
    def data_len(self) -> int:
        return len(self.data) if self.data is not None else 0


class _State(enum.Enum):
    HEADER = "a frame header"
    META = "meta"
    DATA = "page data"
    TAG = "tag"


class FrameDecoder:
    """One direction of one connection: turns the bytes read into checked messages.

    Args:
        peer: who sends the frames, for errors ("sender 1.2.3.4:5").
    """

    def __init__(self, peer: str = "peer"):
        self.peer = peer
        self.codec = compress.NONE      # the codec BATCH data may use (receiver: SETUP's)
        self.delta = False              # BATCH data may be deltas (receiver: SETUP's)
        self._seal: FrameSeal | None = None
        self._buf = bytearray()         # bytes fed but not consumed yet, from _pos on
        self._pos = 0
        # page data rotates through three buffers: one being written out, one queued, one arriving
        self._bufs: list[mmap.mmap | None] = [None, None, None]
        self._which = 0
        self._state = _State.HEADER
        # the frame being read
        self._t = wire.T.ERROR
        self._header = b""
        self._meta = b""
        self._meta_len = 0
        self._data: memoryview | None = None
        self._got = 0                   # bytes of page data read so far

    # -- set-up --------------------------------------------------------------------------------

    def arm(self, seal: FrameSeal) -> None:
        """From the next frame on, every frame carries a tag that decode() checks."""
        self._seal = seal

    @property
    def sealed(self) -> bool:
        return self._seal is not None

    def reserve(self, nbytes: int) -> list[mmap.mmap]:
        """Have the page buffers hold nbytes already; returns the ones made now (the caller
        faults their memory in off the data path)."""
        fresh = []
        for i, buf in enumerate(self._bufs):
            if buf is None or len(buf) < nbytes:
                self._bufs[i] = page_buffer(nbytes)
                fresh.append(self._bufs[i])
        return fresh

    def close(self) -> None:
        """Drop the buffers now (not when a reference cycle through a failed session's
        traceback is collected: 12 MiB a channel otherwise stayed mapped)."""
        self._bufs = [None, None, None]
        self._buf = bytearray()
        self._pos = 0
        self._data = None

    # -- input ---------------------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes fed and not consumed yet."""
        return len(self._buf) - self._pos

    def feed(self, chunk: bytes) -> None:
        """Bytes read from the connection, in order; b"" means the peer closed it (eof())."""
        if not chunk:
            self.eof()
        if self._state is _State.DATA and not self.buffered:
            assert self._data is not None      # (page data: straight into its buffer)
            take = min(len(chunk), len(self._data) - self._got)
            self._data[self._got:self._got + take] = chunk[:take]
            self._got += take
            chunk = chunk[take:]
            if not chunk:
                return
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += chunk

    def filled(self, n: int) -> None:
        """n bytes were read into the view of the last Need(into=...)."""
        assert self._state is _State.DATA and self._data is not None
        if not 0 <= n <= len(self._data) - self._got:
            raise ValueError(f"filled({n}) with {len(self._data) - self._got} bytes wanted")
        self._got += n

    def eof(self) -> None:
        """The peer closed the connection: PeerClosed between frames, else TruncatedFrameError
        naming what was cut and how much of it had come."""
        if self._state is _State.HEADER and not self.buffered:
            raise PeerClosed(f"{self.peer} closed the connection")
        what, have, want = {
            _State.HEADER: ("a frame header", self.buffered, wire.HEADER_SIZE),
            _State.META: (f"a {self._t.name} frame", self.buffered, self._meta_len),
            _State.DATA: (f"a {self._t.name} frame's page data", self._got, self._data_len()),
            _State.TAG: (f"a {self._t.name} frame's tag", self.buffered, TAG_SIZE),
        }[self._state]
        raise TruncatedFrameError(f"truncated frame: {self.peer} went away in the middle of "
                                  f"{what} ({have} of {want} bytes)")

    def _data_len(self) -> int:
        return len(self._data) if self._data is not None else 0

    # -- the state machine -------------------------------------------------------------------

    def next_frame(self, expect: tuple[type, ...] | None = None) -> Need | RawFrame:
        """The next whole frame, or what must be read first.  expect: the message classes
        acceptable now (ERROR always is); another type is refused on its header, before its
        meta is read.  ProtocolError for a bad or oversized header."""
        if self._state is _State.HEADER:
            if self.buffered < wire.HEADER_SIZE:
                return Need(wire.HEADER_SIZE - self.buffered)
            self._header = self._take(wire.HEADER_SIZE)
            t, self._meta_len, data_len = wire.parse_header(self._header)
            self._t = t
            if expect is not None and t is not wire.T.ERROR and t not in {wire.type_of(k) for k in expect}:
                want = " or ".join(wire.type_of(k).name for k in expect)
                raise ProtocolError(f"unexpected {t.name} from {self.peer} (expected {want})")
            self._data = self._next_buffer(data_len) if data_len else None
            self._got = 0
            self._state = _State.META
        if self._state is _State.META:
            if self.buffered < self._meta_len:
                return Need(self._meta_len - self.buffered)
            self._meta = self._take(self._meta_len)
            self._state = _State.DATA
        if self._state is _State.DATA:
            data = self._data
            if data is not None and self._got < len(data):
                if self.buffered:           # what was read along with the meta
                    have = min(self.buffered, len(data) - self._got)
                    data[self._got:self._got + have] = self._buf[self._pos:self._pos + have]
                    self._pos += have
                    self._got += have
                if self._got < len(data):
                    return Need(len(data) - self._got, data[self._got:])
            self._state = _State.TAG
        tag = b""
        if self._seal is not None:
            if self.buffered < TAG_SIZE:
                return Need(TAG_SIZE - self.buffered)
            tag = self._take(TAG_SIZE)
        frame = RawFrame(self._t, self._header, self._meta, self._data, tag)
        self._data = None
        self._state = _State.HEADER
        return frame

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[self._pos:self._pos + n])
        self._pos += n
        return out

    def _next_buffer(self, n: int) -> memoryview:
        """The next of the three page buffers, at least n bytes: a view stays valid until the
        third-next frame with page data."""
        self._which = (self._which + 1) % 3
        buf = self._bufs[self._which]
        if buf is None or len(buf) < n:
            buf = self._bufs[self._which] = page_buffer(n)
        return memoryview(buf)[:n]

    # -- checking --------------------------------------------------------------------------------

    def decode(self, frame: RawFrame, page_size: int | None = None) -> wire.Message:
        """The frame's message: its tag checked first (when sealed: nothing unauthenticated is
        parsed), then its meta validated; a BATCH's data decompressed (with the codec the
        session announced) and its hash checked, the page hashes kept.  Call it for each frame
        in order (the seal counts them).  ERROR raises PeerReportedError."""
        meta = frame.meta
        if self._seal is not None:
            meta = self._seal.open(frame.header, meta, frame.data, frame.tag)
        msg = wire.decode(frame.t, meta, frame.data_len, page_size)
        if isinstance(msg, wire.Batch):
            return self._batch(msg, frame.data, page_size or wire.MIN_PAGE_SIZE)
        if isinstance(msg, wire.Error):
            raise PeerReportedError(f"{self.peer} reported: {msg.message}", reason=msg.message)
        return msg

    def _batch(self, msg: wire.Batch, view: memoryview | None, page_size: int) -> wire.Batch:
        if view is None:        # (zero runs only)
            view = memoryview(b"")
        if msg.compression == wire.DELTA:
            # checked where it is applied: the hash of a page is known once it is patched
            if not self.delta:
                raise ProtocolError(f"BATCH of region #{msg.region}, round {msg.round_no}: deltas, "
                                    f"which the session did not announce")
            return dataclasses.replace(msg, data=view)
        if msg.compression:
            what = (f"BATCH of region #{msg.region}, round {msg.round_no}, from page "
                    f"{msg.data_flat[0] if msg.data_flat else 0}")
            if msg.compression != self.codec:
                raise ProtocolError(f"{what}: compressed with {compress.CODEC_NAMES[msg.compression]}, "
                                    f"which the session did not announce")
            view = memoryview(compress.decompress(msg.compression, view, msg.pages_data * page_size, what))
        hashes = wire.check_digest(msg, view, page_size)
        return dataclasses.replace(msg, data=view, page_hashes=hashes)
