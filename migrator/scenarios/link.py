"""Added latency on loopback: a small trio TCP proxy that holds every chunk it forwards for a
fixed delay, in both directions.

Each direction is a pump: one task reads chunks and stamps them with their due time, another
writes each chunk once it is due.  Between them sits a bounded queue (QUEUE_CHUNKS chunks), so a
sender that outruns the link is pushed back by TCP as with a real path, while a steady stream
keeps flowing (the delay adds latency, not a throughput limit: a chunk read at t leaves at
t + delay whatever came before it).  The bandwidth cap itself is the sender's pacing
(MigrationPolicy.max_bandwidth), as QEMU's max-bandwidth.

Why a proxy rather than netem in a network namespace: it needs no root, no sch_netem module and
no veth set-up, works the same on every CI machine, and the delay is exactly what was asked
(netem would be more faithful for loss and jitter, which the scenarios do not model).
"""

from __future__ import annotations

import trio

CHUNK = 64 << 10
QUEUE_CHUNKS = 256          # at most 16 MiB in flight per direction


class DelayProxy:
    """Listens on 127.0.0.1 (port picked by the kernel) and forwards every connection to
    (host, port), each byte delayed by delay_s in each direction (round trip + 2 * delay_s)."""

    def __init__(self, host: str, port: int, delay_s: float) -> None:
        self.host, self.port, self.delay_s = host, port, delay_s
        self.listen_port = 0
        self.connections = 0
        self.bytes_forwarded = 0

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.listen_port = listeners[0].socket.getsockname()[1]
        task_status.started(self.listen_port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        try:
            server = await trio.open_tcp_stream(self.host, self.port)
        except OSError:
            await client.aclose()
            return
        async with client, server:
            async with trio.open_nursery() as nursery:
                done = [0]

                async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                    try:
                        await self._pump(src, dst)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        nursery.cancel_scope.cancel()       # one side broke: drop both
                        return
                    done[0] += 1
                    if done[0] == 2:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(pump, client, server)
                nursery.start_soon(pump, server, client)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream) -> None:
        tx, rx = trio.open_memory_channel[tuple[float, bytes]](QUEUE_CHUNKS)

        async def reader() -> None:
            async with tx:
                while True:
                    data = await src.receive_some(CHUNK)
                    await tx.send((trio.current_time() + self.delay_s, data))
                    if not data:
                        return

        async def writer() -> None:
            async with rx:
                async for due, data in rx:
                    wait = due - trio.current_time()
                    if wait > 0:
                        await trio.sleep(wait)
                    if not data:
                        try:
                            await dst.send_eof()
                        except (AttributeError, trio.ClosedResourceError):
                            pass
                        return
                    await dst.send_all(data)
                    self.bytes_forwarded += len(data)

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            n.start_soon(writer)
