"""An on-path attacker for the transport tests: a TCP proxy between a sender and a receiver that
knows the protocol (frame layout, handshake, which frames carry a tag) but not the key.  It
parses every frame each way and lets a test rewrite, drop, duplicate or record them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import msgpack
import trio

from migrator.transport import wire
from migrator.transport.seal import TAG_SIZE


@dataclass
class Frame:
    """One frame as seen on the wire (tag empty before the handshake ends, or without a key)."""

    channel: int          # connection number, in accept order
    direction: str        # "c2s" or "s2c"
    type: wire.T
    header: bytes
    meta: bytes
    data: bytes
    tag: bytes

    def raw(self) -> bytes:
        return self.header + self.meta + self.data + self.tag


# tamper(frame) -> the frames (bytes) to forward instead: [frame.raw()] forwards it unchanged
Tamper = Callable[[Frame], list[bytes]]


class _Reader:
    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self.buf = bytearray()

    async def exactly(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            chunk = await self.stream.receive_some(1 << 16)
            if not chunk:
                return None
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


@dataclass
class OnPathProxy:
    target_port: int
    tamper: Tamper = lambda f: [f.raw()]
    frames: list[Frame] = field(default_factory=list)
    wire_bytes: dict = field(default_factory=lambda: {"c2s": bytearray(), "s2c": bytearray()})
    _conns: int = 0

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        channel = self._conns
        self._conns += 1
        server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        keyed = {"on": False}
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server, "c2s", channel, keyed, nursery)
                nursery.start_soon(self._pump, server, client, "s2c", channel, keyed, nursery)
        finally:
            await trio.aclose_forcefully(client)
            await trio.aclose_forcefully(server)

    async def _pump(self, src, dst, direction: str, channel: int, keyed: dict, nursery) -> None:
        reader = _Reader(src)
        sealed = False
        try:
            while True:
                header = await reader.exactly(wire.HEADER_SIZE)
                if header is None:
                    break
                try:
                    t, meta_len, data_len = wire.parse_header(header)
                except Exception:       # not a frame (a test's garbage): pass the rest on
                    await dst.send_all(header + bytes(reader.buf))
                    reader.buf.clear()
                    continue
                meta = await reader.exactly(meta_len) if meta_len else b""
                data = await reader.exactly(data_len) if data_len else b""
                tag = (await reader.exactly(TAG_SIZE)) if sealed else b""
                if meta is None or data is None or tag is None:
                    break
                if t is wire.T.HELLO:
                    keyed["on"] = bool(msgpack.unpackb(meta)["auth"])
                # a sender seals what follows its AUTH, a receiver what follows its WELCOME
                if keyed["on"] and ((direction == "c2s" and t is wire.T.AUTH)
                                    or (direction == "s2c" and t is wire.T.WELCOME)):
                    sealed = True
                f = Frame(channel, direction, t, header, meta, data, tag)
                self.frames.append(f)
                for out in self.tamper(f):
                    self.wire_bytes[direction] += out
                    await dst.send_all(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        nursery.cancel_scope.cancel()


def rewrite_batch(f: Frame, page_size: int, new_data: bytes) -> bytes:
    """A BATCH frame with other page data and every unkeyed checksum recomputed (its `h`), as
    an attacker without the key would forge it (the old tag kept: it has no other)."""
    from migrator.transport.pagehash import page_hashes
    m = msgpack.unpackb(f.meta)
    m["h"] = wire.batch_digest(m["r"], m["n"], m["d"], m["z"], (), page_size,
                               page_hashes(new_data, page_size))
    meta = msgpack.packb(m, use_bin_type=True)
    header = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.T.BATCH, len(meta), len(new_data))
    return header + meta + new_data + f.tag
