"""decoder.py: the sans-IO frame decoder that both FrameStream readers drive.  A real encoded
stream (sealed or not) decodes the same whatever the read sizes; page data lands in the
decoder's page buffers without a copy through it; every defect is the exact error."""

from __future__ import annotations

import struct
from typing import Callable, Iterator

import pytest

from migrator.errors import PeerClosed, PeerReportedError, ProtocolError, TruncatedFrameError
from migrator.transport import compress, wire
from migrator.transport.decoder import FrameDecoder, Need, RawFrame
from migrator.transport.seal import derive, transcript
from migrator.transport.wire import RegionSpec

PS = 4096
KEY = b"0123456789abcdef0123456789abcdef"
PEER = "sender 10.0.0.1:7000"


def _batch(region: int, rnd: int, first: int, data: bytes, zeros=()) -> tuple[bytes, bytes]:
    """(head, data) of a BATCH frame of len(data) // PS pages from `first`."""
    dflat = [first, len(data) // PS] if data else []
    zflat = list(zeros)
    digest = wire.batch_digest(region, rnd, dflat, zflat, [data])
    return wire.encode_batch(region, rnd, dflat, zflat, len(data), digest), data


def _pages(n: int, seed: int) -> bytes:
    return bytes((seed + i * 7) % 251 for i in range(n * PS))


# what a sender sends after SETUP: small frames and batches of several sizes (one of zeros only)
FRAMES = [
    (wire.encode(wire.Prepare(0, (0, 64))), b""),
    _batch(0, 0, 0, _pages(3, 1)),
    _batch(0, 0, 3, _pages(1, 2), zeros=(4, 10)),
    _batch(0, 0, 0, b"", zeros=(20, 5)),
    (wire.encode(wire.RoundEnd(0)), b""),
    _batch(0, 1, 40, _pages(17, 3)),
    _batch(0, 1, 8, _pages(2, 4)),
    (wire.encode(wire.End(("0" * 32,), True)), b""),
]


def _expected() -> list:
    out = []
    for head, data in FRAMES:
        (msg,) = wire.decode_frames(head + data, PS)
        if isinstance(msg, wire.Batch):
            msg = (msg.region, msg.round_no, msg.data_flat, msg.zero_flat, bytes(msg.data))
        out.append(msg)
    return out


def _seals(mode: str):
    """(the sender's seal for what it sends, the receiver's for what it receives)."""
    t = transcript(b"c" * 32, b"s" * 32, b"x" * 16, 0, mode)
    return derive(KEY, t, mode, server=False)[0], derive(KEY, t, mode, server=True)[1]


def _stream(mode: str | None) -> tuple[bytes, FrameDecoder]:
    """The FRAMES as they travel (sealed in `mode`, or plain), and a decoder to read them."""
    d = FrameDecoder(PEER)
    if mode is None:
        return b"".join(h + data for h, data in FRAMES), d
    send, recv = _seals(mode)
    d.arm(recv)
    out = bytearray()
    for head, data in FRAMES:
        buf = bytearray(data)           # ("aead" encrypts in place)
        head, tag = send.seal(head, (buf,) if buf else ())
        out += head + buf + tag
    return bytes(out), d


def _decode_all(stream: bytes, d: FrameDecoder, sizes: Callable[[], Iterator[int]],
                fill_into: bool) -> list:
    """Drive the decoder as an I/O loop would: reads of the sizes given in turn (at most what
    is left); page data read straight into the view the decoder asks for (fill_into), or fed."""
    pos = 0
    got = []
    size = sizes()
    while len(got) < len(FRAMES):
        step = d.next_frame()
        if isinstance(step, RawFrame):
            msg = d.decode(step, PS)
            if isinstance(msg, wire.Batch):
                # zero copy: the batch's data is the very buffer the I/O side read into
                assert step.data is None or msg.data.obj is step.data.obj
                msg = (msg.region, msg.round_no, msg.data_flat, msg.zero_flat, bytes(msg.data))
            got.append(msg)
            continue
        assert isinstance(step, Need) and step.nbytes > 0
        n = min(next(size), len(stream) - pos)
        if step.into is not None and fill_into:
            n = min(n, len(step.into))
            step.into[:n] = stream[pos:pos + n]
            d.filled(n)
        else:
            d.feed(stream[pos:pos + n])
        pos += n
    assert pos == len(stream) and d.buffered == 0
    with pytest.raises(PeerClosed, match=f"^{PEER} closed the connection$"):
        d.feed(b"")
    return got


def _cycle(*sizes: int) -> Callable[[], Iterator[int]]:
    def gen():
        while True:
            yield from sizes
    return gen


@pytest.mark.parametrize("mode", [None, "mac", "aead"], ids=["plain", "mac", "aead"])
@pytest.mark.parametrize("fill_into", [True, False], ids=["recv-into", "fed"])
@pytest.mark.parametrize("sizes", [_cycle(1), _cycle(3, 4093, 7, 65536, 11), _cycle(1 << 30)],
                         ids=["byte-by-byte", "odd-chunks", "all-at-once"])
def test_a_real_stream_decodes_whatever_the_read_sizes(mode, fill_into, sizes):
    stream, d = _stream(mode)
    assert _decode_all(stream, d, sizes, fill_into) == _expected()


def test_page_data_is_asked_for_in_one_piece_once_the_header_and_meta_are_in():
    """Reading the header and meta with one small read leaves the rest of the page data to be
    read straight into the batch's buffer: one Need for all of it, no copy through feed."""
    head, data = _batch(0, 0, 0, _pages(4, 9))
    d = FrameDecoder(PEER)
    assert d.next_frame() == Need(wire.HEADER_SIZE)
    d.feed(head + data[:100])       # (a 4 KiB read takes the header, the meta and some data)
    step = d.next_frame()
    assert isinstance(step, Need) and step.nbytes == len(data) - 100 == len(step.into)
    step.into[:] = data[100:]
    d.filled(len(step.into))
    frame = d.next_frame()
    assert isinstance(frame, RawFrame) and frame.t is wire.T.BATCH and frame.tag == b""
    assert bytes(d.decode(frame, PS).data) == data


def test_three_page_buffers_in_turn():
    """A batch's data stays valid until the third-next batch: the fourth reuses the first's."""
    d = FrameDecoder(PEER)
    objs = []
    for i in range(4):
        head, data = _batch(0, 0, i, _pages(1, i))
        d.feed(head + data)
        objs.append(d.decode(d.next_frame(), PS).data.obj)
    assert len({id(o) for o in objs[:3]}) == 3 and objs[3] is objs[0]


def test_reserve_makes_the_buffers_before_the_first_batch():
    d = FrameDecoder(PEER)
    fresh = d.reserve(1 << 20)
    assert len(fresh) == 3 and all(len(b) == 1 << 20 for b in fresh)
    assert d.reserve(4096) == []        # (big enough already)
    head, data = _batch(0, 0, 0, _pages(2, 1))
    d.feed(head + data)
    assert d.decode(d.next_frame(), PS).data.obj is fresh[1]


# -- truncated: the peer goes away at every point of a frame -----------------------------------

def _cut_cases():
    head, data = _batch(0, 2, 5, _pages(2, 3))
    meta_len = len(head) - wire.HEADER_SIZE
    plain = head + data
    yield "header", plain[:5], "a frame header (5 of 12 bytes)", None
    yield "meta", plain[:wire.HEADER_SIZE + 3], f"a BATCH frame ({3} of {meta_len} bytes)", None
    yield "data", plain[:len(head) + 100], f"a BATCH frame's page data (100 of {2 * PS} bytes)", None
    send, _ = _seals("mac")
    sealed_head, tag = send.seal(head, (data,))
    yield "tag", sealed_head + data + tag[:9], "a BATCH frame's tag (9 of 16 bytes)", "mac"


@pytest.mark.parametrize("part, cut, what, mode", list(_cut_cases()), ids=lambda v: v if isinstance(v, str) and len(v) < 8 else "")
@pytest.mark.parametrize("fill_into", [True, False], ids=["recv-into", "fed"])
def test_truncated_frame(part, cut, what, mode, fill_into):
    d = FrameDecoder(PEER)
    if mode is not None:
        d.arm(_seals(mode)[1])
    pos = 0
    while pos < len(cut):
        step = d.next_frame()
        assert isinstance(step, Need)
        if step.into is not None and fill_into:
            n = min(len(step.into), len(cut) - pos)
            step.into[:n] = cut[pos:pos + n]
            d.filled(n)
        else:
            n = len(cut) - pos
            d.feed(cut[pos:])
        pos += n
    assert isinstance(d.next_frame(), Need)
    with pytest.raises(TruncatedFrameError) as ei:
        d.feed(b"")
    assert str(ei.value) == f"truncated frame: {PEER} went away in the middle of {what}"


def test_closed_between_frames_is_not_a_truncation():
    d = FrameDecoder(PEER)
    d.feed(wire.encode(wire.RoundEnd(3)))
    assert d.decode(d.next_frame()) == wire.RoundEnd(3)
    with pytest.raises(PeerClosed) as ei:
        d.eof()
    assert str(ei.value) == f"{PEER} closed the connection"
    assert not isinstance(ei.value, ProtocolError)


# -- refused on the header, before any meta is read --------------------------------------------

def _hdr(t: int, meta_len: int, data_len: int = 0) -> bytes:
    return struct.pack("!2sBBII", b"MG", wire.VERSION, t, meta_len, data_len)


@pytest.mark.parametrize("header, message", [
    (_hdr(wire.T.ROUND_END, wire.MAX_SMALL_META + 1),
     f"oversized ROUND_END frame: {wire.MAX_SMALL_META + 1} bytes of meta (limit {wire.MAX_SMALL_META})"),
    (_hdr(wire.T.BATCH, 10, wire.MAX_DATA + 1),
     f"oversized BATCH frame: {wire.MAX_DATA + 1} bytes of data (limit {wire.MAX_DATA})"),
    (_hdr(wire.T.SETUP, 10, 5), "SETUP frame carries 5 bytes of data (only BATCH may)"),
    (_hdr(200, 0), "unknown message type 200"),
    (b"GET / HTTP/1.0\r\n", "not a migrator stream (bad magic b'GE')"),
    (struct.pack("!2sBBII", b"MG", 9, 1, 0, 0), f"unsupported protocol version 9 (this side speaks {wire.VERSION})"),
])
def test_bad_header(header, message):
    d = FrameDecoder(PEER)
    d.feed(header)
    with pytest.raises(ProtocolError) as ei:
        d.next_frame()
    assert str(ei.value) == message and not isinstance(ei.value, TruncatedFrameError)


def test_wrong_type_is_refused_on_its_header():
    d = FrameDecoder(PEER)
    d.feed(wire.encode(wire.Setup(PS, 1, (RegionSpec("ram", 0, PS),)))[:wire.HEADER_SIZE])
    with pytest.raises(ProtocolError) as ei:
        d.next_frame(expect=(wire.Batch, wire.RoundEnd))
    assert str(ei.value) == f"unexpected SETUP from {PEER} (expected BATCH or ROUND_END)"


def test_error_is_always_expected_and_raises_what_the_peer_said():
    d = FrameDecoder(PEER)
    d.feed(wire.encode(wire.Error("disk full")))
    frame = d.next_frame(expect=(wire.Batch,))
    with pytest.raises(PeerReportedError) as ei:
        d.decode(frame)
    assert str(ei.value) == f"{PEER} reported: disk full" and ei.value.reason == "disk full"


# -- sealed: a tampered frame fails its tag before anything in it is parsed ---------------------

@pytest.mark.parametrize("mode", ["mac", "aead"])
@pytest.mark.parametrize("where", ["header", "meta", "data", "tag"])
def test_tampered_frame_fails_authentication(mode, where):
    send, recv = _seals(mode)
    d = FrameDecoder(PEER)
    d.arm(recv)
    first = wire.encode(wire.RoundEnd(0))
    h0, t0 = send.seal(first, ())
    head, data = _batch(0, 1, 0, _pages(2, 5))
    buf = bytearray(data)
    h1, t1 = send.seal(head, (buf,))
    frame = bytearray(h1 + buf + t1)
    at = {"header": 11, "meta": wire.HEADER_SIZE + 2, "data": len(h1) + 4097, "tag": len(frame) - 1}[where]
    frame[at] ^= 0x40
    d.feed(h0 + t0 + bytes(frame))
    assert d.decode(d.next_frame(), PS) == wire.RoundEnd(0)
    if where == "header":       # (data_len changed: the header's own check may refuse it first)
        step = d.next_frame()
        assert isinstance(step, Need)
        return
    with pytest.raises(ProtocolError) as ei:
        d.decode(d.next_frame(), PS)
    assert str(ei.value) == ("frame #1 from the sender failed authentication: altered, replayed, "
                             "reordered or forged on the way")


def test_tampered_header_type_fails_authentication():
    """A header changed into another valid one (type ROUND_END -> CLOSE: same empty data) is
    caught by the tag, not by the meta's checks."""
    send, recv = _seals("mac")
    d = FrameDecoder(PEER)
    d.arm(recv)
    head, tag = send.seal(wire.encode(wire.RoundEnd(0)), ())
    forged = bytearray(head)
    forged[3] = wire.T.ROUND_ACK
    d.feed(bytes(forged) + tag)
    with pytest.raises(ProtocolError, match=r"^frame #0 from the sender failed authentication"):
        d.decode(d.next_frame())


def test_compressed_batch_with_a_codec_the_session_did_not_announce():
    raw = b"a" * 2 * PS
    packed = compress.BatchCompressor(compress.LZ4, auto=False).compress([raw])
    digest = wire.batch_digest(0, 0, [0, 2], [], [raw])
    frame = wire.encode_batch(0, 0, [0, 2], [], len(packed), digest, compress.LZ4) + packed
    d = FrameDecoder(PEER)
    d.feed(frame)
    with pytest.raises(ProtocolError) as ei:
        d.decode(d.next_frame(), PS)
    assert str(ei.value) == ("BATCH of region #0, round 0, from page 0: compressed with lz4, which "
                             "the session did not announce")
