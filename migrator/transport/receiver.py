"""The destination side: accept authenticated senders, write their pages into images, verify.

One session at a time.  Channel 0 of a session authenticates, declares the regions (SETUP) and
finally ends the migration (END); channels 1..N-1 join it by session id, each authenticated on
its own.  Any error on any channel fails the whole session: every channel gets an ERROR frame and
is closed, and the manifest says complete=false with the reason.
"""

from __future__ import annotations

import gc
import queue
import threading
import traceback
import time
from dataclasses import dataclass, field
from typing import Callable

import trio

from ..errors import MigratorError, ProtocolError, StoppedError, TransportError, UsageError, first_error
from . import wire
from .auth import check_listen_policy, server_handshake
from . import compress
from .framing import FrameStream, PeerClosed
from .images import ImageSet, ManifestUncertain, check_out_dir
from .wire import RegionSpec

HANDSHAKE_TIMEOUT = 5.0       # seconds a connection may take to authenticate (and set up)
MAX_PENDING_CONNECTIONS = 64  # connections still in their handshake, from all addresses ...
MAX_PENDING_PER_ADDRESS = 8   # ... and from one address (so one host cannot lock others out)
RESERVE_BYTES = 4 << 20       # receive buffer reserved per channel at set-up (3 of them; they
                              # grow with the batches, to wire.MAX_DATA at most)
DEFAULT_MAX_MEMORY = 2 << 30  # bytes of bookkeeping and buffers one session may need
PAGE_BOOKKEEPING = 12         # bytes per declared page: a 4-byte stamp and an 8-byte hash
DRAIN_BYTES = 64 << 20
FLUSH_WAIT_S = 30.0     # a new session waits this long for the previous one's image flush
COMMIT_WAIT_S = 60.0    # after SYNCED, the sender's COMMIT must come within this


@dataclass(frozen=True)
class SessionOutcome:
    """How one session ended."""

    session: str
    peer: str
    complete: bool
    error: str | None
    regions: int
    bytes_received: int
    pages_written: int
    pages_zeroed: int
    pages_stale: int
    channels: int
    duration: float
    writeback_waits: int = 0     # round ends acknowledged only once an image was written back


@dataclass
class _Session:
    sid: bytes
    peer: str
    channels: int = 1
    images: ImageSet | None = None
    joined: set[int] = field(default_factory=set)
    closed: set[int] = field(default_factory=set)
    scopes: list[trio.CancelScope] = field(default_factory=list)
    error: str | None = None
    done: bool = False
    started: float = field(default_factory=time.monotonic)
    bytes_received: int = 0
    verdict_sent: bool = False
    compress: int = 0           # codec the sender may compress batches with
    delta: bool = False         # the sender may send delta batches
    _count_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.sid.hex()[:12]

    def count_received(self, nbytes: int) -> None:
        """Page bytes written (from every channel's writer thread at once)."""
        with self._count_lock:
            self.bytes_received += nbytes


@dataclass(frozen=True)
class _ChannelIO:
    """How a channel's batch pipeline, in a worker thread, reads frames and answers them:
    blocking calls on plain TCP (no event-loop round trip per batch), calls into the event loop
    on TLS channels."""

    receive: Callable[[tuple[type, ...]], wire.Message]   # the next frame of these types
    send: Callable[[wire.Message], None]

    @classmethod
    def of(cls, fs: FrameStream, page_size: int, stop: Callable[[], bool]) -> "_ChannelIO":
        """stop: polled by blocking calls (True: the session ended or the receiver stops)."""
        if fs.can_block:
            return cls(lambda expect: fs.receive_blocking(page_size, expect, stop),
                       lambda msg: fs.send_blocking(wire.encode(msg), stop=stop))
        return cls(lambda expect: trio.from_thread.run(fs.receive, page_size, expect),
                   lambda msg: trio.from_thread.run(fs.send, msg))


class Receiver:
    """Per-connection handler (`handle_stream`) plus the session bookkeeping.

    Args:
        out_dir: folder for the images and manifest.json.
        key: pre-shared key, or None (then the caller must listen on loopback only).
        ssl_context: server-side TLS context, or None for plain TCP.
        log: called with one line per session (and per rejected connection).
        on_session_end: called with each SessionOutcome once it is final.
        on_setup: called with the session's ImageSet once its images exist (before any page).
        on_verified: called with the session's ImageSet once its images verified complete and
            the verdict went out, before they are flushed to disk (fsync is for durability: a
            process mapping an image sees its pages already).
        image_names: called with a session's regions before its images are created: the file
            name of each (default image_name()); a MigratorError it raises refuses the session
            with its message (e.g. regions a destination VM cannot take).
        require_encryption: refuse senders that do not ask for encrypted frames.
        max_memory: bytes of memory one session may make the receiver use (page bookkeeping
            and receive buffers: session_memory()); a larger session is refused at SETUP.
    """

    def __init__(self, out_dir: str, *, key: bytes | None, ssl_context=None,
                 log: Callable[[str], None] | None = None,
                 on_session_end: Callable[[SessionOutcome], None] | None = None,
                 preallocate: bool = False,
                 on_setup: Callable[[ImageSet], None] | None = None,
                 on_verified: Callable[[ImageSet], None] | None = None,
                 image_names: Callable[[list[RegionSpec]], list[str]] | None = None,
                 require_encryption: bool = False, max_memory: int = DEFAULT_MAX_MEMORY):
        self.on_setup = on_setup
        self.require_encryption = require_encryption
        self.max_memory = max_memory
        self.image_names = image_names
        self.on_verified = on_verified
        self.out_dir = out_dir
        self.preallocate = preallocate      # fallocate each image when its session starts
        self.key = key
        self.ssl_context = ssl_context
        self.log = log if log is not None else (lambda line: None)
        self.on_session_end = on_session_end
        self.outcomes: list[SessionOutcome] = []
        self.session_ended = trio.Event()
        self._active: _Session | None = None
        self._pending = 0
        self._pending_from: dict[str, int] = {}

    # -- sessions ----------------------------------------------------------------------------

    async def _fail(self, s: _Session, reason: str) -> None:
        """Fail the session: its manifest says why, every channel is cancelled (shielded: it
        runs to its end even in a cancelled task)."""
        if s.done:
            return
        s.error = reason
        for scope in s.scopes:
            scope.cancel()
        await self._end(s, complete=False, failed=True)

    async def _end(self, s: _Session, complete: bool, failed: bool = False) -> None:
        """The session is over: its images closed (in a worker thread: writing the failed
        manifest, and closing, which waits for a fallocate under way, block), its outcome
        recorded.  failed: mark the images failed first."""
        s.done = True       # (first: nothing else ends it meanwhile)
        im = s.images
        out = SessionOutcome(
            session=s.sid.hex(), peer=s.peer, complete=complete, error=s.error,
            regions=len(im.regions) if im else 0, bytes_received=s.bytes_received,
            pages_written=im.pages_written if im else 0, pages_zeroed=im.pages_zeroed if im else 0,
            pages_stale=im.pages_stale if im else 0, channels=s.channels,
            duration=time.monotonic() - s.started, writeback_waits=im.writeback_waits if im else 0)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_close_images, im, s.error if failed else None, not complete)
        if self._active is s:       # (only now may the next session use the folder)
            self._active = None
        self.outcomes.append(out)
        mib = out.bytes_received / (1 << 20)
        if complete:
            self.log(f"session {s.name} from {s.peer}: complete, {out.regions} region(s) verified, "
                     f"{mib:.1f} MiB over {out.channels} channel(s) in {out.duration:.2f} s")
        else:
            self.log(f"session {s.name} from {s.peer}: FAILED: {s.error}")
        self.session_ended.set()
        self.session_ended = trio.Event()
        if self.on_session_end is not None:
            self.on_session_end(out)

    async def wait_sessions(self, n: int) -> list[SessionOutcome]:
        """Wait until n sessions have ended (tests, embedding)."""
        while len(self.outcomes) < n:
            await self.session_ended.wait()
        return self.outcomes[:n]

    async def serve(self, listen_host: str, port: int, *, once: bool = False,
                    task_status=trio.TASK_STATUS_IGNORED) -> list[SessionOutcome]:
        """Listen and serve until cancelled, or until one session ended if `once`.

        task_status.started() gets the bound port (useful with port 0).  Returns the outcomes.

        Raises:
            UsageError: no key on a non-loopback address, or the address cannot be bound.
        """
        check_listen_policy(listen_host, self.key)
        try:
            check_out_dir(self.out_dir)
        except MigratorError as e:
            raise UsageError(str(e)) from None
        try:
            listeners = await trio.open_tcp_listeners(port, host=listen_host)
        except OSError as e:
            raise UsageError(f"cannot listen on {listen_host}:{port}: {e.strerror or e}") from None
        if not listeners:
            raise UsageError(f"cannot listen on {listen_host}:{port}: no address")
        async with trio.open_nursery() as nursery:
            if once:
                previous = self.on_session_end

                def stop(outcome: SessionOutcome) -> None:
                    if previous is not None:
                        previous(outcome)
                    nursery.cancel_scope.cancel()
                self.on_session_end = stop
            task_status.started(listeners[0].socket.getsockname()[1])
            await trio.serve_listeners(self.handle_stream, listeners, handler_nursery=nursery)
        return self.outcomes

    # -- connections -------------------------------------------------------------------------

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one accepted connection to its end; never raises for a peer's misbehaviour."""
        peer = _peer_name(stream)
        host = _peer_host(stream)
        if self._pending >= MAX_PENDING_CONNECTIONS:
            self.log(f"connection from {peer}: rejected: too many connections in their handshake")
            await trio.aclose_forcefully(stream)
            return
        if self._pending_from.get(host, 0) >= MAX_PENDING_PER_ADDRESS:
            self.log(f"connection from {peer}: rejected: {MAX_PENDING_PER_ADDRESS} connections "
                     f"from {host} are still in their handshake")
            await trio.aclose_forcefully(stream)
            return
        self._pending += 1
        self._pending_from[host] = self._pending_from.get(host, 0) + 1
        fs = FrameStream(stream, f"sender {peer}")
        session: _Session | None = None
        try:
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    if self.ssl_context is not None:
                        stream = trio.SSLStream(stream, self.ssl_context, server_side=True)
                        fs = FrameStream(stream, f"sender {peer}")
                        try:
                            await stream.do_handshake()
                        except trio.BrokenResourceError as e:
                            raise TransportError(f"TLS handshake failed: {e.__cause__ or e}") from None
                    who = await server_handshake(fs, self.key, self.require_encryption)
                    if who.channel == 0:
                        await self._wait_idle()
                        session = self._active = _Session(who.session, peer)
                        await self._welcome(fs, who)
                        await self._set_up(fs, session, who.mode)
                    else:
                        session = self._join(who)
                        await self._welcome(fs, who)
            except trio.TooSlowError:
                raise TransportError("handshake timed out") from None
            finally:
                self._pending -= 1
                self._pending_from[host] -= 1
                if not self._pending_from[host]:
                    del self._pending_from[host]
            assert session.images is not None
            fs.codec = session.compress
            fs.delta = session.delta
            # page buffers for the usual batch, before the first one (they grow if needed)
            fs.reserve(min(wire.DEFAULT_BATCH_PAGES * session.images.page_size, RESERVE_BYTES))
            await self._serve_channel(fs, session, who.channel)
        except MigratorError as e:
            if session is None:
                self.log(f"connection from {peer}: rejected: {e}")
                await _refuse(fs, str(e))
            else:
                await self._fail(session, str(e))
        except trio.Cancelled:
            if session is not None and not session.done:
                await self._fail(session, "receiver shutting down")
            raise
        except Exception as e:
            # a bug of ours, not the peer's fault: this session fails, the receiver serves on
            # (one connection must never take down every later migration)
            what = f"receiver internal error: {type(e).__name__}: {str(e)[:200]}"
            self.log(f"connection from {peer}: {what}\n"
                     + "".join(traceback.format_exception(e, limit=-8)).rstrip())
            if session is None:
                await _refuse(fs, what)
            else:
                await self._fail(session, what)
        finally:
            if session is not None and session.error is not None and not session.verdict_sent:
                await _refuse(fs, session.error)
            await fs.aclose()

    async def _wait_idle(self) -> None:
        """Before a new session: wait for one that is only flushing or closing its images;
        TransportError ("busy") if another is under way."""
        if self._active is not None and (self._active.verdict_sent or self._active.done):
            with trio.move_on_after(FLUSH_WAIT_S):
                while self._active is not None:
                    await self.session_ended.wait()
        if self._active is not None:
            raise TransportError("receiver busy with another migration")

    async def _set_up(self, fs: FrameStream, session: _Session, mode: str | None) -> None:
        """Channel 0 of a new session: SETUP, checked against max_memory; the images created
        (in a worker thread); SETUP_OK."""
        setup = await fs.expect(wire.Setup)
        session.channels = setup.channels
        session.compress = setup.compress
        session.delta = setup.delta
        need = session_memory(setup.regions, setup.page_size, setup.channels)
        if need > self.max_memory:
            raise ProtocolError(
                f"session refused: it would need {need / (1 << 20):.0f} MiB of receiver "
                f"memory ({PAGE_BOOKKEEPING} bytes a page for "
                f"{sum(r.size // setup.page_size for r in setup.regions)} pages, "
                f"{3 * wire.MAX_DATA >> 20} MiB a channel for {setup.channels} "
                f"channel(s)), over its limit of {self.max_memory / (1 << 20):.0f} MiB "
                f"(receive --max-memory)")
        names = self.image_names(list(setup.regions)) if self.image_names else None
        # (off the event loop: the files are created, truncated, perhaps fallocated, and 8 bytes
        # a page are written, 64 MiB at 32 GiB)
        session.images = await trio.to_thread.run_sync(
            ImageSet, self.out_dir, setup.regions, setup.page_size,
            session.sid.hex(), self.preallocate, names)
        session.images.deltas = setup.delta
        if self.on_setup is not None:
            self.on_setup(session.images)
        session.joined.add(0)
        await fs.send(wire.SetupOk(tuple(session.images.names)))
        self.log(f"session {session.name} from {session.peer}: {len(setup.regions)} region(s), "
                 f"{sum(r.size for r in setup.regions) / (1 << 20):.1f} MiB, "
                 f"page size {setup.page_size}, {setup.channels} channel(s)"
                 f"{', encrypted' if mode == 'aead' else ''}"
                 f"{f', {compress.CODEC_NAMES[setup.compress]} allowed' if setup.compress else ''}"
                 f"{', deltas allowed' if setup.delta else ''}")

    def _join(self, who) -> _Session:
        """Channel 1.. joins the active session it names (once)."""
        s = self._active
        if s is None or s.sid != who.session or s.images is None:
            raise ProtocolError(f"channel {who.channel} names no active session")
        if who.channel >= s.channels or who.channel in s.joined:
            raise ProtocolError(f"channel {who.channel} is not expected in session {s.name}")
        s.joined.add(who.channel)
        return s

    @staticmethod
    async def _welcome(fs: FrameStream, who) -> None:
        """Accept the channel; what we send after WELCOME is sealed (with a key)."""
        await fs.send(wire.Welcome())
        if who.send_seal is not None:
            fs.arm(send=who.send_seal)

    async def _serve_channel(self, fs: FrameStream, s: _Session, channel: int) -> None:
        with trio.CancelScope() as scope:
            s.scopes.append(scope)
            if s.done:
                return
            stopping = threading.Event()     # the channel was cancelled (receiver stopping)
            # its writer failed: the pump stops waiting for the next frame (the sender may be
            # waiting for a ROUND_ACK that will not come) and reports why
            write_failed = threading.Event()
            io = _ChannelIO.of(fs, s.images.page_size,
                               lambda: s.done or stopping.is_set() or write_failed.is_set())
            try:
                async with trio.open_nursery() as nursery:
                    flagger = await nursery.start(_flag_when_cancelled, stopping)
                    await self._read_channel(fs, io, s, channel, write_failed)
                    flagger.cancel()
            except BaseExceptionGroup as eg:
                err = first_error(eg)
                if isinstance(err, StoppedError):   # (we stop: the sender did not leave; when
                    # another channel ended the session, its reason stands: _fail is a no-op)
                    raise TransportError("receiver shutting down") from None
                raise err from None

    def _pump(self, io: _ChannelIO, s: _Session, expect: tuple[type, ...],
              write_failed: threading.Event) -> wire.Message:
        """In a worker thread: receive and check page batches (and PREPAREs), and acknowledge
        round ends, until another frame comes; return that one once every batch before it is
        written.  A second thread writes, so writing one batch overlaps receiving the next (a
        batch's buffer is reused by the third-next one: one being written, one queued, one
        arriving); a round end is acknowledged once the writer has caught up."""
        images = s.images
        assert images is not None
        region_pages = images.region_pages
        ps = images.page_size
        q: queue.Queue = queue.Queue(maxsize=1)
        failed: list[BaseException] = []

        def writer() -> None:
            while True:
                batch = q.get()
                try:
                    if batch is None:
                        return
                    if failed:
                        continue
                    images.apply(batch)
                    s.count_received(batch.pages_data * ps)
                except BaseException as e:   # reported by the pump
                    failed.append(e)
                    write_failed.set()
                finally:
                    q.task_done()

        t = threading.Thread(target=writer, name="receiver-writer", daemon=True)
        t.start()
        try:
            while not failed:
                msg = io.receive(expect)
                if isinstance(msg, wire.Batch):
                    wire.check_batch(msg, region_pages)
                    q.put(msg)
                elif isinstance(msg, wire.Prepare):
                    wire.check_batch(msg, region_pages)
                    images.prepare(msg.region, msg.runs_flat)
                elif isinstance(msg, wire.RoundEnd):
                    q.join()          # everything before the round end is written
                    if failed:
                        break
                    images.warm(msg.warm and not msg.final)
                    if not msg.final:     # (the pause waits for no disk: see ImageSet.settle)
                        images.settle()
                    io.send(wire.RoundAck(msg.round_no))
                    images.refresh_digests()     # (off the pause: the round is acknowledged)
                else:
                    return msg
            raise failed[0]
        finally:
            q.put(None)
            t.join()
            if failed:
                raise failed[0]

    async def _read_channel(self, fs: FrameStream, io: _ChannelIO, s: _Session, channel: int,
                            write_failed: threading.Event) -> None:
        """Batches until the channel's last frame (CLOSE, or END on channel 0), then its answer."""
        # what a channel may send now (anything else is refused before its meta is read)
        expect = (wire.Batch, wire.Prepare, wire.RoundEnd) + ((wire.End,) if channel == 0 else (wire.Close,))
        try:
            msg = await trio.to_thread.run_sync(self._pump, io, s, expect, write_failed)
        except PeerClosed:
            raise TransportError(f"sender disconnected on channel {channel} "
                                 f"before the end of the migration") from None
        if isinstance(msg, wire.Close) and channel != 0:
            s.closed.add(channel)
            await fs.send(wire.Closed())
        elif isinstance(msg, wire.End) and channel == 0:
            await self._finish(fs, s, msg)
        else:
            raise ProtocolError(f"unexpected {type(msg).__name__.upper()} on channel {channel}")

    async def _finish(self, fs: FrameStream, s: _Session, end: wire.End) -> None:
        images = s.images
        assert images is not None
        if len(end.digests) != len(images.regions):
            raise ProtocolError(f"END carries {len(end.digests)} digests for {len(images.regions)} regions")
        open_channels = sorted(set(range(1, s.channels)) - s.closed)
        if open_channels:
            raise ProtocolError(f"END while channel(s) {open_channels} still open")
        verdicts = await trio.to_thread.run_sync(images.verify, list(end.digests))
        complete = images.complete
        if not complete:
            s.error = images.error
        await fs.send(wire.Result(complete, tuple(v.verified for v in verdicts),
                                  tuple(v.dest_digest for v in verdicts), images.error or ""))
        s.verdict_sent = True
        if complete and self.on_verified is not None:
            self.on_verified(images)
        # with end.commit, the manifest says complete only once the sender committed: if the
        # verdict or SYNCED is lost on the way, the sender resumes its source, and this
        # destination must not look valid too
        wait_commit = complete and end.commit
        try:
            await trio.to_thread.run_sync(images.sync, not wait_commit)
        except OSError as e:        # (a full or failing disk: the session fails, we serve on)
            s.error = f"images verified but not stored: {e.strerror or e}"
            await trio.to_thread.run_sync(images.fail, s.error)
            await fs.send_error(s.error)
            await self._end(s, complete=False)
            return
        if complete:
            try:
                await fs.send(wire.Synced())
            except TransportError as e:
                if wait_commit:
                    raise TransportError(f"sender gone before it committed ({e})") from None
        if wait_commit:
            try:
                with trio.fail_after(COMMIT_WAIT_S):
                    await fs.expect(wire.Commit)
            except trio.TooSlowError:
                raise TransportError(f"the sender did not commit within {COMMIT_WAIT_S:.0f} s") from None
            except PeerClosed:
                raise TransportError("the sender closed the connection without committing") from None
            try:
                await trio.to_thread.run_sync(images.record_verdict)
            except ManifestUncertain as e:
                # the manifest may say complete: no answer (the sender keeps its source paused)
                s.error = f"committed, but whether the manifest says so is unknown: {e.strerror or e}"
                await trio.to_thread.run_sync(images.fail, s.error)     # (best effort)
                await self._end(s, complete=False)
                return
            except OSError as e:
                # the manifest does not say complete: the answer lets the sender resume its source
                s.error = f"committed, but the manifest could not be written: {e.strerror or e}"
                await trio.to_thread.run_sync(images.fail, s.error)     # (best effort: room again?)
                await fs.send_error(s.error)
                await self._end(s, complete=False)
                return
            try:
                await fs.send(wire.Committed())
            except TransportError:
                pass        # (the manifest is written: the sender's report says it did not hear so)
        await self._end(s, complete=complete)


def _close_images(images: ImageSet | None, failure: str | None, collect: bool) -> None:
    """(Worker thread) A session's end: its images marked failed (failure, if given) and closed;
    collect: the session failed, whose tracebacks hold its channels' receive buffers (views of
    them) in reference cycles: collect them now, not whenever the collector next runs (the fault
    soak saw the receiver's memory drift by ~12 MiB a failed channel)."""
    if images is not None:
        if failure is not None:
            images.fail(failure)
        images.close()
    if collect:
        gc.collect()


def session_memory(regions, page_size: int, channels: int) -> int:
    """Bytes of receiver memory a session may use at most: PAGE_BOOKKEEPING per declared page
    and, per channel, three receive buffers of the largest batch (wire.MAX_DATA)."""
    pages = sum(r.size // page_size for r in regions)
    return PAGE_BOOKKEEPING * pages + channels * 3 * wire.MAX_DATA


def _peer_host(stream: trio.abc.Stream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except (AttributeError, OSError):
        return "?"


def _peer_name(stream: trio.abc.Stream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    except (AttributeError, OSError):
        return "peer"


async def _flag_when_cancelled(flag: threading.Event, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Set flag once cancelled: a worker thread receiving pages (which a cancellation cannot
    interrupt) polls it and gives up within 200 ms, so a stopping receiver stops mid-stream."""
    with trio.CancelScope() as scope:
        task_status.started(scope)
        try:
            await trio.sleep_forever()
        finally:
            flag.set()


async def _refuse(fs: FrameStream, reason: str) -> None:
    """Tell the peer why, then drain what it still sends for a moment so that closing does not
    reset the connection before it reads the reason."""
    with trio.CancelScope(shield=True):
        await fs.send_error(reason)
        with trio.move_on_after(1.0):
            try:
                if isinstance(fs.stream, trio.SocketStream):
                    await fs.stream.send_eof()
                left = DRAIN_BYTES
                while left > 0:
                    chunk = await fs.stream.receive_some(1 << 20)
                    if not chunk:
                        break
                    left -= len(chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:PORT) → (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"bad address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:7000")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        raise UsageError(f"bad address {text!r}: no host (use 0.0.0.0 or :: for all, with a key)")
    return host, int(port)


async def serve(listen_host: str, port: int, out_dir: str, *, key: bytes | None,
                once: bool = False, ssl_context=None, log: Callable[[str], None] | None = None,
                preallocate: bool = False,
                on_setup: Callable[[ImageSet], None] | None = None,
                on_verified: Callable[[ImageSet], None] | None = None,
                on_session_end: Callable[[SessionOutcome], None] | None = None,
                image_names: Callable[[list[RegionSpec]], list[str]] | None = None,
                require_encryption: bool = False, max_memory: int = DEFAULT_MAX_MEMORY,
                task_status=trio.TASK_STATUS_IGNORED) -> list[SessionOutcome]:
    """Listen and serve migrations until cancelled, or until one session ended if `once`.

    task_status.started() gets the bound port (useful with port 0).  Returns the outcomes.
    on_setup / on_verified / on_session_end / image_names: see Receiver.

    Raises:
        UsageError: no key on a non-loopback address, or the address cannot be bound.
    """
    receiver = Receiver(out_dir, key=key, ssl_context=ssl_context, log=log, preallocate=preallocate,
                        on_setup=on_setup, on_verified=on_verified, on_session_end=on_session_end,
                        image_names=image_names, require_encryption=require_encryption,
                        max_memory=max_memory)
    return await receiver.serve(listen_host, port, once=once, task_status=task_status)


__all__ = ["Receiver", "SessionOutcome", "serve", "parse_listen", "session_memory",
           "DEFAULT_MAX_MEMORY"]
