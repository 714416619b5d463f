"""Every frame after the handshake is sealed (issue 15): an on-path attacker who knows the
protocol but not the key cannot alter, drop, replay, reorder or forge frames, nor read pages
with --encrypt; and the receiver's work before authentication is bounded."""

from __future__ import annotations

import os

import msgpack
import pytest
import trio

from migrator.errors import MigratorError, ProtocolError, TransportError, UsageError
from migrator.transport import RegionSpec, connect_sender, digest_bytes, wire
from migrator.transport import receiver as receiver_mod
from migrator.transport.auth import client_handshake
from migrator.transport.digest import BufferReader
from migrator.transport.framing import FrameStream
from migrator.transport.receiver import Receiver
from migrator.transport.seal import derive, transcript

from migration_helpers import manifest
from onpath_proxy import Frame, OnPathProxy, rewrite_batch
from transport_helpers import KEY, PS, Logs, MemReader, random_memory, read_image, start_receiver
from waiting import await_until

NPAGES = 64
REGIONS = [RegionSpec("ram", 0, NPAGES * PS)]
EVIL = b"EVIL" * (PS // 4)


async def _through_proxy(nursery, out, key, tamper, **rx_kw):
    logs = Logs()
    rx = Receiver(str(out), key=key, log=logs, **rx_kw)
    port = await nursery.start(rx.serve, "127.0.0.1", 0)
    proxy = OnPathProxy(port, tamper)
    pport = await nursery.start(proxy.serve)
    return rx, proxy, pport, logs


async def _migrate(pport, key, mem, batch_pages=8, encrypt=False):
    async with connect_sender("127.0.0.1", pport, key=key, regions=REGIONS, batch_pages=batch_pages,
                              encrypt=encrypt) as s:
        await s.send_pages({"ram": [(0, NPAGES)]}, MemReader(mem), 0)
        return await s.finish({"ram": digest_bytes(mem["ram"])})


class PageRewriter:
    """Rewrites page 0 in the first BATCH that carries it (recomputing the batch hash), keeps a
    copy of what it forwarded, and rewrites END's digest to match that copy: everything an
    attacker without the key can do to make a changed page look verified."""

    def __init__(self):
        self.forwarded = bytearray(NPAGES * PS)
        self.done = False

    def __call__(self, f: Frame) -> list[bytes]:
        if f.direction != "c2s":
            return [f.raw()]
        if f.type is wire.T.BATCH:
            m = msgpack.unpackb(f.meta)
            data = bytearray(f.data)
            pos = 0
            for first, count in zip(m["d"][0::2], m["d"][1::2]):
                if first == 0 and not self.done:
                    data[pos:pos + PS] = EVIL
                    self.done = True
                pos += count * PS
            out = rewrite_batch(f, PS, bytes(data)) if data != f.data else f.raw()
            pos = 0
            for first, count in zip(m["d"][0::2], m["d"][1::2]):
                self.forwarded[first * PS:(first + count) * PS] = data[pos:pos + count * PS]
                pos += count * PS
            return [out]
        if f.type is wire.T.END:
            m = msgpack.unpackb(f.meta)
            m["digests"] = [digest_bytes(self.forwarded)]
            meta = msgpack.packb(m, use_bin_type=True)
            header = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.T.END, len(meta), 0)
            return [header + meta + f.tag]
        return [f.raw()]


@pytest.mark.parametrize("keyed", [False, True], ids=["no-key", "sealed"])
async def test_onpath_page_rewrite(nursery, tmp_path, keyed):
    """Without a key (loopback only) the attack works, which shows the proxy is a real one: the
    destination marks the altered memory complete.  With a key the altered frame fails its tag:
    the session fails, nothing is marked complete and the altered page is never written."""
    key = KEY if keyed else None
    mem = {"ram": random_memory(NPAGES, 5, zero_fraction=0.0)}
    out = tmp_path / "out"
    rx, proxy, pport, logs = await _through_proxy(nursery, out, key, PageRewriter())
    if not keyed:
        res = await _migrate(pport, key, mem)
        assert res.complete           # fooled: the unkeyed checksums all matched
        image = read_image(out, manifest(str(out)), "ram")
        assert image[:PS] == EVIL and image[PS:] == bytes(mem["ram"][PS:])
        return
    with pytest.raises(TransportError, match="failed authentication"):
        await _migrate(pport, key, mem)
    (o,) = await rx.wait_sessions(1)
    assert not o.complete and "frame #" in o.error and "failed authentication" in o.error
    m = manifest(str(out))
    assert m["complete"] is False
    assert EVIL not in read_image(out, m, "ram")


def _batches(frames):
    return [f for f in frames if f.direction == "c2s" and f.type is wire.T.BATCH]


class Misorder:
    """Drops, duplicates or swaps the 2nd and 3rd BATCH frames."""

    def __init__(self, how: str):
        self.how = how
        self.n = 0
        self.held: bytes | None = None

    def __call__(self, f: Frame) -> list[bytes]:
        if f.direction != "c2s" or f.type is not wire.T.BATCH:
            return [f.raw()]
        self.n += 1
        if self.n == 2:
            if self.how == "drop":
                return []
            if self.how == "replay":
                return [f.raw(), f.raw()]
            self.held = f.raw()
            return []
        if self.n == 3 and self.how == "swap":
            return [f.raw(), self.held]
        return [f.raw()]


@pytest.mark.parametrize("how", ["drop", "replay", "swap"])
async def test_sealed_frames_cannot_be_dropped_replayed_or_reordered(nursery, tmp_path, how):
    mem = {"ram": random_memory(NPAGES, 6, zero_fraction=0.0)}
    out = tmp_path / "out"
    rx, proxy, pport, logs = await _through_proxy(nursery, out, KEY, Misorder(how))
    with pytest.raises(TransportError, match="failed authentication"):
        await _migrate(pport, KEY, mem)
    (o,) = await rx.wait_sessions(1)
    assert not o.complete and "failed authentication" in o.error
    assert manifest(str(out))["complete"] is False
    assert len(_batches(proxy.frames)) >= 3


def _forge_result(f: Frame) -> list[bytes]:
    """Turns the receiver's RESULT around (complete <-> not) with the old tag."""
    if f.direction == "s2c" and f.type is wire.T.RESULT:
        m = msgpack.unpackb(f.meta)
        m["complete"] = not m["complete"]
        meta = msgpack.packb(m, use_bin_type=True)
        header = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.T.RESULT, len(meta), 0)
        return [header + meta + f.tag]
    return [f.raw()]


async def test_forged_result_is_refused_by_the_sender(nursery, tmp_path):
    mem = {"ram": random_memory(NPAGES, 7)}
    rx, proxy, pport, logs = await _through_proxy(nursery, tmp_path / "out", KEY, _forge_result)
    with pytest.raises(ProtocolError, match="from the receiver failed authentication"):
        await _migrate(pport, KEY, mem)
    assert any(f.type is wire.T.RESULT for f in proxy.frames)


def test_frame_keys_bind_channel_session_direction_and_mode():
    """A frame sealed for one connection opens on no other: another channel or session, the
    other direction (a reflected frame), or the other mode."""
    nc, ns, sid = b"c" * 32, b"s" * 32, b"i" * 16
    head = wire.encode(wire.RoundEnd(3))
    hdr, meta = head[:wire.HEADER_SIZE], head[wire.HEADER_SIZE:]

    def sealed_by(channel=0, session=sid, mode="mac"):
        send, _ = derive(KEY, transcript(nc, ns, session, channel, mode), mode, server=False)
        return send.seal(head, ())

    def opener(channel=0, session=sid, mode="mac", server=True):
        return derive(KEY, transcript(nc, ns, session, channel, mode), mode, server=server)[1]

    h, tag = sealed_by()
    assert opener().open(hdr, h[wire.HEADER_SIZE:], None, tag) == meta     # the right one
    for o in (opener(channel=1), opener(session=b"j" * 16), opener(server=False)):
        with pytest.raises(ProtocolError, match="failed authentication"):
            o.open(hdr, h[wire.HEADER_SIZE:], None, tag)
    h2, tag2 = sealed_by(mode="aead")
    assert h2[wire.HEADER_SIZE:] != meta                                  # encrypted
    with pytest.raises(ProtocolError, match="failed authentication"):
        opener(mode="mac").open(hdr, h2[wire.HEADER_SIZE:], None, tag2)
    assert opener(mode="aead").open(hdr, h2[wire.HEADER_SIZE:], None, tag2) == meta


MARK = b"secret-page-mark"


@pytest.mark.parametrize("encrypt", [False, True], ids=["mac", "aead"])
async def test_encrypt_hides_pages_on_the_wire(nursery, tmp_path, encrypt):
    """--encrypt: the destination gets the exact pages, and no page content crosses the wire
    in the clear (without it, pages are authenticated but readable: the control)."""
    mem = {"ram": bytearray(MARK * (NPAGES * PS // len(MARK)))}
    for p in range(0, NPAGES, 3):
        mem["ram"][p * PS:p * PS + 8] = p.to_bytes(8, "little")
    out = tmp_path / "out"
    rx, proxy, pport, logs = await _through_proxy(nursery, out, KEY, lambda f: [f.raw()])
    res = await _migrate(pport, KEY, mem, encrypt=encrypt)
    assert res.complete
    assert read_image(out, manifest(str(out)), "ram") == bytes(mem["ram"])
    assert (MARK in proxy.wire_bytes["c2s"]) is not encrypt
    assert any("encrypted" in line for line in logs) is encrypt


async def test_receiver_requiring_encryption_refuses_a_plain_sender(nursery, tmp_path):
    logs = Logs()
    rx = Receiver(str(tmp_path / "out"), key=KEY, log=logs, require_encryption=True)
    port = await nursery.start(rx.serve, "127.0.0.1", 0)
    mem = {"ram": random_memory(NPAGES, 8)}
    with pytest.raises(TransportError, match="encrypted sessions only: pass --encrypt"):
        await _migrate(port, KEY, mem)
    assert (await _migrate(port, KEY, mem, encrypt=True)).complete
    with pytest.raises(UsageError, match="encryption needs a key"):
        await _migrate(port, None, mem, encrypt=True)


# -- bounded work -------------------------------------------------------------------------------

async def test_frame_type_is_checked_before_its_meta_is_read(nursery, tmp_path):
    """A SETUP header claiming ~1 MiB of meta in place of HELLO is refused on its header alone:
    the receiver answers at once, without waiting for (or reading) the meta that never comes."""
    rx, port, logs = await start_receiver(nursery, tmp_path / "out")
    fs = FrameStream(await trio.open_tcp_stream("127.0.0.1", port), "receiver")
    await fs.stream.send_all(wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.T.SETUP, wire.MAX_META, 0))
    with pytest.raises(TransportError, match="unexpected SETUP .*expected HELLO"):
        await fs.receive()
    await fs.aclose()
    line = await logs.wait_for("rejected")
    assert "unexpected SETUP" in line and len(line) < 300


async def test_pending_handshakes_are_capped_per_address(nursery, tmp_path):
    """Idle connections from one address fill its own quota only: the next one from there is
    closed at once, while a sender from another address still gets in."""
    rx, port, logs = await start_receiver(nursery, tmp_path / "out")
    idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(receiver_mod.MAX_PENDING_PER_ADDRESS)]
    await await_until(lambda: rx._pending >= len(idle), 10, f"the receiver to hold {len(idle)} pending handshakes")
    extra = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(5):
        assert await extra.receive_some(100) == b""           # closed without a word
    await logs.wait_for("still in their handshake")
    other = FrameStream(await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2"), "receiver")
    await client_handshake(other, KEY, b"o" * 16, 0, then=wire.Setup(PS, 1, tuple(REGIONS)))
    await other.expect(wire.SetupOk)
    await other.aclose()
    for s in idle + [extra]:
        await s.aclose()


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


async def test_receive_buffers_are_bounded_by_bytes_not_page_size(nursery, tmp_path):
    """A session with 64 KiB pages: the receiver reserves 4 MiB buffers per channel (three),
    not 1024 pages' worth (64 MiB each)."""
    rx, port, logs = await start_receiver(nursery, tmp_path / "out")
    before = _vm_size()
    regions = [RegionSpec("ram", 0, 64 << 20)]
    async with connect_sender("127.0.0.1", port, key=KEY, regions=regions, page_size=64 << 10,
                              batch_pages=4) as s:
        # logged at set-up, and the channel's buffers reserved before the receiver's next
        # checkpoint: by the time this task runs again (trio switches tasks only at checkpoints)
        await logs.wait_for("page size 65536")
        grown = _vm_size() - before
        mem = {"ram": bytearray(64 << 20)}

        class Big(BufferReader):
            def read(self, name, first, n):
                return memoryview(mem[name])[first * (64 << 10):(first + n) * (64 << 10)]
        await s.send_pages({"ram": [(0, 1024)]}, Big(), 0)
        assert (await s.finish({"ram": digest_bytes(mem["ram"], 64 << 10)})).complete
    # the sender's own buffers (its pool) are in this process too: 4 x 8 batches of 256 KiB
    assert grown < 48 << 20, f"{grown >> 20} MiB mapped for one session"


async def test_session_over_the_memory_budget_is_refused(nursery, tmp_path):
    out = tmp_path / "out"
    logs = Logs()
    rx = Receiver(str(out), key=KEY, log=logs, max_memory=64 << 20)
    port = await nursery.start(rx.serve, "127.0.0.1", 0)
    big = [RegionSpec("ram", 0, 8 << 30)]      # 2 Mi pages: 24 MiB + 48 MiB for one channel
    with pytest.raises(TransportError, match=r"would need 72 MiB .* over its limit of 64 MiB \(receive --max-memory\)"):
        async with connect_sender("127.0.0.1", port, key=KEY, regions=big):
            pass
    assert not [n for n in os.listdir(out) if n.endswith(".img")] if out.exists() else True
    small = {"ram": random_memory(NPAGES, 9)}
    async with connect_sender("127.0.0.1", port, key=KEY, regions=REGIONS) as s:
        await s.send_pages({"ram": [(0, NPAGES)]}, MemReader(small), 0)
        assert (await s.finish({"ram": digest_bytes(small["ram"])})).complete


@pytest.mark.slow
async def test_a_silent_link_fails_the_sender_instead_of_hanging(nursery, tmp_path, monkeypatch):
    """A link that accepts bytes but delivers nothing (a blackhole, here after SETUP): waiting
    for the receiver's acknowledgement ends with a 'stalled' error after STALL_S (shortened
    here), it does not wait forever (found by bench faults: migrate hung on such a link)."""
    from migrator.transport import framing
    monkeypatch.setattr(framing, "STALL_S", 1.0)

    def blackhole(f: Frame) -> list[bytes]:
        return [f.raw()] if f.type in (wire.T.HELLO, wire.T.CHALLENGE, wire.T.AUTH, wire.T.WELCOME,
                                       wire.T.SETUP, wire.T.SETUP_OK) else []
    rx, proxy, pport, logs = await _through_proxy(nursery, tmp_path / "out", KEY, blackhole)
    mem = {"ram": random_memory(NPAGES, 10)}
    with trio.fail_after(30):
        with pytest.raises(TransportError, match="stalled: nothing received for 1 s"):
            async with connect_sender("127.0.0.1", pport, key=KEY, regions=REGIONS) as s:
                await s.send_pages({"ram": [(0, NPAGES)]}, MemReader(mem), 0)
                await s.end_round(0)


# -- the commit: a verdict lost on the way never leaves two valid copies (found by bench faults) --

def _drop_s2c(kind: wire.T):
    def tamper(f: Frame) -> list[bytes]:
        return [] if f.direction == "s2c" and f.type is kind else [f.raw()]
    return tamper


async def test_manifest_is_complete_only_once_the_sender_commits(nursery, tmp_path):
    out = tmp_path / "out"
    rx, proxy, pport, logs = await _through_proxy(nursery, out, KEY, lambda f: [f.raw()])
    mem = {"ram": random_memory(NPAGES, 11)}
    async with connect_sender("127.0.0.1", pport, key=KEY, regions=REGIONS) as s:
        await s.send_pages({"ram": [(0, NPAGES)]}, MemReader(mem), 0)
        assert (await s.finish({"ram": digest_bytes(mem["ram"])}, commit=True)).complete
        await s.wait_synced(30)
        with open(out / "manifest.json") as f:
            assert __import__("json").load(f)["complete"] is False      # not before the commit
        await s.commit()
        await s.wait_committed(30)
        # COMMITTED means the manifest is on disk: no race with the receiver writing it (the
        # thin-link scenarios read it while the COMMIT was still in flight)
        assert manifest(str(out))["complete"] is True
    (o,) = await rx.wait_sessions(1)
    assert o.complete and manifest(str(out))["complete"] is True
    assert read_image(out, manifest(str(out)), "ram") == bytes(mem["ram"])


async def test_a_lost_committed_is_reported_not_ignored(nursery, tmp_path):
    """The receiver's COMMITTED never arrives: the sender says it got no word (its caller keeps
    the source paused); the destination, which did commit, says complete."""
    out = tmp_path / "out"
    rx, proxy, pport, logs = await _through_proxy(nursery, out, KEY, _drop_s2c(wire.T.COMMITTED))
    mem = {"ram": random_memory(NPAGES, 13)}
    async with connect_sender("127.0.0.1", pport, key=KEY, regions=REGIONS) as s:
        await s.send_pages({"ram": [(0, NPAGES)]}, MemReader(mem), 0)
        assert (await s.finish({"ram": digest_bytes(mem["ram"])}, commit=True)).complete
        await s.wait_synced(30)
        await s.commit()
        with pytest.raises(MigratorError, match="closed the connection|no word within 1 s"):
            await s.wait_committed(1)
    (o,) = await rx.wait_sessions(1)
    assert o.complete and manifest(str(out))["complete"] is True


@pytest.mark.parametrize("lost", ["result-forged", pytest.param("synced-dropped", marks=pytest.mark.slow)])
async def test_a_lost_verdict_leaves_the_destination_incomplete(nursery, tmp_path, lost):
    """The receiver verified everything, but its RESULT is forged (the sender refuses it) or its
    SYNCED never arrives (the sender gives up): the sender fails, so its source would resume,
    and the destination must not say complete."""
    out = tmp_path / "out"
    tamper = _forge_result if lost == "result-forged" else _drop_s2c(wire.T.SYNCED)
    rx, proxy, pport, logs = await _through_proxy(nursery, out, KEY, tamper)
    mem = {"ram": random_memory(NPAGES, 12)}
    with pytest.raises(MigratorError):
        async with connect_sender("127.0.0.1", pport, key=KEY, regions=REGIONS) as s:
            await s.send_pages({"ram": [(0, NPAGES)]}, MemReader(mem), 0)
            assert (await s.finish({"ram": digest_bytes(mem["ram"])}, commit=True)).complete
            await s.wait_synced(2)
            await s.commit()
    (o,) = await rx.wait_sessions(1)
    assert not o.complete and any(w in o.error for w in ("commit", "sender aborted")), o.error
    assert manifest(str(out))["complete"] is False


async def test_a_send_interrupted_part_way_ends_sending_on_that_connection():
    """A sealed send cancelled while its bytes go out (the session failed meanwhile): its frame
    may be half sent and its sequence number is spent, so nothing may follow it; before, the
    ERROR sent next failed the peer's authentication ("frame #0 ... forged on the way", seen by
    bench fuzz), as if the link had been tampered with.  Its reason is simply not sent."""
    a, b = trio.socket.socketpair()
    fs = FrameStream(trio.SocketStream(a), "peer")
    send_seal, _ = derive(KEY, transcript(b"c" * 32, b"s" * 32, b"x" * 16, 0, "mac"), "mac", server=True)
    fs.arm(send=send_seal)
    with trio.move_on_after(0.3) as cs:          # the peer reads nothing: the send blocks
        await fs.send_raw(wire.encode(wire.Closed()), tuple(bytearray(128 << 10) for _ in range(256)))
    assert cs.cancelled_caught
    with pytest.raises(TransportError, match="an earlier send was interrupted part-way"):
        await fs.send(wire.Closed())
    await fs.send_error("too late")              # (best effort: says nothing, raises nothing)
    assert send_seal.seq == 1                    # (no further frame was sealed)
    await fs.aclose()
    b.close()
