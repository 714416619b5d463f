"""Bad input at the receiver: each case ends with a clear error, no crash, no image marked
complete, and the same (non --once) receiver then completes a good migration."""

import os
import struct

import msgpack
import pytest
import trio

from migrator.errors import AuthError
from migrator.transport import RegionSpec, connect_sender, digest_bytes, wire
from migrator.transport.auth import client_handshake, proof
from migrator.transport.framing import FrameStream

from transport_helpers import KEY, PS, MemReader, batch_frame, random_memory, raw_session, start_receiver
from migration_helpers import manifest

REGIONS = [RegionSpec("ram", 0, 64 * PS)]


def _manifest(out):
    """The manifest once final (see migration_helpers.manifest), None if there is none."""
    path = os.path.join(out, "manifest.json")
    if not os.path.exists(path):
        return None
    return manifest(str(out))


async def _good_migration(port, out, key=KEY):
    mem = {"ram": random_memory(64, 42)}
    async with connect_sender("127.0.0.1", port, key=key, regions=REGIONS) as s:
        await s.send_pages({"ram": [(0, 64)]}, MemReader(mem), 0)
        res = await s.finish({"ram": digest_bytes(mem["ram"])})
    assert res.complete
    m = _manifest(out)
    assert m["complete"] is True
    with open(os.path.join(out, m["regions"][0]["image"]), "rb") as f:
        assert f.read() == bytes(mem["ram"])


def _hdr(t, meta_len, data_len=0):
    return struct.pack("!2sBBII", b"MG", wire.VERSION, t, meta_len, data_len)


# a msgpack value nested 1000 deep ([[[...nil...]]]): repr() of it in an error message overflowed
# the stack, and the RecursionError took the whole receiver down (found by bench fuzz)
_MARK = b"\xfe" * 16
_DEEP = b"\x91" * 1000 + b"\xc0"


def _with_deep(obj) -> bytes:
    """obj packed, with the value _MARK replaced by the deeply nested one."""
    return msgpack.packb(obj, use_bin_type=True).replace(msgpack.packb(_MARK), _DEEP, 1)


def _deep_run_batch() -> bytes:
    f = batch_frame(0, 0, [(0, 1)], [], b"x" * PS)
    _, _, _, meta_len, data_len = struct.unpack("!2sBBII", f[:12])
    meta = msgpack.unpackb(f[12:12 + meta_len], raw=False)
    meta["d"] = [_MARK, 1]
    deep = _with_deep(meta)
    return _hdr(wire.T.BATCH, len(deep), data_len) + deep + f[12 + meta_len:]


# after a valid handshake and SETUP: what the bad sender sends, and the error the receiver names
SESSION_CASES = {
    "nested-run": (_deep_run_batch(), "has a bad run (a list, 1)"),
    "garbage": (b"\x00garbage\xff" * 10, "bad magic"),
    "truncated": (_hdr(wire.T.ROUND_END, 50) + b"\x81", "truncated frame"),
    "oversized": (_hdr(wire.T.BATCH, 10, 1 << 31), "oversized BATCH"),
    "unknown-type": (_hdr(200, 0), "unknown message type 200"),
    "beyond-region": (batch_frame(0, 0, [(63, 2)], [], b"x" * 2 * PS), "page index 64 beyond region"),
    "zero-beyond-region": (batch_frame(0, 0, [], [(1000, 1)], b""), "page index 1000 beyond region"),
    "undeclared-region": (batch_frame(3, 0, [(0, 1)], [], b"x" * PS), "undeclared region #3"),
    "wrong-hash": (batch_frame(0, 0, [(0, 1)], [], b"x" * PS, digest=12345), "hash mismatch"),
    "peer-gone-mid-batch": (batch_frame(0, 0, [(0, 4)], [], b"x" * 4 * PS)[:-PS - 7], "went away in the middle"),
    "end-too-early": ([wire.encode(wire.RoundEnd(0)), wire.encode(wire.Close())], "unexpected CLOSE"),
    "prepare-beyond-region": (wire.encode(wire.Prepare(0, (60, 10))), "PREPARE page index 69 beyond region"),
    "prepare-undeclared": (wire.encode(wire.Prepare(2, (0, 1))), "PREPARE for undeclared region #2"),
    "compressed-unannounced": (batch_frame(0, 0, [(0, 2)], [], b"a" * 2 * PS, compressed=b"xyz", codec=2),
                               "compressed with lz4, which the session did not announce"),
    "prepare-twice": ([wire.encode(wire.Prepare(0, (0, 64))), wire.encode(wire.Prepare(0, (0, 64)))],
                      "PREPARE announces 128 pages of region 'ram' in all, which holds 64"),
    "prepare-empty": (_hdr(wire.T.PREPARE, 7) + msgpack.packb({"r": 0, "p": []}), "PREPARE frame: no pages"),
}


@pytest.mark.parametrize("case", sorted(SESSION_CASES))
@pytest.mark.parametrize("keyed", [True, False], ids=["sealed", "no-key"])
async def test_bad_frame_in_session(nursery, tmp_path, case, keyed):
    """Each bad frame from a sender past the handshake.  With a key every frame is sealed (the
    bad ones too: an authenticated but buggy or hostile sender), so the receiver's checks
    behind the seal are what is tested; without one, the bytes arrive exactly as written."""
    payload, match = SESSION_CASES[case]
    key = KEY if keyed else None
    out = tmp_path / "out"
    rx, port, logs = await start_receiver(nursery, out, key=key)
    fs = await raw_session(port, REGIONS, key=key)
    await fs.send_raw(batch_frame(0, 0, [(0, 1)], [], b"ok" * (PS // 2)))  # a valid batch first
    for frame in payload if isinstance(payload, list) else [payload]:
        await fs.send_raw(frame)
    if case in ("peer-gone-mid-batch", "truncated"):
        await fs.stream.send_eof()  # the rest never comes
    (o,) = await rx.wait_sessions(1)
    assert not o.complete
    assert match in o.error
    assert any("FAILED" in line and match in line for line in logs)
    m = _manifest(out)
    assert m["complete"] is False and m["error"] and all(r["status"] == "failed" for r in m["regions"])
    # the sender is told why (unless it is gone)
    if case != "peer-gone-mid-batch":
        with pytest.raises(Exception) as ei:
            while True:
                await fs.receive(PS)
        assert match in str(ei.value) or "closed" in str(ei.value)
    await fs.aclose()
    await _good_migration(port, out, key)


# before any session: garbage and impostors get rejected at the handshake
async def _garbage(port):
    s = await trio.open_tcp_stream("127.0.0.1", port)
    await s.send_all(b"GET / HTTP/1.0\r\n\r\n")
    await s.aclose()


async def _wrong_key_sender(port):
    with pytest.raises(AuthError, match="wrong key"):
        async with connect_sender("127.0.0.1", port, key=b"not the key, not the key", regions=REGIONS):
            pass


async def _impostor_wrong_mac(port):
    """Ignores the server's proof and just answers with a MAC made with another key."""
    fs = FrameStream(await trio.open_tcp_stream("127.0.0.1", port), "receiver")
    nonce_c = b"c" * 32
    await fs.send(wire.Hello(wire.VERSION, nonce_c, b"s" * 16, 0, True))
    ch = await fs.expect(wire.Challenge)
    await fs.send(wire.Auth(proof(b"x" * 32, "client", nonce_c, ch.nonce, b"s" * 16, 0)))
    with pytest.raises(Exception, match="failed authentication"):
        await fs.receive()
    await fs.aclose()


async def _replayed_handshake(port):
    """Record a legitimate handshake, then replay the sender's half on a new connection."""
    fs = FrameStream(await trio.open_tcp_stream("127.0.0.1", port), "receiver")
    sent = []
    orig = fs.send_raw
    async def recording(head, data=None):
        sent.append(head)
        await orig(head, data)
    fs.send_raw = recording
    await client_handshake(fs, KEY, b"r" * 16, 0)
    await fs.aclose()
    hello, auth = sent[0], sent[1]
    fs2 = FrameStream(await trio.open_tcp_stream("127.0.0.1", port), "receiver")
    await fs2.send_raw(hello)
    await fs2.expect(wire.Challenge)
    await fs2.send_raw(auth)
    with pytest.raises(Exception, match="replayed"):
        await fs2.receive()
    await fs2.aclose()


async def _no_key_sender(port):
    with pytest.raises(AuthError, match="requires a key"):
        async with connect_sender("127.0.0.1", port, key=None, regions=REGIONS):
            pass


async def _unknown_channel(port):
    fs = FrameStream(await trio.open_tcp_stream("127.0.0.1", port), "receiver")
    with pytest.raises(Exception, match="no active session"):
        await client_handshake(fs, KEY, b"q" * 16, 1)  # authenticated, but joins no session
    await fs.aclose()


async def _bad_setup(port):
    fs = FrameStream(await trio.open_tcp_stream("127.0.0.1", port), "receiver")
    await client_handshake(fs, KEY, b"b" * 16, 0)
    meta = msgpack.packb({"page_size": 4096, "channels": 1, "regions": [["../../etc/x", 0, 1 << 60]],
                          "compress": 0, "delta": False})
    await fs.send_raw(_hdr(wire.T.SETUP, len(meta)) + meta)
    with pytest.raises(Exception, match="bad range|larger"):
        await fs.receive()
    await fs.aclose()


async def _deep_setup(port):
    fs = FrameStream(await trio.open_tcp_stream("127.0.0.1", port), "receiver")
    await client_handshake(fs, KEY, b"d" * 16, 0)
    meta = _with_deep({"page_size": 4096, "channels": 1, "regions": [[_MARK, 0, 4096]], "compress": 0, "delta": False})
    await fs.send_raw(_hdr(wire.T.SETUP, len(meta)) + meta)
    with pytest.raises(Exception, match="bad region name a list"):
        await fs.receive()
    await fs.aclose()


PRE_CASES = {"deep-setup": (_deep_setup, "bad region name a list"),"garbage": (_garbage, "bad magic"), "wrong-key": (_wrong_key_sender, "wrong key"),
             "wrong-mac": (_impostor_wrong_mac, "failed authentication"),
             "replayed-handshake": (_replayed_handshake, "replayed"),
             "no-key": (_no_key_sender, "requires a key"),
             "unknown-channel": (_unknown_channel, "no active session"),
             "bad-setup": (_bad_setup, "SETUP")}


@pytest.mark.parametrize("case", sorted(PRE_CASES))
async def test_rejected_before_session(nursery, tmp_path, case):
    attack, match = PRE_CASES[case]
    out = tmp_path / "out"
    rx, port, logs = await start_receiver(nursery, out)
    await attack(port)
    # wait until the receiver has logged its verdict on that connection
    await logs.wait_for(match)
    assert all("complete" not in line for line in logs)
    m = _manifest(out)
    assert m is None or m["complete"] is False
    if case != "bad-setup":
        assert not os.path.exists(out) or not [f for f in os.listdir(out) if f.endswith(".img")]
    await _good_migration(port, out)


async def test_non_loopback_without_key_refused(tmp_path):
    from migrator.errors import UsageError
    from migrator.transport import serve
    with pytest.raises(UsageError, match="without a key"):
        await serve("0.0.0.0", 0, str(tmp_path), key=None)
    with pytest.raises(UsageError, match="without a key"):
        await serve("::", 0, str(tmp_path), key=None)


async def test_busy_receiver_rejects_second_session(nursery, tmp_path):
    out = tmp_path / "out"
    rx, port, logs = await start_receiver(nursery, out)
    fs = await raw_session(port, REGIONS)
    from migrator.errors import TransportError
    with pytest.raises(TransportError, match="busy"):
        async with connect_sender("127.0.0.1", port, key=KEY, regions=REGIONS):
            pass
    await fs.aclose()
    (o,) = await rx.wait_sessions(1)
    assert "disconnected" in o.error
    await _good_migration(port, out)


# files: the receiver never writes through a symbolic link planted in its output folder
async def test_planted_symlinks_in_the_output_folder_are_not_followed(nursery, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 512)
    (out / "000-ram.img").symlink_to(victim)                        # the image's name
    rx, port, logs = await start_receiver(nursery, out)
    with pytest.raises(Exception, match="Too many levels of symbolic links|symbolic link"):
        async with connect_sender("127.0.0.1", port, key=KEY, regions=REGIONS):
            pass
    assert victim.read_bytes() == b"precious" * 512
    assert any("symbolic link" in line for line in logs), list(logs)
    # a hard link to the victim under the image's name is refused too
    (out / "000-ram.img").unlink()
    os.link(victim, out / "000-ram.img")
    with pytest.raises(Exception, match="not a regular file of ours with a single link"):
        async with connect_sender("127.0.0.1", port, key=KEY, regions=REGIONS):
            pass
    assert victim.read_bytes() == b"precious" * 512
    (out / "000-ram.img").unlink()
    # the manifest's temporary file, whose name is predictable, is removed, never followed
    tmp_manifest = out / f"manifest.json.tmp.{os.getpid()}"
    tmp_manifest.symlink_to(victim)
    await _good_migration(port, out)
    assert victim.read_bytes() == b"precious" * 512
    assert not tmp_manifest.exists() and not tmp_manifest.is_symlink()


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770])
async def test_output_folder_writable_by_others_is_refused(tmp_path, mode):
    """A folder others can write to (such as /tmp itself) is refused before listening: they
    could plant links in it between two sessions."""
    from migrator.errors import UsageError
    from migrator.transport.receiver import Receiver
    out = tmp_path / "shared"
    out.mkdir()
    out.chmod(mode)
    rx = Receiver(str(out), key=KEY)
    with pytest.raises(UsageError, match="writable by (others|its group).*chmod go-w"):
        await rx.serve("127.0.0.1", 0)
    assert os.listdir(out) == []


async def test_session_refused_at_setup_leaves_no_complete_manifest(nursery, tmp_path):
    """After a complete session, a new one whose second image cannot be created (a link planted
    under its name) is refused; by then the first image was truncated for the new session, so
    the old manifest must no longer say complete."""
    out = tmp_path / "out"
    rx, port, logs = await start_receiver(nursery, out)
    await _good_migration(port, out)
    assert _manifest(out)["complete"] is True
    two = [RegionSpec("ram", 0, 64 * PS), RegionSpec("heap", 0, 8 * PS)]
    (out / "001-heap.img").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(Exception, match="symbolic link"):
        async with connect_sender("127.0.0.1", port, key=KEY, regions=two):
            pass
    m = _manifest(out)
    assert m["complete"] is False and len(m["regions"]) == 2 and "symbolic link" in m["error"]
    assert [r["status"] for r in m["regions"]] == ["failed", "failed"]
    assert not (tmp_path / "elsewhere").exists()


async def test_an_internal_error_fails_the_session_not_the_receiver(nursery, tmp_path, monkeypatch):
    """A bug of ours in a session (simulated: END's handling raises a ValueError) fails that
    session with a clear 'internal error', and the receiver serves the next one (an uncaught
    exception used to end `migrator receive` for every later migration)."""
    from migrator.transport.receiver import Receiver
    real = Receiver._finish

    async def broken(self, fs, s, end):
        raise ValueError("simulated bug")
    monkeypatch.setattr(Receiver, "_finish", broken)
    out = tmp_path / "out"
    rx, port, logs = await start_receiver(nursery, out)
    mem = {"ram": random_memory(64, 7)}
    with pytest.raises(Exception, match="receiver internal error: ValueError: simulated bug"):
        async with connect_sender("127.0.0.1", port, key=KEY, regions=REGIONS) as s:
            await s.send_pages({"ram": [(0, 64)]}, MemReader(mem), 0)
            await s.finish({"ram": digest_bytes(mem["ram"])})
    (o,) = await rx.wait_sessions(1)
    assert not o.complete and "simulated bug" in o.error
    assert _manifest(out)["complete"] is False
    monkeypatch.setattr(Receiver, "_finish", real)
    await _good_migration(port, out)
