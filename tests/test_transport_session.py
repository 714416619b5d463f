"""Sender → receiver in process: exact images, rounds, channels, ordering, verification."""

import os
import threading

import pytest
import trio
import trio.testing

from migrator.errors import MigratorError, RegionError, TransportError
from migrator.transport import RegionSpec, connect_sender, digest_bytes, region_digest, wire
from migrator.transport.images import WRITEBACK_EVERY, ImageSet
from migrator.transport.sender import RateLimiter

from transport_helpers import digests, KEY, PS, MemReader, batch_frame, random_memory, raw_session, read_image, start_receiver
from migration_helpers import manifest


def _manifest(out):
    """The manifest once final (see migration_helpers.manifest)."""
    return manifest(str(out))


def _regions():
    return [RegionSpec("ram", 0x7f0000000000, 0x7f0000000000 + 300 * PS), RegionSpec("[heap]", 0x1000, 0x1000 + 40 * PS)]


@pytest.mark.parametrize("channels", [1, 3])
async def test_rounds_exact_images(nursery, tmp_path, channels):
    out = tmp_path / "out"
    rx, port, logs = await start_receiver(nursery, out)
    mem = {"ram": random_memory(300, 1), "[heap]": random_memory(40, 2, zero_fraction=0.8)}
    reader = MemReader(mem)
    async with connect_sender("127.0.0.1", port, key=KEY, regions=_regions(), channels=channels,
                              batch_pages=16) as s:
        await s.prepare({"ram": [(0, 300)], "[heap]": [(10, 20)]})      # (a hint: allocate)
        st0 = await s.send_pages({"ram": [(0, 300)], "[heap]": [(0, 40)]}, reader, 0)
        await s.end_round(0)
        zeros0 = sum(1 for p in range(300) if not any(mem["ram"][p * PS:(p + 1) * PS])) + \
            sum(1 for p in range(40) if not any(mem["[heap]"][p * PS:(p + 1) * PS]))
        assert (st0.pages_normal, st0.pages_zero) == (340 - zeros0, zeros0)
        # round 1: rewrite some pages, zero a page that held data, fill a zero page
        mem["ram"][7 * PS:9 * PS] = os.urandom(2 * PS)
        data_page = next(p for p in range(300) if any(mem["ram"][p * PS:(p + 1) * PS]) and p > 9)
        mem["ram"][data_page * PS:(data_page + 1) * PS] = bytes(PS)
        zero_page = next(p for p in range(40) if not any(mem["[heap]"][p * PS:(p + 1) * PS]))
        mem["[heap]"][zero_page * PS:(zero_page + 1) * PS] = b"\xab" * PS
        await s.send_pages({"ram": [(7, 9), (data_page, data_page + 1)],
                            "[heap]": [(zero_page, zero_page + 1)]}, reader, 1)
        await s.end_round(1)
        res = await s.finish(digests(mem))
        stats = s.statistics()
    assert res.complete and all(v.verified for v in res.regions.values())
    assert stats.rounds == 2 and stats.channels == channels
    assert stats.pages_normal + stats.pages_zero == 340 + 4
    outcomes = await rx.wait_sessions(1)
    assert outcomes[0].complete
    m = _manifest(out)
    assert m["complete"] is True
    assert [(r["name"], r["start"], r["end"], r["size"], r["status"]) for r in m["regions"]] == [
        ("ram", 0x7f0000000000, 0x7f0000000000 + 300 * PS, 300 * PS, "verified"),
        ("[heap]", 0x1000, 0x1000 + 40 * PS, 40 * PS, "verified")]
    for name in mem:
        assert read_image(out, m, name) == bytes(mem[name])
    assert m["regions"][0]["digest"] == digest_bytes(mem["ram"])
    assert any("complete" in line for line in logs)


async def test_digest_mismatch_is_not_complete(nursery, tmp_path):
    out = tmp_path / "out"
    rx, port, _ = await start_receiver(nursery, out)
    mem = {"ram": random_memory(300, 3), "[heap]": random_memory(40, 4)}
    async with connect_sender("127.0.0.1", port, key=KEY, regions=_regions()) as s:
        await s.send_pages({"ram": [(0, 300)], "[heap]": [(0, 40)]}, MemReader(mem), 0)
        mem["ram"][0] ^= 1  # the source changed after its page was sent: digests differ
        res = await s.finish(digests(mem))
    assert not res.complete and not res.regions["ram"].verified and res.regions["[heap]"].verified
    assert "ram" in res.message
    (o,) = await rx.wait_sessions(1)
    assert not o.complete
    m = _manifest(out)
    assert m["complete"] is False
    assert [r["status"] for r in m["regions"]] == ["mismatch", "verified"]


async def test_abort_without_finish_then_next_session(nursery, tmp_path):
    out = tmp_path / "out"
    rx, port, logs = await start_receiver(nursery, out)
    mem = {"ram": random_memory(300, 5), "[heap]": random_memory(40, 6)}
    with pytest.raises(RuntimeError, match="controller failed"):
        async with connect_sender("127.0.0.1", port, key=KEY, regions=_regions()) as s:
            await s.send_pages({"ram": [(0, 100)]}, MemReader(mem), 0)
            raise RuntimeError("controller failed")
    (o,) = await rx.wait_sessions(1)
    assert not o.complete and "sender aborted" in o.error
    assert _manifest(out)["complete"] is False
    # the receiver serves the next migration
    async with connect_sender("127.0.0.1", port, key=KEY, regions=_regions()) as s:
        await s.send_pages({"ram": [(0, 300)], "[heap]": [(0, 40)]}, MemReader(mem), 0)
        assert (await s.finish(digests(mem))).complete
    assert _manifest(out)["complete"] is True


async def test_stale_copy_on_another_channel_never_wins(nursery, tmp_path):
    """Round 2's copy of page 5 arrives first on channel 0, round 1's copy late on channel 1."""
    out = tmp_path / "out"
    rx, port, _ = await start_receiver(nursery, out)
    regions = [RegionSpec("ram", 0, 16 * PS)]
    sid = b"t" * 16
    fs0 = await raw_session(port, regions, channels=2, session=sid)
    from migrator.transport.auth import client_handshake
    from migrator.transport.framing import FrameStream
    fs1 = FrameStream(await trio.open_tcp_stream("127.0.0.1", port), "receiver")
    await client_handshake(fs1, KEY, sid, 1)
    new, old = b"N" * PS, b"O" * PS
    await fs0.send_raw(batch_frame(0, 2, [(5, 1)], [(6, 1)], new))
    await fs0.send(wire.RoundEnd(2))
    await fs0.expect(wire.RoundAck)
    await fs1.send_raw(batch_frame(0, 1, [(4, 3)], [], b"o" * PS + old + old))   # pages 4,5,6
    await fs1.send(wire.RoundEnd(1))
    await fs1.expect(wire.RoundAck)
    await fs1.send(wire.Close())
    await fs1.expect(wire.Closed)
    want = bytearray(16 * PS)
    want[4 * PS:5 * PS] = b"o" * PS
    want[5 * PS:6 * PS] = new
    await fs0.send(wire.End((digest_bytes(want),)))
    res = await fs0.expect(wire.Result)
    assert res.complete
    (o,) = await rx.wait_sessions(1)
    assert o.pages_stale == 2
    assert read_image(out, _manifest(out), "ram") == bytes(want)


def test_imageset_stamps(tmp_path):
    im = ImageSet(str(tmp_path), [RegionSpec("r", 0, 8 * PS)], PS, "x")
    def b(rnd, d, z, data):
        return wire.decode_frames(batch_frame(0, rnd, d, z, data))[0]
    im.apply(b(3, [(0, 2)], [], b"3" * 2 * PS))
    im.apply(b(1, [(0, 4)], [], b"1" * 4 * PS))        # pages 0,1 stale, 2,3 written
    im.apply(b(2, [], [(1, 3)], b""))                  # page 1 stale; 2,3 zeroed on disk
    im.apply(b(3, [(2, 1)], [], b"x" * PS))
    im.apply(b(3, [(2, 1)], [], b"y" * PS))            # same round: the later copy wins
    im.close()
    with open(tmp_path / im.names[0], "rb") as f:
        got = f.read()
    assert got == b"3" * 2 * PS + b"y" * PS + bytes(PS) + bytes(4 * PS)


def test_imageset_prepare_allocates_in_the_background(tmp_path):
    """PREPARE: the pages announced are allocated (fallocate, 1 MiB at a time) by a thread of the
    image set, read as zeros, and the other pages stay holes."""
    n = 1024
    im = ImageSet(str(tmp_path), [RegionSpec("r", 0, n * PS)], PS, "x")
    path = tmp_path / im.names[0]
    assert os.stat(path).st_blocks == 0
    im.prepare(0, (0, 300, 700, 100))
    im.wait_prepared()
    assert im.bytes_prepared == 400 * PS
    assert os.stat(path).st_blocks * 512 >= 400 * PS
    with open(path, "rb") as f:
        assert f.read() == bytes(n * PS)
    fd = os.open(path, os.O_RDONLY)
    try:                            # (page 300 .. 699: a hole)
        assert os.lseek(fd, 300 * PS, os.SEEK_HOLE) == 300 * PS
    finally:
        os.close(fd)
    im.close()


async def test_reader_runs_in_thread_and_bad_runs_rejected(nursery, tmp_path):
    rx, port, _ = await start_receiver(nursery, tmp_path / "out")
    main = threading.current_thread()
    seen = []

    class R(MemReader):
        def read(self, name, first, n):
            seen.append(threading.current_thread() is main)
            return super().read(name, first, n)
    mem = {"ram": random_memory(300, 7), "[heap]": random_memory(40, 8)}
    async with connect_sender("127.0.0.1", port, key=KEY, regions=_regions()) as s:
        with pytest.raises(RegionError, match="outside region"):
            await s.send_pages({"ram": [(0, 301)]}, R(mem), 0)
        with pytest.raises(RegionError, match="not declared"):
            await s.send_pages({"rom": [(0, 1)]}, R(mem), 0)
        await s.send_pages({"ram": [(0, 300)], "[heap]": [(0, 40)]}, R(mem), 0)
        from_reader = {r.name: region_digest(MemReader(mem), r, PS) for r in _regions()}
        assert from_reader == digests(mem)
        assert (await s.finish(from_reader)).complete
    assert seen and not any(seen)


def test_rate_limiter_mock_clock():
    clock = trio.testing.MockClock(autojump_threshold=0)
    async def run():
        lim = RateLimiter(1000.0)
        t0 = trio.current_time()
        for _ in range(10):
            await lim.take(500)
        return trio.current_time() - t0
    # ten 0.5 s slots; each batch leaves at the end of its own slot
    assert trio.run(run, clock=clock) == pytest.approx(5.0)


async def test_connect_errors(nursery, tmp_path):
    with pytest.raises(TransportError, match="cannot connect"):
        async with connect_sender("127.0.0.1", 1, key=KEY, regions=_regions()):
            pass
    with pytest.raises(MigratorError, match="channels"):
        async with connect_sender("127.0.0.1", 1, key=KEY, regions=_regions(), channels=0):
            pass
    with pytest.raises(RegionError, match="page-aligned"):
        async with connect_sender("127.0.0.1", 1, key=KEY, regions=[RegionSpec("a", 0, 100)]):
            pass


async def test_stop_and_copy_round_end_waits_for_no_write_back(nursery, tmp_path):
    """A live round's end after 64 MiB or more of an image waits for its write-back (the pause
    then inherits no backlog); the stop-and-copy's (RoundEnd.final) never waits, however much
    the rounds left unsettled: that wait would be downtime."""
    out = tmp_path / "out"
    rx, port, _ = await start_receiver(nursery, out)
    n = WRITEBACK_EVERY // PS + 256            # pages a round: just over the threshold
    fs = await raw_session(port, [RegionSpec("ram", 0, 2 * n * PS)])
    chunk = wire.MAX_DATA // PS

    async def send_round(rnd: int, first: int, final: bool) -> None:
        for a in range(first, first + n, chunk):
            k = min(chunk, first + n - a)
            await fs.send_raw(batch_frame(0, rnd, [(a, k)], [], bytes([rnd]) * (k * PS)))
        await fs.send(wire.RoundEnd(rnd, final))
        assert (await fs.expect(wire.RoundAck)).round_no == rnd

    await send_round(1, 0, final=False)
    await send_round(2, n, final=True)
    want = b"\x01" * (n * PS) + b"\x02" * (n * PS)
    await fs.send(wire.End((digest_bytes(want),)))
    assert (await fs.expect(wire.Result)).complete
    (o,) = await rx.wait_sessions(1)
    assert o.complete and o.writeback_waits == 1
    assert read_image(out, manifest(out), "ram") == want


@pytest.mark.parametrize("wait", [False, True])
async def test_secondary_channels_closed_early_then_channel_0_alone(nursery, tmp_path, wait):
    """close_secondaries() sends CLOSE on channels 1.. and returns (in the pause, once its bulk
    is out: finish() takes their CLOSED), or waits for their CLOSED (before a small pause).
    Pages sent after it, and the final round's end, go on channel 0 alone; the images are
    exact."""
    out = tmp_path / "out"
    rx, port, _ = await start_receiver(nursery, out)
    mem = {"ram": random_memory(300, 5), "[heap]": random_memory(40, 6)}
    reader = MemReader(mem)
    async with connect_sender("127.0.0.1", port, key=KEY, regions=_regions(), channels=3,
                              batch_pages=16) as s:
        await s.send_pages({"ram": [(0, 300)], "[heap]": [(0, 40)]}, reader, 0)
        await s.end_round(0)
        assert s.open_channels == 3
        mem["ram"][3 * PS:70 * PS] = os.urandom(67 * PS)
        await s.send_pages({"ram": [(3, 70)]}, reader, 1)
        await s.close_secondaries(wait=wait)
        assert s.open_channels == 1 and s.statistics().channels == 3
        mem["[heap]"][5 * PS:6 * PS] = b"\x5a" * PS
        mem["ram"][100 * PS:164 * PS] = os.urandom(64 * PS)       # (4 batches: one channel)
        await s.send_pages({"[heap]": [(5, 6)], "ram": [(100, 164)]}, reader, 1)
        await s.end_round(1, final=True)
        res = await s.finish(digests(mem))
    assert res.complete
    (o,) = await rx.wait_sessions(1)
    assert o.complete
    m = _manifest(out)
    for name in mem:
        assert read_image(out, m, name) == bytes(mem[name])
