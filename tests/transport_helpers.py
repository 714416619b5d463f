"""Shared pieces of the transport tests: a memory page reader, a receiver in the test's nursery,
and a hand-driven client for sending crafted frames."""

from __future__ import annotations

import os
import random

import trio

from migrator.transport import RegionSpec, Receiver, digest_bytes, wire
from migrator.transport.auth import client_handshake
from migrator.transport.digest import BufferReader
from migrator.transport.framing import FrameStream

PS = 4096
KEY = b"0123456789abcdef0123456789abcdef"


class MemReader(BufferReader):
    """Regions held in bytearrays; read() returns a view (as a live source would)."""

    def __init__(self, mem: dict[str, bytearray]):
        self.mem = mem
        self.calls = 0

    def read(self, name: str, first: int, n: int):
        self.calls += 1
        return memoryview(self.mem[name])[first * PS:(first + n) * PS]


def digests(mem: dict[str, bytearray]) -> dict[str, str]:
    """Each region's digest, as finish() takes them."""
    return {k: digest_bytes(v) for k, v in mem.items()}


def random_memory(npages: int, seed: int, zero_fraction: float = 0.3) -> bytearray:
    rng = random.Random(seed)
    buf = bytearray(npages * PS)
    for p in range(npages):
        if rng.random() >= zero_fraction:
            buf[p * PS:(p + 1) * PS] = rng.randbytes(PS)
    return buf


def read_image(out_dir, manifest: dict, name: str) -> bytes:
    entry = next(r for r in manifest["regions"] if r["name"] == name)
    with open(os.path.join(out_dir, entry["image"]), "rb") as f:
        return f.read()


class Logs(list):
    """Receiver log lines; wait_for() waits (on an event, no polling) until one matches."""

    def __init__(self):
        super().__init__()
        self._changed = trio.Event()

    def __call__(self, line: str) -> None:
        self.append(line)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, text: str) -> str:
        while True:
            for line in self:
                if text in line:
                    return line
            await self._changed.wait()


async def start_receiver(nursery, out_dir, key=KEY, ssl_context=None):
    logs = Logs()
    rx = Receiver(str(out_dir), key=key, ssl_context=ssl_context, log=logs)
    port = await nursery.start(rx.serve, "127.0.0.1", 0)
    return rx, port, logs


async def raw_session(port: int, regions: list[RegionSpec], key=KEY, page_size=PS,
                      channels: int = 1, session: bytes = b"s" * 16, compress: int = 0,
                      delta: bool = False) -> FrameStream:
    """An authenticated channel 0 with SETUP done: the caller then sends what it likes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    fs = FrameStream(stream, "receiver")
    await client_handshake(fs, key, session, 0)
    await fs.send(wire.Setup(page_size, channels, tuple(regions), compress, delta))
    await fs.expect(wire.SetupOk)
    return fs


def batch_frame(region: int, round_no: int, data_runs, zero_runs, data: bytes,
                digest: int | None = None, compressed: bytes | None = None, codec: int = 0) -> bytes:
    """A BATCH frame of data (its hash computed unless given); with compressed, those bytes
    go on the wire instead, marked with codec."""
    dflat = [x for r in data_runs for x in r]
    zflat = [x for r in zero_runs for x in r]
    if digest is None:
        digest = wire.batch_digest(region, round_no, dflat, zflat, [data])
    if compressed is not None:
        return wire.encode_batch(region, round_no, dflat, zflat, len(compressed), digest, codec) + compressed
    return wire.encode_batch(region, round_no, dflat, zflat, len(data), digest) + data
