"""The wire format: frame layout, message types, limits, and validation of everything read.

This is the only module that turns bytes from the network into values.  Every length and count
is checked against a limit before anything is allocated, and every field is type- and
range-checked; whatever does not fit raises ProtocolError naming the problem.

A frame is a 12-byte header, a msgpack map ("meta"), then for page batches only, raw page data:

    magic "MG" | version u8 | type u8 | meta_len u32 | data_len u32     (network byte order)

See docs/protocol.md for the message catalogue and the session flow.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
import struct
from dataclasses import dataclass
from typing import Any, Sequence

import msgpack
import xxhash

from ..errors import ProtocolError
from .pagehash import page_hashes

MAGIC = b"MG"
VERSION = 6                   # 2: PREPARE; 3: every frame after the handshake sealed (seal.py);
                              # 4: digests over leaves (digest.py); 5: ROUND_END's final flag;
                              # 6: delta batches (SETUP's delta, BATCH codec DELTA)
HEADER = struct.Struct("!2sBBII")
HEADER_SIZE = HEADER.size

# --- limits (a receiver never allocates more than these per frame) -------------------------
MAX_META = 1 << 20            # bytes of msgpack per frame (a SETUP with many regions)
MAX_BATCH_META = 256 << 10    # bytes of msgpack in a BATCH frame
MAX_SMALL_META = 4096         # every other message
MAX_DATA = 16 << 20           # page data bytes per BATCH frame
DEFAULT_BATCH_PAGES = 1024    # data pages per BATCH frame a sender builds unless told otherwise
MAX_RUNS = 8192               # runs per list (data runs, zero runs) in one batch
MAX_ZERO_PAGES = 1 << 20      # zero-page markers per batch
MAX_REGIONS = 1024
MAX_NAME = 255                # bytes of UTF-8 in a region name
MAX_CHANNELS = 16
MAX_ROUND = (1 << 30) - 1
MAX_REGION_BYTES = 1 << 40
MAX_TOTAL_BYTES = 1 << 40
MIN_PAGE_SIZE = 4096
MAX_PAGE_SIZE = 2 << 20
MAX_MESSAGE = 1000            # characters of an ERROR message
NONCE_SIZE = 32
SESSION_ID_SIZE = 16
MAC_SIZE = 32
MAX_CODEC = 2                 # BATCH compression codecs: 0 none, 1 zstd, 2 lz4 (compress.py)
DELTA = 3                     # BATCH codec: the pages as deltas against the receiver's copies
                              # (delta.py; only if SETUP allowed it)
DIGEST_HEX = 32               # xxh3_128 hex digest length


class T(enum.IntEnum):
    """Frame types.  C = sender (client), S = receiver (server)."""

    HELLO = 1       # C->S  version, client nonce, session id, channel index, wants auth
    CHALLENGE = 2   # S->C  server nonce, server proof
    AUTH = 3        # C->S  client proof
    WELCOME = 4     # S->C  channel authenticated and accepted
    SETUP = 5       # C->S  page size, channel count, regions (channel 0 only)
    SETUP_OK = 6    # S->C  image file names
    BATCH = 7       # C->S  pages of one region in one round (+ raw data)
    ROUND_END = 8   # C->S  every batch of round n on this channel was sent
    ROUND_ACK = 9   # S->C  ... and written
    CLOSE = 10      # C->S  this (secondary) channel is done
    CLOSED = 11     # S->C  ... acknowledged, all its batches written
    END = 12        # C->S  end of migration, source digest per region (channel 0)
    RESULT = 13     # S->C  verification verdict per region
    ERROR = 14      # both  a fatal error, explained; the connection closes after it
    PREPARE = 15    # C->S  pages of a region that will get data (a hint: allocate them)
    SYNCED = 16     # S->C  after a complete RESULT: the images are on disk
    COMMIT = 17     # C->S  after SYNCED: the sender keeps the migration (the manifest may say complete)
    COMMITTED = 18  # S->C  after COMMIT: the manifest says complete, on disk


_META_LIMIT = {t: MAX_SMALL_META for t in T}
_META_LIMIT[T.SETUP] = MAX_META
_META_LIMIT[T.SETUP_OK] = MAX_META
_META_LIMIT[T.END] = MAX_META
_META_LIMIT[T.RESULT] = MAX_META
_META_LIMIT[T.BATCH] = MAX_BATCH_META
_META_LIMIT[T.PREPARE] = MAX_BATCH_META


@dataclass(frozen=True)
class RegionSpec:
    """A source region: a name (unique in the session) and its byte range [start, end)."""

    name: str
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


# --- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    version: int
    nonce: bytes
    session: bytes
    channel: int
    auth: bool
    encrypt: bool = False     # the sender asks for encrypted frames (needs auth)


@dataclass(frozen=True)
class Challenge:
    nonce: bytes
    mac: bytes | None


@dataclass(frozen=True)
class Auth:
    mac: bytes | None


@dataclass(frozen=True)
class _Signal:
    """A message without fields: its type says it all."""


class Welcome(_Signal):
    """The channel is authenticated and accepted."""


@dataclass(frozen=True)
class Setup:
    page_size: int
    channels: int
    regions: tuple[RegionSpec, ...]
    compress: int = 0       # codec BATCH data may be compressed with (compress.py; 0: none)
    delta: bool = False     # BATCH data may be deltas (DELTA: see delta.py)


@dataclass(frozen=True)
class SetupOk:
    images: tuple[str, ...]


@dataclass(frozen=True)
class Batch:
    """Pages of one region in one round.  data_flat holds (first_page, count) pairs, flattened,
    whose pages follow in `data` in that order; zero_flat the same for pages that are all zeros
    (no data sent).  Flat, as on the wire: a batch can hold thousands of runs."""

    region: int
    round_no: int
    data_flat: tuple[int, ...]
    zero_flat: tuple[int, ...]
    digest: int
    data: Any = b""   # bytes-like, len == sum(data counts) * page_size (once decompressed)
    compression: int = 0       # codec of the data on the wire (0: raw; DELTA: deltas, which only
                               # the image they apply to can check)
    page_hashes: bytes = b""   # receiver side: XXH3-64 of each data page (from the hash check)

    @property
    def data_runs(self) -> tuple[tuple[int, int], ...]:
        return tuple(zip(self.data_flat[0::2], self.data_flat[1::2]))

    @property
    def zero_runs(self) -> tuple[tuple[int, int], ...]:
        return tuple(zip(self.zero_flat[0::2], self.zero_flat[1::2]))

    @property
    def pages_data(self) -> int:
        return sum(self.data_flat[1::2])

    @property
    def pages_zero(self) -> int:
        return sum(self.zero_flat[1::2])


@dataclass(frozen=True)
class Prepare:
    """Pages of region #region, as flat (first, count) runs, that the sender is about to send
    with data (round 0's plan): the receiver may allocate them in its image beside the stream."""

    region: int
    runs_flat: tuple[int, ...]


@dataclass(frozen=True)
class _RoundMark:
    round_no: int


@dataclass(frozen=True)
class RoundEnd(_RoundMark):
    """Every batch of round_no on this channel was sent.  final: the stop-and-copy's round
    (the source is paused: the receiver acknowledges it without waiting for its disk)."""

    final: bool = False
    warm: bool = False        # the sender cached this round's pages: deltas against them may
                              # follow (the receiver maps them in now: delta.py)


class RoundAck(_RoundMark):
    """... and written."""


class Close(_Signal):
    """This (secondary) channel is done."""


class Closed(_Signal):
    """... acknowledged, all its batches written."""


@dataclass(frozen=True)
class End:
    digests: tuple[str, ...]
    commit: bool = False      # the sender will send COMMIT after SYNCED (then, and only then,
                              # the receiver's manifest says complete)


@dataclass(frozen=True)
class Result:
    complete: bool
    verified: tuple[bool, ...]
    digests: tuple[str | None, ...]
    message: str


@dataclass(frozen=True)
class Error:
    message: str


class Synced(_Signal):
    """After a complete RESULT: the images are on disk."""


class Commit(_Signal):
    """After SYNCED: the sender keeps the migration."""


class Committed(_Signal):
    """After COMMIT: the manifest says complete, on disk."""


Message = (Hello | Challenge | Auth | Welcome | Setup | SetupOk | Batch | RoundEnd | RoundAck
           | Close | Closed | End | Result | Error | Prepare | Synced | Commit | Committed)

_TYPE_OF = {Hello: T.HELLO, Challenge: T.CHALLENGE, Auth: T.AUTH, Welcome: T.WELCOME,
            Setup: T.SETUP, SetupOk: T.SETUP_OK, Batch: T.BATCH, RoundEnd: T.ROUND_END,
            RoundAck: T.ROUND_ACK, Close: T.CLOSE, Closed: T.CLOSED, End: T.END,
            Result: T.RESULT, Error: T.ERROR, Prepare: T.PREPARE, Synced: T.SYNCED,
            Commit: T.COMMIT, Committed: T.COMMITTED}


# --- encoding ---------------------------------------------------------------------------------


def batch_digest(region: int, round_no: int, data_flat: list[int], zero_flat: list[int],
                 data: Sequence[Any], page_size: int = 4096, hashes: bytes | None = None) -> int:
    """xxh3_64 over the batch's addressing (region, round, runs) and the XXH3-64 of each of its
    data pages in order (`hashes`, if the caller has them already: the receiver keeps them for
    the region digest, so every page is hashed once on each side)."""
    if hashes is None:
        hashes = b"".join(page_hashes(piece, page_size) for piece in data)
    h = xxhash.xxh3_64(msgpack.packb([region, round_no, data_flat, zero_flat]))
    h.update(hashes)
    return h.intdigest()


def _meta(msg: Message) -> dict:
    if isinstance(msg, Hello):
        return {"v": msg.version, "nonce": msg.nonce, "session": msg.session,
                "channel": msg.channel, "auth": msg.auth, "enc": msg.encrypt}
    if isinstance(msg, Challenge):
        return {"nonce": msg.nonce, "mac": msg.mac}
    if isinstance(msg, Auth):
        return {"mac": msg.mac}
    if isinstance(msg, Setup):
        return {"page_size": msg.page_size, "channels": msg.channels,
                "regions": [[r.name, r.start, r.end] for r in msg.regions], "compress": msg.compress,
                "delta": msg.delta}
    if isinstance(msg, SetupOk):
        return {"images": list(msg.images)}
    if isinstance(msg, Batch):
        return {"r": msg.region, "n": msg.round_no, "d": list(msg.data_flat),
                "z": list(msg.zero_flat), "h": msg.digest, "c": msg.compression}
    if isinstance(msg, RoundEnd):
        return {"n": msg.round_no, "f": msg.final, "w": msg.warm}
    if isinstance(msg, _RoundMark):
        return {"n": msg.round_no}
    if isinstance(msg, Prepare):
        return {"r": msg.region, "p": list(msg.runs_flat)}
    if isinstance(msg, End):
        return {"digests": list(msg.digests), "commit": msg.commit}
    if isinstance(msg, Result):
        return {"complete": msg.complete, "verified": list(msg.verified),
                "digests": list(msg.digests), "message": msg.message}
    if isinstance(msg, Error):
        return {"message": msg.message[:MAX_MESSAGE]}
    return {}


def type_of(kind: type) -> T:
    """The frame type of a message class."""
    return _TYPE_OF[kind]


def encode(msg: Message) -> bytes:
    """Header + meta of one frame (for a Batch, the data follows separately: see encode_batch)."""
    meta = msgpack.packb(_meta(msg), use_bin_type=True)
    data_len = len(msg.data) if isinstance(msg, Batch) else 0
    return HEADER.pack(MAGIC, VERSION, _TYPE_OF[type(msg)], len(meta), data_len) + meta


def encode_batch(region: int, round_no: int, data_flat: list[int], zero_flat: list[int],
                 data_len: int, digest: int, compression: int = 0) -> bytes:
    """Header + meta of a BATCH frame from already-flat run lists; the data_len bytes follow
    (compressed with codec `compression` if not 0)."""
    meta = msgpack.packb({"r": region, "n": round_no, "d": data_flat, "z": zero_flat,
                          "h": digest, "c": compression}, use_bin_type=True)
    return HEADER.pack(MAGIC, VERSION, T.BATCH, len(meta), data_len) + meta


# --- decoding ---------------------------------------------------------------------------------


def parse_header(header: bytes) -> tuple[T, int, int]:
    """(type, meta_len, data_len) from the 12 header bytes, or ProtocolError."""
    if len(header) != HEADER_SIZE:
        raise ProtocolError(f"truncated frame header ({len(header)} of {HEADER_SIZE} bytes)")
    magic, version, ftype, meta_len, data_len = HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(f"not a migrator stream (bad magic {bytes(magic)!r})")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version} (this side speaks {VERSION})")
    try:
        t = T(ftype)
    except ValueError:
        raise ProtocolError(f"unknown message type {ftype}") from None
    if meta_len > _META_LIMIT[t]:
        raise ProtocolError(f"oversized {t.name} frame: {meta_len} bytes of meta "
                            f"(limit {_META_LIMIT[t]})")
    if t is T.BATCH:
        if data_len > MAX_DATA:
            raise ProtocolError(f"oversized BATCH frame: {data_len} bytes of data (limit {MAX_DATA})")
    elif data_len:
        raise ProtocolError(f"{t.name} frame carries {data_len} bytes of data (only BATCH may)")
    return t, meta_len, data_len


def _unpack(t: T, meta: bytes) -> dict:
    try:
        obj = msgpack.unpackb(meta, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises several types for bad input
        raise ProtocolError(f"undecodable {t.name} message: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{t.name} message is a {type(obj).__name__}, expected a map")
    return obj


class _Fields:
    """Typed access to a decoded map; every failure names the message and the field."""

    def __init__(self, t: T, m: dict, keys: set[str]):
        extra = set(m) - keys
        missing = keys - set(m)
        if extra:
            raise ProtocolError(f"{t.name} message has unexpected field(s) {sorted(map(str, extra))}")
        if missing:
            raise ProtocolError(f"{t.name} message lacks field(s) {sorted(missing)}")
        self.t, self.m = t, m

    def fail(self, key: str, why: str) -> ProtocolError:
        return ProtocolError(f"{self.t.name} message: field {key!r} {why}")

    def int(self, key: str, lo: int, hi: int) -> int:
        v = self.m[key]
        if type(v) is not int:
            raise self.fail(key, f"is {type(v).__name__}, expected an integer")
        if not lo <= v <= hi:
            raise self.fail(key, f"= {v} is out of range [{lo}, {hi}]")
        return v

    def bool(self, key: str) -> bool:
        v = self.m[key]
        if type(v) is not bool:
            raise self.fail(key, f"is {type(v).__name__}, expected a boolean")
        return v

    def bytes(self, key: str, size: int, optional: bool = False) -> bytes | None:
        v = self.m[key]
        if v is None and optional:
            return None
        if type(v) is not bytes or len(v) != size:
            raise self.fail(key, f"must be {size} bytes")
        return v

    def str(self, key: str, limit: int) -> str:
        v = self.m[key]
        if type(v) is not str or len(v) > limit:
            raise self.fail(key, f"must be a string of at most {limit} characters")
        return v

    def list(self, key: str, limit: int) -> list:
        v = self.m[key]
        if type(v) is not list:
            raise self.fail(key, f"is {type(v).__name__}, expected a list")
        if len(v) > limit:
            raise self.fail(key, f"has {len(v)} entries (limit {limit})")
        return v


def _runs(f: _Fields, key: str, limit_pages: int) -> tuple[tuple[int, ...], int]:
    """A flat (first, count) run list, checked: (the list as a tuple, pages it covers)."""
    flat = f.list(key, 2 * MAX_RUNS)
    if len(flat) % 2:
        raise f.fail(key, "has an odd length (expected first, count pairs)")
    counts = flat[1::2]
    # the common case checked with C-level loops; the slow loop below only names the bad run
    if all(type(x) is int for x in flat) and (not flat or (min(flat[0::2]) >= 0 and min(counts) >= 1)):
        total = sum(counts)
        if total > limit_pages:
            raise f.fail(key, f"covers more than {limit_pages} pages")
        return tuple(flat), total
    for i in range(0, len(flat), 2):
        first, count = flat[i], flat[i + 1]
        if type(first) is not int or type(count) is not int or first < 0 or count < 1:
            raise f.fail(key, f"has a bad run ({_show(first)}, {_show(count)})")
    raise AssertionError("unreachable")  # pragma: no cover


def _show(v: Any) -> str:
    """A peer's value, for an error message: never repr() of what a peer built (a list nested
    a thousand deep overflows the stack; a megabyte string floods the log)."""
    if type(v) is int:
        return str(v)           # (msgpack integers fit in 64 bits)
    if type(v) is str:
        return repr(v[:MAX_NAME]) + ("..." if len(v) > MAX_NAME else "")
    if type(v) in (bool, float) or v is None:
        return repr(v)
    return f"a {type(v).__name__}"


def _digest_hex(v: Any, what: str) -> str:
    if (type(v) is not str or len(v) != DIGEST_HEX
            or any(c not in "0123456789abcdef" for c in v)):
        raise ProtocolError(f"{what} is not a {DIGEST_HEX}-digit lower-case hex digest")
    return v


def check_region_name(name: Any) -> str:
    if type(name) is not str or not name or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
        raise ProtocolError(f"bad region name {_show(name)}: 1 to {MAX_NAME} bytes of text expected")
    if any(ord(c) < 32 or ord(c) == 127 for c in name) or not name.isprintable():
        raise ProtocolError(f"bad region name {_show(name)}: control characters")
    return name


def decode(t: T, meta: bytes, data_len: int = 0, page_size: int | None = None) -> Message:
    """Validate and decode a frame's meta.  A BATCH needs the session's page size (its data is
    attached by the caller once read: dataclasses.replace(batch, data=...))."""
    try:
        return _decode(t, meta, data_len, page_size)
    except RecursionError:      # (a value nested deeper than any check expects: never a crash)
        raise ProtocolError(f"{t.name} message: values nested too deep") from None


def _decode(t: T, meta: bytes, data_len: int, page_size: int | None) -> Message:
    m = _unpack(t, meta)
    if t is T.HELLO:
        f = _Fields(t, m, {"v", "nonce", "session", "channel", "auth", "enc"})
        return Hello(f.int("v", 0, 255), f.bytes("nonce", NONCE_SIZE),
                     f.bytes("session", SESSION_ID_SIZE), f.int("channel", 0, MAX_CHANNELS - 1),
                     f.bool("auth"), f.bool("enc"))
    if t is T.CHALLENGE:
        f = _Fields(t, m, {"nonce", "mac"})
        return Challenge(f.bytes("nonce", NONCE_SIZE), f.bytes("mac", MAC_SIZE, optional=True))
    if t is T.AUTH:
        f = _Fields(t, m, {"mac"})
        return Auth(f.bytes("mac", MAC_SIZE, optional=True))
    if t in (T.WELCOME, T.CLOSE, T.CLOSED):
        _Fields(t, m, set())
        return {T.WELCOME: Welcome, T.CLOSE: Close, T.CLOSED: Closed}[t]()
    if t is T.SETUP:
        return _setup(_Fields(t, m, {"page_size", "channels", "regions", "compress", "delta"}))
    if t is T.SETUP_OK:
        f = _Fields(t, m, {"images"})
        return SetupOk(tuple(_img(x) for x in f.list("images", MAX_REGIONS)))
    if t is T.BATCH:
        if page_size is None:
            raise ProtocolError("BATCH before SETUP")
        return _batch(_Fields(t, m, {"r", "n", "d", "z", "h", "c"}), data_len, page_size)
    if t is T.PREPARE:
        f = _Fields(t, m, {"r", "p"})
        region = f.int("r", 0, MAX_REGIONS - 1)
        flat, _ = _runs(f, "p", MAX_REGION_BYTES // MIN_PAGE_SIZE)
        if not flat:
            raise ProtocolError("PREPARE frame: no pages")
        return Prepare(region, flat)
    if t is T.ROUND_END:
        f = _Fields(t, m, {"n", "f", "w"})
        return RoundEnd(f.int("n", 0, MAX_ROUND), f.bool("f"), f.bool("w"))
    if t is T.ROUND_ACK:
        return RoundAck(_Fields(t, m, {"n"}).int("n", 0, MAX_ROUND))
    if t is T.END:
        f = _Fields(t, m, {"digests", "commit"})
        return End(tuple(_digest_hex(d, "END digest") for d in f.list("digests", MAX_REGIONS)),
                   f.bool("commit"))
    if t is T.RESULT:
        f = _Fields(t, m, {"complete", "verified", "digests", "message"})
        verified = f.list("verified", MAX_REGIONS)
        if any(type(v) is not bool for v in verified):
            raise f.fail("verified", "must hold booleans")
        digests = tuple(None if d is None else _digest_hex(d, "RESULT digest")
                        for d in f.list("digests", MAX_REGIONS))
        return Result(f.bool("complete"), tuple(verified), digests, f.str("message", MAX_MESSAGE))
    if t is T.ERROR:
        f = _Fields(t, m, {"message"})
        return Error(f.str("message", MAX_MESSAGE))
    if t in (T.SYNCED, T.COMMIT, T.COMMITTED):
        _Fields(t, m, set())
        return {T.SYNCED: Synced, T.COMMIT: Commit, T.COMMITTED: Committed}[t]()
    raise ProtocolError(f"unknown message type {int(t)}")  # pragma: no cover (enum is closed)


def _setup(f: _Fields) -> Setup:
    """SETUP's fields: page size, channels, the regions (names unique, ranges page-aligned)."""
    ps = f.int("page_size", MIN_PAGE_SIZE, MAX_PAGE_SIZE)
    if ps & (ps - 1):
        raise f.fail("page_size", f"= {ps} is not a power of two")
    channels = f.int("channels", 1, MAX_CHANNELS)
    regions = []
    names = set()
    total = 0
    for entry in f.list("regions", MAX_REGIONS):
        if type(entry) is not list or len(entry) != 3:
            raise f.fail("regions", "has an entry that is not [name, start, end]")
        name, start, end = entry
        check_region_name(name)
        if name in names:
            raise ProtocolError(f"SETUP message: region name {name!r} appears twice")
        names.add(name)
        if type(start) is not int or type(end) is not int or not 0 <= start < end < 1 << 64:
            raise ProtocolError(f"SETUP message: region {name!r} has a bad range {_show(start)}-{_show(end)}")
        if start % ps or end % ps:
            raise ProtocolError(f"SETUP message: region {name!r} is not aligned to {ps}-byte pages")
        if end - start > MAX_REGION_BYTES:
            raise ProtocolError(f"SETUP message: region {name!r} is larger than {MAX_REGION_BYTES} bytes")
        total += end - start
        regions.append(RegionSpec(name, start, end))
    if not regions:
        raise f.fail("regions", "is empty")
    if total > MAX_TOTAL_BYTES:
        raise ProtocolError(f"SETUP message: regions total {total} bytes (limit {MAX_TOTAL_BYTES})")
    return Setup(ps, channels, tuple(regions), f.int("compress", 0, MAX_CODEC), f.bool("delta"))


def _batch(f: _Fields, data_len: int, page_size: int) -> Batch:
    """BATCH's fields: runs within the limits, the data length they announce."""
    region = f.int("r", 0, MAX_REGIONS - 1)
    round_no = f.int("n", 0, MAX_ROUND)
    data_flat, data_pages = _runs(f, "d", MAX_DATA // page_size)
    zero_flat, _ = _runs(f, "z", MAX_ZERO_PAGES)
    digest = f.int("h", 0, (1 << 64) - 1)
    compression = f.int("c", 0, DELTA)
    want = data_pages * page_size
    if not compression and want != data_len:
        raise ProtocolError(f"BATCH frame: runs announce {want} bytes of data, frame carries {data_len}")
    if compression and not 0 < data_len < want:
        raise ProtocolError(f"BATCH frame: {data_len} bytes of {'delta' if compression == DELTA else 'compressed'} "
                            f"data for {want} bytes of pages (it must be smaller)")
    if not data_flat and not zero_flat:
        raise ProtocolError("BATCH frame: no pages")
    return Batch(region, round_no, data_flat, zero_flat, digest, compression=compression)


def _img(x: Any) -> str:
    if type(x) is not str or not 0 < len(x) <= MAX_NAME + 16:
        raise ProtocolError("SETUP_OK message: bad image name")
    return x


def check_batch(batch: Batch | Prepare, region_pages: Sequence[int]) -> None:
    """Every page of the batch (or PREPARE) lies in a declared region."""
    what = "BATCH" if isinstance(batch, Batch) else "PREPARE"
    if batch.region >= len(region_pages):
        raise ProtocolError(f"{what} for undeclared region #{batch.region} "
                            f"(session declared {len(region_pages)})")
    npages = region_pages[batch.region]
    flats = (batch.data_flat, batch.zero_flat) if isinstance(batch, Batch) else (batch.runs_flat,)
    for flat in flats:
        if flat and max(map(operator.add, flat[0::2], flat[1::2])) > npages:
            last = max(map(operator.add, flat[0::2], flat[1::2])) - 1
            raise ProtocolError(f"{what} page index {last} beyond region "
                                f"#{batch.region} ({npages} pages)")


def decode_frames(buf: bytes, page_size: int | None = MIN_PAGE_SIZE) -> list[Message]:
    """Decode a whole byte string of frames (tests and fuzzing); ProtocolError on any defect,
    including a truncated trailing frame."""
    out: list[Message] = []
    pos = 0
    mv = memoryview(buf)
    while pos < len(buf):
        t, meta_len, data_len = parse_header(bytes(mv[pos:pos + HEADER_SIZE]))
        pos += HEADER_SIZE
        end = pos + meta_len + data_len
        if end > len(buf):
            raise ProtocolError(f"truncated {t.name} frame")
        msg = decode(t, bytes(mv[pos:pos + meta_len]), data_len, page_size)
        if isinstance(msg, Batch):
            data = bytes(mv[pos + meta_len:end])
            if msg.compression != DELTA:        # (deltas: checked by the image they apply to)
                check_digest(msg, data)
            msg = dataclasses.replace(msg, data=data)
        out.append(msg)
        pos = end
    return out


def check_digest(batch: Batch, data: Any, page_size: int = 4096) -> bytes:
    """Check the batch hash; returns the page hashes computed for it."""
    hashes = page_hashes(data, page_size)
    got = batch_digest(batch.region, batch.round_no, batch.data_flat, batch.zero_flat, (),
                       page_size, hashes)
    if got != batch.digest:
        raise ProtocolError(f"BATCH hash mismatch (region #{batch.region}, round {batch.round_no}): "
                            f"data corrupted in transit")
    return hashes
