"""A session failing on one channel while another channel's writer thread is writing pages: the
receiver (a real `migrator receive` process) tears the session down without crashing (issue 15's
reproduction: a SIGSEGV in 6 of 6 runs when the images were unmapped under mg_apply_batch), and
then serves a good migration."""

import itertools
import os
import secrets

import pytest
import trio

from migration_helpers import ReceiverProcess, manifest
from migrator.transport import RegionSpec, connect_sender, digest_bytes, wire
from migrator.transport.auth import client_handshake
from migrator.transport.framing import FrameStream
from transport_helpers import KEY, PS, MemReader, batch_frame, random_memory, raw_session
from waiting import await_until

NPAGES = 16384                       # 64 MiB region, batches of 1024 pages
REGIONS = [RegionSpec("ram", 0, NPAGES * PS)]


async def _stream_batches(fs: FrameStream, stop: trio.Event, busy: trio.Event) -> None:
    """BATCHes of 1024 pages until stop; busy is set once the receiver took 8 of them (32 MiB:
    more than the sockets' buffers hold, so its writer is writing pages)."""
    data = os.urandom(1024 * PS)
    first = 0
    try:
        for sent in itertools.count(1):
            if stop.is_set():
                break
            await fs.send_raw(batch_frame(0, 0, [(first, 1024)], [], data))
            first = (first + 1024) % NPAGES
            if sent == 8:
                busy.set()
    except Exception:
        pass                          # the receiver ended the session: expected


async def _one_failing_session(rx: ReceiverProcess, failed_before: int) -> None:
    port = rx.port
    sid = secrets.token_bytes(16)
    ch0 = await raw_session(port, REGIONS, channels=2, session=sid)
    ch1 = FrameStream(await trio.open_tcp_stream("127.0.0.1", port), "receiver")
    await client_handshake(ch1, KEY, sid, 1)
    stop, busy = trio.Event(), trio.Event()
    async with trio.open_nursery() as n:
        n.start_soon(_stream_batches, ch1, stop, busy)
        with trio.fail_after(30):
            await busy.wait()         # channel 1's writer is busy writing pages
        await ch0.send_raw(batch_frame(3, 0, [(0, 1)], [], b"x" * PS))     # undeclared region
        await await_until(lambda: rx.text().count(": FAILED: ") > failed_before, 30,
                          "the receiver's log line of the failed session")
        stop.set()
    await ch0.aclose()
    await ch1.aclose()


async def test_channel_failure_while_another_writes_does_not_crash(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    out = str(tmp_path / "out")
    rx = ReceiverProcess(out, "--key-file", str(key_file))
    try:
        for i in range(6):
            await _one_failing_session(rx, i)
            assert rx.proc.poll() is None, f"receiver died: exit status {rx.proc.returncode}"
            m = manifest(out)
            assert m["complete"] is False and "undeclared region" in m["error"], m
        # and it serves a good migration afterwards
        mem = {"ram": random_memory(NPAGES, 7)}
        async with connect_sender("127.0.0.1", rx.port, key=KEY, regions=REGIONS) as s:
            await s.send_pages({"ram": [(0, NPAGES)]}, MemReader(mem), 0)
            res = await s.finish({"ram": digest_bytes(mem["ram"])})
        assert res.complete
        assert manifest(out)["complete"] is True
    finally:
        rx.stop()


async def _stream_prepares(fs: FrameStream, stop: trio.Event) -> None:
    try:
        for first in range(NPAGES):
            if stop.is_set():
                return
            await fs.send_raw(wire.encode(wire.Prepare(0, (first, 1))))
    except Exception:
        pass                          # the receiver ended the session: expected


@pytest.mark.slow
async def test_channel_failure_while_another_prepares_leaves_no_thread(nursery, tmp_path):
    """Channel 1 streams PREPAREs (its thread inside ImageSet.prepare(), which starts the
    image-prepare thread) while channel 0 fails the session, many times: the teardown never
    joins a thread not yet started (a RuntimeError that ended `migrator receive`), nor leaves
    an image-prepare thread behind on a closed session (found by bench fuzz)."""
    import threading
    from transport_helpers import start_receiver
    out = tmp_path / "out"
    rx, port, logs = await start_receiver(nursery, out)
    for i in range(20):
        sid = secrets.token_bytes(16)
        ch0 = await raw_session(port, REGIONS, channels=2, session=sid)
        ch1 = FrameStream(await trio.open_tcp_stream("127.0.0.1", port), "receiver")
        await client_handshake(ch1, KEY, sid, 1)
        stop = trio.Event()
        async with trio.open_nursery() as n:
            n.start_soon(_stream_prepares, ch1, stop)
            # deliberate, not a wait: the failure lands at varying points of the PREPARE stream
            await trio.sleep(0.002 * (i % 10))
            await ch0.send_raw(batch_frame(3, 0, [(0, 1)], [], b"x" * PS))     # undeclared region
            await rx.wait_sessions(i + 1)
            stop.set()
        await ch0.aclose()
        await ch1.aclose()
    outcomes = await rx.wait_sessions(20)
    assert all(not o.complete and "undeclared region" in o.error for o in outcomes)
    assert [t for t in threading.enumerate() if t.name == "image-prepare"] == []
    mem = {"ram": random_memory(NPAGES, 8)}
    async with connect_sender("127.0.0.1", port, key=KEY, regions=REGIONS) as s:
        await s.send_pages({"ram": [(0, NPAGES)]}, MemReader(mem), 0)
        assert (await s.finish({"ram": digest_bytes(mem["ram"])})).complete
