"""Frames over a trio stream: reading (page data straight into a reused buffer), writing, and
turning connection failures into TransportError.  Both readers, receive() on the event loop and
receive_blocking() in a worker thread, only move bytes: the frame decoder (decoder.py) says what
to read next and checks what was read; parsing is wire.py's."""

from __future__ import annotations

import mmap
import os
import select
import socket
import threading
from typing import Any, Callable

import trio

from ._native import ffi, lib
from ..errors import PeerClosed, StoppedError, TransportError
from . import wire
from .decoder import FrameDecoder, RawFrame, page_buffer
from .seal import FrameSeal

_SMALL_READ = 4096          # headers and metadata are read with reads this small, so page data
                            # is never read ahead into the frame buffer (and copied again)
BULK_BYTES = 256 << 10      # page data at least this large moves in a worker thread
SOCKET_BUFFER = 4 << 20     # SO_SNDBUF / SO_RCVBUF asked for
STALL_S = 60.0              # a bulk transfer with no progress for this long fails

Stop = Callable[[], bool]       # polled by blocking I/O in worker threads: True = give up


def _never() -> bool:
    return False


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


class FrameStream:
    """One connection: send and receive whole frames."""

    def __init__(self, stream: trio.abc.Stream, peer: str = "peer"):
        self.stream = stream
        self.peer = peer
        self._decoder = FrameDecoder(peer)
        # plain TCP: page data goes straight from the socket into our buffer with recv_into
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self.bytes_sent = 0             # bytes on the wire so far (see _count_sent)
        self._sent_lock = threading.Lock()
        self._send_broken = False     # a send was interrupted part-way (see send_raw)
        self._closing = False
        self._raw: socket.socket | None = None
        self._io_lock = threading.Lock()    # held by a worker thread while it moves page data
        self._send_seal: FrameSeal | None = None    # see arm()
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
            self._decoder.arm(recv)

    @property
    def sealed(self) -> bool:
        return self._decoder.sealed

    @property
    def codec(self) -> int:
        """The codec BATCH data may be compressed with (receiver: the one SETUP announced)."""
        return self._decoder.codec

    @codec.setter
    def codec(self, codec: int) -> None:
        self._decoder.codec = codec

    @property
    def delta(self) -> bool:
        """BATCH data may be deltas (receiver: SETUP allowed them)."""
        return self._decoder.delta

    @delta.setter
    def delta(self, on: bool) -> None:
        self._decoder.delta = on

    @property
    def encrypts(self) -> bool:
        """Frames sent are encrypted (in place: their data must be in writable buffers)."""
        return self._send_seal is not None and self._send_seal.mode == "aead"

    # -- bulk page data: straight syscalls in a worker thread, not one trio wake-up per chunk --

    def _bulk(self, view: memoryview, sending: bool, stop: Stop = _never) -> int:
        """Send or receive all of view on the (non-blocking) socket: a C loop (send/recv and
        poll, without the GIL), back in Python every 200 ms to check for a stop.  Returns the
        bytes moved: len(view), or fewer if the peer closed the connection (receiving)."""
        with self._io_lock:
            if self._closing:
                raise TransportError(f"connection to {self.peer} closed")
            if self._raw is None:    # a stdlib socket on a dup of the fd (same non-blocking file)
                self._raw = socket.fromfd(self._sock.fileno(), self._sock.family, self._sock.type)
            # released on the way out, even by an exception: a memoryview still exported when
            # a traceback's frame dies in a reference cycle crashes CPython's garbage collector
            with ffi.from_buffer(view, require_writable=not sending) as buf:
                return self._move(buf, len(view), sending, stop)

    def _move(self, buf, n: int, sending: bool, stop: Stop) -> int:
        assert self._raw is not None
        done = ffi.new("uint64_t *")
        idle = 0.0
        while True:
            before = done[0]
            r = lib.mg_sock_io(self._raw.fileno(), buf, n, int(sending), 200, done)
            if r == lib.MG_IO_DONE or r == lib.MG_IO_EOF:
                return done[0]
            if r == lib.MG_IO_AGAIN:
                if self._closing:
                    raise TransportError(f"connection to {self.peer} closed")
                if stop():
                    raise StoppedError(f"connection to {self.peer} closed")
                idle = idle + 0.2 if done[0] == before else 0.0
                if idle >= STALL_S:
                    raise TransportError(f"connection to {self.peer} stalled for {STALL_S:.0f} s")
                continue
            raise TransportError(f"connection to {self.peer} lost ({os.strerror(-r)})")

    # -- blocking receive, for a worker thread that pumps page batches ----------------------

    @property
    def can_block(self) -> bool:
        """Plain TCP: frames can be read with blocking calls from a worker thread."""
        return self._sock is not None

    def _recv_some_blocking(self, n: int, stop: Stop) -> bytes:
        """Up to n bytes (at least one; b"" once the peer closed the connection)."""
        if self._raw is None:
            self._raw = socket.fromfd(self._sock.fileno(), self._sock.family, self._sock.type)
        poller = select.poll()
        poller.register(self._raw.fileno(), select.POLLIN)
        idle = 0.0
        while True:
            if self._closing:
                raise TransportError(f"connection to {self.peer} closed")
            if stop():
                raise StoppedError(f"connection to {self.peer} closed")
            try:
                return self._raw.recv(n)
            except BlockingIOError:
                if not poller.poll(200):
                    idle += 0.2
                    if idle >= STALL_S:
                        raise TransportError(f"connection to {self.peer} stalled for {STALL_S:.0f} s") from None
            except OSError as e:
                raise TransportError(f"connection to {self.peer} lost ({e})") from None

    def reserve(self, nbytes: int) -> None:
        """Have the page-data buffers hold nbytes already, their memory faulted in while the
        session sets up (not by the first batches)."""
        populate_in_background(self._decoder.reserve(nbytes))

    def receive_blocking(self, page_size: int, expect: tuple[type, ...] | None = None,
                         stop: Stop = _never) -> wire.Message:
        """receive() for a worker thread (plain TCP only): blocks, polling stop every 200 ms
        (True: TransportError); a Batch's data is a view of one of three buffers used in turn,
        valid until the third-next call."""
        d = self._decoder
        while not isinstance(step := d.next_frame(expect), RawFrame):
            if step.into is None:
                d.feed(self._recv_some_blocking(max(step.nbytes, _SMALL_READ), stop))
            else:
                k = self._bulk(step.into, False, stop)
                d.filled(k)
                if k < len(step.into):
                    d.eof()
        return d.decode(step, page_size)

    # -- sending ---------------------------------------------------------------------------

    def send_blocking(self, head: bytes, data: Any = None, stop: Stop = _never) -> None:
        """send_raw() for a worker thread (plain TCP only), polling stop every 200 ms while
        the peer takes nothing (True: TransportError)."""
        self._check_sendable()
        pieces = _pieces(data)
        tag = b""
        if self._send_seal is not None:
            head, tag = self._send_seal.seal(head, pieces)
        try:
            self._bulk(memoryview(head), True, stop)
            for piece in pieces:
                self._bulk(memoryview(piece).cast("B"), True, stop)
            if tag:
                self._bulk(memoryview(tag), True, stop)
        except BaseException:
            self._send_broken = True
            raise
        self._count_sent(len(head) + sum(len(p) for p in pieces) + len(tag))

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
        self._count_sent(len(head) + sum(len(p) for p in pieces) + len(tag))

    def _count_sent(self, nbytes: int) -> None:
        """A frame went out (from a worker thread or the event loop: under a lock)."""
        with self._sent_lock:
            self.bytes_sent += nbytes

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
        self._decoder.close()
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

    async def _recv_into(self, view: memoryview) -> int:
        """Up to len(view) bytes of page data into view, from the event loop (plain TCP): the
        bytes read, 0 once the peer closed the connection."""
        k = -1
        try:
            with trio.move_on_after(STALL_S):
                k = await self._sock.recv_into(view, len(view))
        except OSError as e:
            raise TransportError(f"connection to {self.peer} lost ({e})") from None
        if k < 0:
            raise TransportError(f"connection to {self.peer} stalled: nothing received "
                                 f"for {STALL_S:.0f} s")
        return k

    async def receive(self, page_size: int | None = None,
                      expect: tuple[type, ...] | None = None) -> wire.Message:
        """The next frame, checked (its tag first, when sealed) and validated.  expect: the
        message types acceptable now (others are refused before their meta is read).  A
        Batch's data is a memoryview of one of three buffers used in turn: it stays valid until
        the third-next batch is received (so one batch can be written while the next one
        arrives).  An ERROR frame raises PeerReportedError."""
        d = self._decoder
        while not isinstance(step := d.next_frame(expect), RawFrame):
            into = step.into
            if into is None or self._sock is None:      # (TLS: fed into the page buffer)
                d.feed(await self._receive_some(step.nbytes))
            elif len(into) >= BULK_BYTES:
                k = await trio.to_thread.run_sync(self._bulk, into, False)
                d.filled(k)
                if k < len(into):
                    d.eof()
            else:
                k = await self._recv_into(into)
                if not k:
                    d.eof()
                d.filled(k)
        if step.data_len >= BULK_BYTES and d.sealed:      # (the tag over the page data)
            return await trio.to_thread.run_sync(d.decode, step, page_size)
        return d.decode(step, page_size)

    async def expect(self, kind: type, page_size: int | None = None) -> Any:
        return await self.receive(page_size, expect=(kind,))


def _pieces(data: Any) -> tuple:
    """A frame's payload as the non-empty buffers to send in order."""
    if data is None:
        return ()
    return tuple(d for d in (data if isinstance(data, tuple) else (data,)) if len(d))


__all__ = ["FrameStream", "PeerClosed", "page_buffer", "populate_in_background"]
