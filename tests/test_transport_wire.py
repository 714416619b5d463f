"""wire.py: every message round-trips; every malformed frame is a ProtocolError; fuzzing."""

import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migrator.errors import ProtocolError
from migrator.transport import wire
from migrator.transport.wire import RegionSpec

PS = 4096

SAMPLES = [
    wire.Hello(1, b"n" * 32, b"s" * 16, 3, True),
    wire.Challenge(b"m" * 32, None),
    wire.Challenge(b"m" * 32, b"x" * 32),
    wire.Auth(b"a" * 32),
    wire.Welcome(),
    wire.Setup(4096, 2, (RegionSpec("ram", 0x10000, 0x20000), RegionSpec("/memfd:guest (deleted)", 0, 4096))),
    wire.Setup(4096, 1, (RegionSpec("ram", 0, 4096),), compress=1),
    wire.SetupOk(("000-ram.img",)),
    wire.RoundEnd(7),
    wire.RoundEnd(7, final=True),
    wire.RoundEnd(7, warm=True),
    wire.RoundAck(7),
    wire.Prepare(1, (0, 5, 10, 3)),
    wire.Close(),
    wire.Closed(),
    wire.End(("0" * 32, "f" * 32)),
    wire.Result(False, (True, False), ("a" * 32, None), "digest mismatch in x"),
    wire.Error("boom"),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_roundtrip(msg):
    assert wire.decode_frames(wire.encode(msg)) == [msg]


def test_batch_roundtrip():
    data = bytes(range(256)) * 32  # 2 pages
    digest = wire.batch_digest(1, 5, [10, 2], [0, 3], [data])
    frame = wire.encode_batch(1, 5, [10, 2], [0, 3], len(data), digest) + data
    (b,) = wire.decode_frames(frame)
    assert (b.region, b.round_no, b.data_runs, b.zero_runs, bytes(b.data)) == (1, 5, ((10, 2),), ((0, 3),), data)
    wire.check_batch(b, [20, 12])
    with pytest.raises(ProtocolError, match="beyond region"):
        wire.check_batch(b, [20, 11])
    with pytest.raises(ProtocolError, match="undeclared region"):
        wire.check_batch(b, [20])


def _frame(t, meta, data=b"", meta_len=None, data_len=None):
    m = msgpack.packb(meta) if not isinstance(meta, bytes) else meta
    return wire.HEADER.pack(wire.MAGIC, wire.VERSION, t, len(m) if meta_len is None else meta_len,
                            len(data) if data_len is None else data_len) + m + data


@pytest.mark.parametrize("frame, match", [
    (b"GET / HTTP/1.1\r\n\r\n", "bad magic"),
    (b"MG", "truncated frame header"),
    (struct.pack("!2sBBII", b"MG", 9, 1, 0, 0), "unsupported protocol version 9"),
    (struct.pack("!2sBBII", b"MG", wire.VERSION, 99, 0, 0), "unknown message type 99"),
    (struct.pack("!2sBBII", b"MG", wire.VERSION, wire.T.BATCH, 100, 1 << 30), "oversized BATCH"),
    (struct.pack("!2sBBII", b"MG", wire.VERSION, wire.T.HELLO, 1 << 31, 0), "oversized HELLO"),
    (struct.pack("!2sBBII", b"MG", wire.VERSION, wire.T.HELLO, 2, 5), "carries 5 bytes of data"),
    (_frame(wire.T.ROUND_END, {"n": 1, "f": False, "w": False})[:-1], "truncated ROUND_END"),
    (_frame(wire.T.ROUND_END, b"\xc1"), "undecodable"),
    (_frame(wire.T.ROUND_END, [1]), "expected a map"),
    (_frame(wire.T.ROUND_END, {"n": "1", "f": False, "w": False}), "expected an integer"),
    (_frame(wire.T.ROUND_END, {"n": True, "f": False, "w": False}), "expected an integer"),
    (_frame(wire.T.ROUND_END, {"n": -1, "f": False, "w": False}), "out of range"),
    (_frame(wire.T.ROUND_END, {"n": 1, "f": 1, "w": False}), "'f' is int, expected a boolean"),
    (_frame(wire.T.ROUND_END, {"n": 1, "f": False, "w": None}), "'w' is NoneType, expected a boolean"),
    (_frame(wire.T.ROUND_END, {"n": 1, "f": False}), r"lacks field\(s\) \['w'\]"),
    (_frame(wire.T.ROUND_END, {"n": 1}), r"lacks field\(s\) \['f', 'w'\]"),
    (_frame(wire.T.ROUND_END, {"n": 1, "f": False, "w": False, "x": 2}), "unexpected field"),
    (_frame(wire.T.ROUND_ACK, {"n": 1, "f": False}), "unexpected field"),
    (_frame(wire.T.ROUND_END, {}), "lacks field"),
    (_frame(wire.T.SETUP, {"page_size": 4097, "channels": 1, "regions": [["a", 0, 4096]], "compress": 0, "delta": False}), "out of range|power of two"),
    (_frame(wire.T.SETUP, {"page_size": 4096, "channels": 1, "regions": [["a", 0, 4095]], "compress": 0, "delta": False}), "aligned"),
    (_frame(wire.T.SETUP, {"page_size": 4096, "channels": 1, "regions": [["a", 8192, 4096]], "compress": 0, "delta": False}), "bad range"),
    (_frame(wire.T.SETUP, {"page_size": 4096, "channels": 1, "regions": [["a", 0, 4096], ["a", 4096, 8192]], "compress": 0, "delta": False}), "twice"),
    (_frame(wire.T.SETUP, {"page_size": 4096, "channels": 1, "regions": [["a\n", 0, 4096]], "compress": 0, "delta": False}), "control"),
    (_frame(wire.T.SETUP, {"page_size": 4096, "channels": 1, "regions": [["a", 0, 1 << 50]], "compress": 0, "delta": False}), "larger"),
    (_frame(wire.T.SETUP, {"page_size": 4096, "channels": 1, "regions": [], "compress": 0, "delta": False}), "empty"),
    (_frame(wire.T.BATCH, {"r": 0, "n": 0, "d": [0, 1], "z": [], "h": 0, "c": 0}, b"x" * 100), "announce 4096 bytes"),
    (_frame(wire.T.BATCH, {"r": 0, "n": 0, "d": [0], "z": [], "h": 0, "c": 0}), "odd length"),
    (_frame(wire.T.BATCH, {"r": 0, "n": 0, "d": [], "z": [0, 0], "h": 0, "c": 0}), "bad run"),
    (_frame(wire.T.BATCH, {"r": 0, "n": 0, "d": [], "z": [], "h": 0, "c": 0}), "no pages"),
    (_frame(wire.T.BATCH, {"r": 0, "n": 0, "d": [], "z": [0, 1 << 21], "h": 0, "c": 0}), "more than"),
    (_frame(wire.T.BATCH, {"r": 0, "n": 0, "d": [0, 1], "z": [], "h": 1, "c": 0}, b"x" * 4096), "hash mismatch"),
    (_frame(wire.T.BATCH, {"r": 0, "n": 0, "d": [0, 1], "z": [], "h": 0, "c": 1}, b"x" * 4096), "must be smaller"),
    (_frame(wire.T.BATCH, {"r": 0, "n": 0, "d": [0, 1], "z": [], "h": 0, "c": 4}, b"x" * 9), "out of range"),
    (_frame(wire.T.END, {"digests": ["xyz"], "commit": False}), "hex digest"),
    (_frame(wire.T.ERROR, {"message": "x" * 2000}), "at most"),
])
def test_bad_frames(frame, match):
    with pytest.raises(ProtocolError, match=match):
        wire.decode_frames(frame)


def test_batch_needs_setup():
    with pytest.raises(ProtocolError, match="BATCH before SETUP"):
        wire.decode_frames(_frame(wire.T.BATCH, {"r": 0, "n": 0, "d": [], "z": [0, 1], "h": 0, "c": 0}), page_size=None)


_valid = b"".join(wire.encode(m) for m in SAMPLES)
_good_batch = wire.encode_batch(0, 1, [0, 1], [], PS, wire.batch_digest(0, 1, [0, 1], [], [b"q" * PS])) + b"q" * PS


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(buf):
    try:
        wire.decode_frames(buf)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_valid) + len(_good_batch) - 1), st.integers(0, 255)),
                min_size=1, max_size=8),
       st.integers(0, len(_valid) + len(_good_batch)))
def test_fuzz_mutated_frames(edits, cut):
    buf = bytearray(_valid + _good_batch)
    for pos, val in edits:
        buf[pos] = val
    try:
        msgs = wire.decode_frames(bytes(buf[:cut]))
    except ProtocolError:
        return
    for m in msgs:  # whatever decodes is well-formed
        assert type(m) in wire._TYPE_OF


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(wire.T)),
       st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.binary(max_size=40)
                    | st.text(max_size=20) | st.floats(),
                    lambda kids: st.lists(kids, max_size=5)
                    | st.dictionaries(st.sampled_from(["n", "r", "d", "z", "h", "v", "nonce", "mac", "session",
                                                       "channel", "auth", "regions", "page_size", "channels",
                                                       "digests", "message", "images", "x"]), kids, max_size=6),
                    max_leaves=20))
def test_fuzz_structured_meta(t, obj):
    try:
        meta = msgpack.packb(obj)
    except (OverflowError, ValueError, TypeError):
        return
    try:
        wire.decode_frames(_frame(t, meta))
    except ProtocolError:
        pass
