"""Frames over a trio stream: buffered reading (straight into a reused buffer for page data),
writing, and turning connection failures into TransportError.  All parsing is delegated to
wire.py."""

from __future__ import annotations

import dataclasses
import mmap
import os
import select
import socket
import threading
from typing import Any

import trio

from ._native import ffi, lib
from ..errors import PeerReportedError, ProtocolError, TransportError
from . import wire
from . import compress
from .seal import TAG_SIZE, FrameSeal

_SMALL_READ = 4096          # headers and metadata are read with reads this small, so page data
                            # is never read ahead into the frame buffer (and copied again)
BULK_BYTES = 256 << 10      # page data at least this large moves in a worker thread
SOCKET_BUFFER = 4 << 20     # SO_SNDBUF / SO_RCVBUF asked for
STALL_S = 60.0              # a bulk transfer with no progress for this long fails


def page_buffer(nbytes: int) -> mmap.mmap:
    """An anonymous mapping for page data (memory taken as it is written, never zeroed up front
    as a bytearray would be; see populate_in_background)."""
    return mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def populate_in_background(buffers: list[mmap.mmap]) -> threading.Event:
    """Fault the buffers' memory in from a daemon thread (MADV_POPULATE_WRITE, one C call each,
    without the GIL), so neither session set-up nor the first batches pay for it.  Harmless if a
    batch writes a buffer meanwhile; on kernels without it, the first batches fault it in.
    Returns an event set once done."""
    done = threading.Event()

    def run() -> None:
        try:
            for b in buffers:
                try:        # (the export keeps the buffer mapped while it is populated)
                    with ffi.from_buffer(b) as p:
                        lib.mg_populate(p, len(b), 1)
                except ValueError:      # closed already
                    continue
        finally:
            done.set()
    threading.Thread(target=run, name="populate-buffers", daemon=True).start()
    return done


class PeerClosed(TransportError):
    """The peer closed the connection at a frame boundary."""


class FrameStream:
    """One connection: send and receive whole frames."""

    def __init__(self, stream: trio.abc.Stream, peer: str = "peer"):
        self.stream = stream
        self.peer = peer
        self._buf = bytearray()
        self._pos = 0
        # page data rotates through three buffers: one being written out, one queued, one arriving
        self._bufs: list[mmap.mmap | None] = [None, None, None]
        self._which = 0
        # plain TCP: page data goes straight from the socket into our buffer with recv_into
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self.bytes_sent = 0
        self._send_broken = False     # a send was interrupted part-way (see send_raw)
        self._closing = False
        self._raw: socket.socket | None = None
        self._io_lock = threading.Lock()    # held by a worker thread while it moves page data
        self.should_stop = lambda: False    # polled by blocking reads in worker threads
        self.codec = compress.NONE              # receiver: the codec batches may use (SETUP)
        self._send_seal: FrameSeal | None = None    # see arm()
        self._recv_seal: FrameSeal | None = None
        if self._sock is not None:
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                try:
                    self._sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
                except OSError:
                    pass

    def arm(self, send: FrameSeal | None = None, recv: FrameSeal | None = None) -> None:
        """From now on, seal every frame sent (send) / check every frame received (recv)."""
        if send is not None:
            self._send_seal = send
        if recv is not None:
            self._recv_seal = recv

    @property
    def sealed(self) -> bool:
        return self._recv_seal is not None

    @property
    def encrypts(self) -> bool:
        """Frames sent are encrypted (in place: their data must be in writable buffers)."""
        return self._send_seal is not None and self._send_seal.mode == "aead"

    # -- bulk page data: straight syscalls in a worker thread, not one trio wake-up per chunk --

    def _bulk(self, view: memoryview, sending: bool) -> None:
        """Send or receive all of view on the (non-blocking) socket: a C loop (send/recv and
        poll, without the GIL), back in Python every 200 ms to check for a stop."""
        with self._io_lock:
            if self._closing:
                raise TransportError(f"connection to {self.peer} closed")
            if self._raw is None:    # a stdlib socket on a dup of the fd (same non-blocking file)
                self._raw = socket.fromfd(self._sock.fileno(), self._sock.family, self._sock.type)
            # released on the way out, even by an exception: a memoryview still exported when
            # a traceback's frame dies in a reference cycle crashes CPython's garbage collector
            with ffi.from_buffer(view, require_writable=not sending) as buf:
                self._move(buf, len(view), sending)

    def _move(self, buf, n: int, sending: bool) -> None:
        assert self._raw is not None
        done = ffi.new("uint64_t *")
        idle = 0.0
        while True:
            before = done[0]
            r = lib.mg_sock_io(self._raw.fileno(), buf, n, int(sending), 200, done)
            if r == lib.MG_IO_DONE:
                return
            if r == lib.MG_IO_AGAIN:
                if self._closing or self.should_stop():
                    raise TransportError(f"connection to {self.peer} closed")
                idle = idle + 0.2 if done[0] == before else 0.0
                if idle >= STALL_S:
                    raise TransportError(f"connection to {self.peer} stalled for {STALL_S:.0f} s")
                continue
            if r == lib.MG_IO_EOF:
                raise ProtocolError(f"truncated frame: {self.peer} went away in the middle of "
                                    f"a BATCH frame's page data ({done[0]} of {n} bytes)")
            raise TransportError(f"connection to {self.peer} lost ({os.strerror(-r)})")

    # -- blocking receive, for a worker thread that pumps page batches ----------------------

    @property
    def can_block(self) -> bool:
        """Plain TCP: frames can be read with blocking calls from a worker thread."""
        return self._sock is not None

    def _recv_some_blocking(self, n: int) -> bytes:
        if self._raw is None:
            self._raw = socket.fromfd(self._sock.fileno(), self._sock.family, self._sock.type)
        poller = select.poll()
        poller.register(self._raw.fileno(), select.POLLIN)
        idle = 0.0
        while True:
            if self._closing or self.should_stop():
                raise TransportError(f"connection to {self.peer} closed")
            try:
                return self._raw.recv(n)
            except BlockingIOError:
                if not poller.poll(200):
                    idle += 0.2
                    if idle >= STALL_S:
                        raise TransportError(f"connection to {self.peer} stalled for {STALL_S:.0f} s") from None
            except OSError as e:
                raise TransportError(f"connection to {self.peer} lost ({e})") from None

    def _read_exact_blocking(self, n: int, what: str, at_boundary: bool = False) -> bytes:
        while self._missing(n):
            self._absorb(self._recv_some_blocking(max(self._missing(n), _SMALL_READ)), n, what,
                         at_boundary)
        return self._take(n)

    # the frame buffer, shared by the event-loop and the blocking readers (never both at once)

    def reserve(self, nbytes: int) -> None:
        """Have the page-data buffers hold nbytes already, their memory faulted in while the
        session sets up (not by the first batches)."""
        fresh = []
        for i, buf in enumerate(self._bufs):
            if buf is None or len(buf) < nbytes:
                self._bufs[i] = page_buffer(nbytes)
                fresh.append(self._bufs[i])
        populate_in_background(fresh)

    def _next_buffer(self, n: int) -> memoryview:
        """The next of the three page-data buffers, at least n bytes."""
        self._which = (self._which + 1) % 3
        buf = self._bufs[self._which]
        if buf is None or len(buf) < n:
            buf = self._bufs[self._which] = page_buffer(n)
        return memoryview(buf)[:n]

    def _missing(self, n: int) -> int:
        """Bytes still to read before n are buffered."""
        return max(0, n - (len(self._buf) - self._pos))

    def _absorb(self, chunk: bytes, n: int, what: str, at_boundary: bool) -> None:
        """Append what a read returned; an empty read means the peer went away."""
        if not chunk:
            have = len(self._buf) - self._pos
            if at_boundary and have == 0:
                raise PeerClosed(f"{self.peer} closed the connection")
            raise ProtocolError(f"truncated frame: {self.peer} went away in the middle of "
                                f"{what} ({have} of {n} bytes)")
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += chunk

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[self._pos:self._pos + n])
        self._pos += n
        return out

    def receive_blocking(self, page_size: int, expect: tuple[type, ...] | None = None) -> wire.Message:
        """receive() for a worker thread (plain TCP only): blocks; a Batch's data is a view of
        one of three buffers used in turn, valid until the third-next call."""
        header = self._read_exact_blocking(wire.HEADER_SIZE, "a frame header", at_boundary=True)
        t, meta_len, data_len = self._check_header(header, expect)
        meta = self._read_exact_blocking(meta_len, f"a {t.name} frame")
        view = None
        if data_len:
            view = self._next_buffer(data_len)
            have = min(len(self._buf) - self._pos, data_len)
            view[:have] = self._buf[self._pos:self._pos + have]
            self._pos += have
            if have < data_len:
                self._bulk(view[have:], False)
        if self._recv_seal is not None:
            tag = self._read_exact_blocking(TAG_SIZE, f"a {t.name} frame's tag")
            meta = self._recv_seal.open(header, meta, view, tag)
        return self._decoded(t, meta, data_len, page_size, view)

    def _check_header(self, header: bytes, expect: tuple[type, ...] | None) -> tuple[wire.T, int, int]:
        """The header's fields; a frame type the caller does not expect now is refused before
        its meta is read (ERROR is always expected)."""
        t, meta_len, data_len = wire.parse_header(header)
        if expect is not None and t is not wire.T.ERROR and t not in {wire.type_of(k) for k in expect}:
            want = " or ".join(k.__name__.upper() for k in expect)
            raise ProtocolError(f"unexpected {t.name} from {self.peer} (expected {want})")
        return t, meta_len, data_len

    def _decoded(self, t: wire.T, meta: bytes, data_len: int, page_size: int | None,
                 view: memoryview | None) -> wire.Message:
        msg = wire.decode(t, meta, data_len, page_size)
        if isinstance(msg, wire.Batch):
            if view is None:        # (zero runs only)
                view = memoryview(b"")
            if msg.compression:
                what = (f"BATCH of region #{msg.region}, round {msg.round_no}, from page "
                        f"{msg.data_flat[0] if msg.data_flat else 0}")
                if msg.compression != self.codec:
                    raise ProtocolError(f"{what}: compressed with "
                                        f"{compress.CODEC_NAMES[msg.compression]}, which the session "
                                        f"did not announce")
                view = memoryview(compress.decompress(msg.compression, view,
                                                      msg.pages_data * (page_size or 4096), what))
            hashes = wire.check_digest(msg, view, page_size or 4096)
            return dataclasses.replace(msg, data=view, page_hashes=hashes)
        if isinstance(msg, wire.Error):
            raise PeerReportedError(f"{self.peer} reported: {msg.message}")
        return msg

    # -- sending ---------------------------------------------------------------------------

    def send_blocking(self, head: bytes, data: Any = None) -> None:
        """send_raw() for a worker thread (plain TCP only)."""
        self._check_sendable()
        pieces = _pieces(data)
        tag = b""
        if self._send_seal is not None:
            head, tag = self._send_seal.seal(head, pieces)
        try:
            self._bulk(memoryview(head), True)
            for piece in pieces:
                self._bulk(memoryview(piece).cast("B"), True)
            if tag:
                self._bulk(memoryview(tag), True)
        except BaseException:
            self._send_broken = True
            raise
        self.bytes_sent += len(head) + sum(len(p) for p in pieces) + len(tag)

    async def send(self, msg: wire.Message) -> None:
        await self.send_raw(wire.encode(msg))

    async def send_raw(self, head: bytes, data: Any = None) -> None:
        """Send head (header + meta), then data: a buffer, or a tuple of buffers sent one after
        the other; sealed if armed (then data is encrypted in place in "aead" mode).

        A send interrupted part-way (cancelled, or failed) leaves the stream unable to send:
        a frame may be half out, and its sequence number is spent (a later frame would fail the
        peer's authentication, as if the link had been tampered with)."""
        self._check_sendable()
        pieces = _pieces(data)
        tag = b""
        if self._send_seal is not None:
            if sum(len(p) for p in pieces) >= BULK_BYTES:
                head, tag = await trio.to_thread.run_sync(self._send_seal.seal, head, pieces)
            else:
                head, tag = self._send_seal.seal(head, pieces)
        try:
            await self._send_all(head)
            for piece in pieces:
                if self._sock is not None and len(piece) >= BULK_BYTES:
                    view = memoryview(piece).cast("B")
                    await trio.to_thread.run_sync(self._bulk, view, True)
                else:
                    await self._send_all(piece)
            if tag:
                await self._send_all(tag)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self._send_broken = True
            raise TransportError(f"connection to {self.peer} lost while sending ({e or 'closed'})") from None
        except BaseException:
            self._send_broken = True
            raise
        self.bytes_sent += len(head) + sum(len(p) for p in pieces) + len(tag)

    def _check_sendable(self) -> None:
        if self._send_broken:
            raise TransportError(f"connection to {self.peer}: an earlier send was interrupted "
                                 f"part-way, no frame can follow it")

    async def _send_all(self, data) -> None:
        """send_all, or TransportError once the peer has taken nothing for STALL_S."""
        with trio.move_on_after(STALL_S) as idle:
            await self.stream.send_all(data)
        if idle.cancelled_caught:
            raise TransportError(f"connection to {self.peer} stalled: nothing sent for {STALL_S:.0f} s")

    async def send_error(self, message: str) -> None:
        """Best effort: tell the peer why we give up (it may be gone already)."""
        with trio.move_on_after(2):
            try:
                await self.send(wire.Error(message))
            except TransportError:
                pass

    async def aclose(self) -> None:
        self._closing = True
        # the page buffers go now, not when a reference cycle through this stream (a failed
        # session's traceback) is collected: 12 MiB a channel otherwise stayed mapped
        self._bufs = [None, None, None]
        self._buf = bytearray()
        self._pos = 0
        if self._raw is not None:
            try:   # wakes a worker thread in the middle of page data (it then fails at once)
                self._raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._io_lock.acquire)
            try:
                self._raw.close()
                self._raw = None
            finally:
                self._io_lock.release()
        with trio.CancelScope(shield=True):
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    # -- receiving -------------------------------------------------------------------------

    async def _receive_some(self, n: int) -> bytes:
        """Up to max(n, 4 KiB) bytes; TransportError if nothing comes for STALL_S (a link that
        went silent: a peer that waits on it must not wait forever)."""
        try:
            with trio.move_on_after(STALL_S) as idle:
                return await self.stream.receive_some(max(n, _SMALL_READ))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise TransportError(f"connection to {self.peer} lost ({e or 'closed'})") from None
        assert idle.cancelled_caught
        raise TransportError(f"connection to {self.peer} stalled: nothing received for {STALL_S:.0f} s")

    async def _read_exact(self, n: int, what: str, at_boundary: bool = False) -> bytes:
        while self._missing(n):
            self._absorb(await self._receive_some(self._missing(n)), n, what, at_boundary)
        return self._take(n)

    async def _read_into(self, view: memoryview, what: str) -> None:
        n = len(view)
        have = min(len(self._buf) - self._pos, n)
        view[:have] = self._buf[self._pos:self._pos + have]
        self._pos += have
        got = have
        if self._sock is not None and n - got >= BULK_BYTES:
            await trio.to_thread.run_sync(self._bulk, view[got:], False)
            return
        while got < n:
            if self._sock is not None:
                k = -1
                try:
                    with trio.move_on_after(STALL_S):
                        k = await self._sock.recv_into(view[got:], n - got)
                except OSError as e:
                    raise TransportError(f"connection to {self.peer} lost ({e})") from None
                if k < 0:
                    raise TransportError(f"connection to {self.peer} stalled: nothing received "
                                         f"for {STALL_S:.0f} s")
                if k == 0:
                    raise ProtocolError(f"truncated frame: {self.peer} went away in the middle of "
                                        f"{what} ({got} of {n} bytes)")
                got += k
            else:
                chunk = await self._receive_some(n - got)
                if not chunk:
                    raise ProtocolError(f"truncated frame: {self.peer} went away in the middle of "
                                        f"{what} ({got} of {n} bytes)")
                take = min(len(chunk), n - got)
                view[got:got + take] = chunk[:take]
                got += take
                if take < len(chunk):  # (receive_some never returns more than asked, but be safe)
                    self._buf = bytearray(chunk[take:])
                    self._pos = 0

    async def receive(self, page_size: int | None = None,
                      expect: tuple[type, ...] | None = None) -> wire.Message:
        """The next frame, checked (its tag first, when sealed) and validated.  expect: the
        message types acceptable now (others are refused before their meta is read).  A
        Batch's data is a memoryview of one of three buffers used in turn: it stays valid until
        the third-next batch is received (so one batch can be written while the next one
        arrives).  An ERROR frame raises TransportError."""
        header = await self._read_exact(wire.HEADER_SIZE, "a frame header", at_boundary=True)
        t, meta_len, data_len = self._check_header(header, expect)
        meta = await self._read_exact(meta_len, f"a {t.name} frame")
        view = None
        if data_len:
            view = self._next_buffer(data_len)
            await self._read_into(view, "a BATCH frame's page data")
        if self._recv_seal is not None:
            tag = await self._read_exact(TAG_SIZE, f"a {t.name} frame's tag")
            if data_len >= BULK_BYTES:
                meta = await trio.to_thread.run_sync(self._recv_seal.open, header, meta, view, tag)
            else:
                meta = self._recv_seal.open(header, meta, view, tag)
        return self._decoded(t, meta, data_len, page_size, view)

    async def expect(self, kind: type, page_size: int | None = None) -> Any:
        return await self.receive(page_size, expect=(kind,))


def _pieces(data: Any) -> tuple:
    """A frame's payload as the non-empty buffers to send in order."""
    if data is None:
        return ()
    return tuple(d for d in (data if isinstance(data, tuple) else (data,)) if len(d))
