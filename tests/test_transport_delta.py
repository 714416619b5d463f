"""Delta batches (transport/delta.py, csrc/delta.c): the exact bytes of the encoding and of
its application, sessions whose later rounds go as deltas (exact images, exact counts), and the
receiver against malformed, misplaced and unannounced deltas."""

import mmap
import os

import pytest

from migrator.transport import RegionSpec, connect_sender, wire
from migrator.transport._native import ffi, lib
from migrator.transport.delta import DeltaCache, auto_cache_bytes

from transport_helpers import digests, KEY, PS, MemReader, batch_frame, random_memory, raw_session, read_image, start_receiver
from migration_helpers import manifest

NPAGES = 64
REGIONS = [RegionSpec("ram", 0x7f0000000000, 0x7f0000000000 + NPAGES * PS)]


def varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def record(skip: int, data: bytes = b"") -> bytes:
    return varint(skip) + varint(len(data)) + data


# -- the encoding ----------------------------------------------------------------------------

def _encode(cache: DeltaCache, pages: bytes, runs: list[int], round_no: int, base_round: int):
    src = ffi.from_buffer(pages)
    runs_c = ffi.new("uint64_t[]", runs)
    out = ffi.new("uint8_t[]", len(pages))
    n = cache.encode(0, src, True, runs_c, len(runs) // 2, len(pages) // PS, round_no, base_round, out, len(pages))
    return None if n is None else bytes(ffi.buffer(out, n))


def test_encoding_exact_bytes():
    cache = DeltaCache(REGIONS, PS, 16 * PS)
    old = bytearray(os.urandom(2 * PS))
    assert _encode(cache, bytes(old), [3, 2], 1, 0) is None         # not cached yet: cached now
    assert cache.totals.misses == 2
    new = bytearray(old)
    new[0] ^= 1                    # first byte of page 3: one word
    new[PS + 4095] ^= 0xFF         # last byte of page 4
    new[PS + 100] ^= 2             # and one in the middle (word 12)
    enc = _encode(cache, bytes(new), [3, 2], 2, 1)
    assert enc == (record(0, bytes(new[0:8])) + record(PS - 8)
                   + record(96, bytes(new[PS + 96:PS + 104])) + record(4088 - 104, bytes(new[PS + 4088:PS + 4096])))
    assert cache.totals.hits == 2 and cache.totals.batches == 1
    # an unchanged page (sent again, forced): one empty record; two changed words with one
    # equal word between them: one record
    new2 = bytearray(new)
    new2[PS + 8 * 20] ^= 1
    new2[PS + 8 * 22] ^= 1
    assert _encode(cache, bytes(new2), [3, 2], 3, 2) == record(PS) + record(160, bytes(new2[PS + 160:PS + 184])) + record(PS - 184)


def test_mixed_batch_sends_misses_whole():
    """Pages without a copy go whole inside a delta batch (one literal record each), as long as
    the batch is 1/8 smaller than its pages."""
    cache = DeltaCache(REGIONS, PS, 16 * PS)
    pages = bytearray(os.urandom(8 * PS))
    _encode(cache, bytes(pages[:7 * PS]), [0, 7], 1, 0)            # pages 0..6 cached
    fresh = os.urandom(PS)
    pages[7 * PS:] = fresh
    enc = _encode(cache, bytes(pages), [0, 8], 2, 1)
    assert enc == record(PS) * 7 + record(0, fresh)
    assert (cache.totals.hits, cache.totals.batches) == (7, 1)


def test_encoding_rules_rounds_and_size():
    cache = DeltaCache(REGIONS, PS, 16 * PS)
    page = os.urandom(PS)
    _encode(cache, page, [5, 1], 1, 0)
    # the copy is from round 1: not usable until the receiver acknowledged round 1
    assert _encode(cache, page, [5, 1], 2, 0) is None
    # ... nor within its own round (the same page twice in a round)
    assert _encode(cache, page, [5, 1], 2, 2) is None
    assert _encode(cache, page, [5, 1], 3, 2) == record(PS)
    # a page rewritten whole: its delta is no smaller: the batch goes raw (and is cached)
    other = os.urandom(PS)
    assert _encode(cache, other, [5, 1], 4, 3) is None
    assert _encode(cache, other, [5, 1], 5, 4) == record(PS)
    # page 21 shares page 5's slot (16 slots): page 5 was sent in the last round, so it keeps
    # the slot (page 21 goes whole, uncached) ...
    assert _encode(cache, page, [21, 1], 6, 5) is None
    assert _encode(cache, other, [5, 1], 7, 6) == record(PS)
    assert _encode(cache, page, [21, 1], 8, 7) is None
    # ... until page 5 was not sent for a round: then page 21 takes it
    assert _encode(cache, page, [21, 1], 10, 9) is None
    assert _encode(cache, other, [5, 1], 11, 10) is None
    assert _encode(cache, page, [21, 1], 12, 11) == record(PS)
    # forgotten pages (sent as zeros) have no copy
    _encode(cache, page, [9, 1], 8, 7)
    cache.forget(0, [9, 1])
    assert _encode(cache, page, [9, 1], 9, 8) is None
    cache.close()


def test_auto_cache_size():
    assert auto_cache_bytes(1 << 30) == 256 << 20
    assert auto_cache_bytes(128 << 20) == 128 << 20
    assert auto_cache_bytes(512 << 20) == 256 << 20
    assert auto_cache_bytes(40 << 20) == 40 << 20       # (never more than the regions)
    assert auto_cache_bytes(64 << 30) == 1 << 30


# -- applying, in C, to a real image file --------------------------------------------------

@pytest.fixture
def image(tmp_path):
    fd = os.open(tmp_path / "img", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 4 * PS)
    old = os.urandom(4 * PS)
    os.pwrite(fd, old, 0)
    m = mmap.mmap(fd, 4 * PS)
    stamps = ffi.new("uint32_t[]", [2 * 1 + 1] * 4)     # all hold data from round 0
    img_hashes = ffi.new("uint64_t[]", 4)
    yield fd, m, stamps, img_hashes, old
    m.close()
    os.close(fd)


def _apply(image, delta: bytes, runs: list[int], round_no: int = 1):
    fd, m, stamps, img_hashes, _ = image
    hashes = ffi.new("uint64_t[]", 4)
    bad = ffi.new("uint64_t *")
    with ffi.from_buffer(m) as p:
        r = lib.mg_apply_delta(fd, p, 4, stamps, img_hashes, delta, len(delta), ffi.new("uint64_t[]", runs),
                               len(runs) // 2, round_no, PS, hashes, bad)
    return r, bad[0], [hashes[i] for i in range(4)]


def test_apply_exact(image):
    fd, m, stamps, img_hashes, old = image
    delta = record(10, b"abc") + record(PS - 13) + record(0, b"z" * PS)
    r, _, hashes = _apply(image, delta, [1, 2])
    assert r == 0
    want = bytearray(old)
    want[PS + 10:PS + 13] = b"abc"
    want[2 * PS:3 * PS] = b"z" * PS
    assert os.pread(fd, 4 * PS, 0) == bytes(want)          # through the file, not the mapping
    from migrator.transport.pagehash import page_hashes
    assert hashes[:2] == list(memoryview(page_hashes(bytes(want[PS:3 * PS]), PS)).cast("Q"))
    assert [stamps[i] for i in range(4)] == [3, 5, 5, 3] and img_hashes[1] == hashes[0]


@pytest.mark.parametrize("delta, runs, err, bad", [
    (record(PS - 1, b"ab"), [1, 1], "EINVAL", 0),                  # past the page's end
    (record(10) + record(PS - 10), [1, 1], "EINVAL", 0),           # an empty record mid-page
    (record(PS) + b"x", [1, 1], "EINVAL", 1),                      # bytes left over
    (record(PS) + record(5, b"ab"), [1, 2], "EINVAL", 1),          # the second page truncated
    (record(0, b"a" * 3)[:-1], [1, 1], "EINVAL", 0),               # literal cut short
    (b"\xff" * 6, [1, 1], "EINVAL", 0),                            # a varint too long
    (record(PS), [3, 2], "EINVAL", 0),                             # a run past the image
    (record(PS), [0, 1], "ESTALE", 0),                             # page 0 holds this round's data
])
def test_apply_refuses_and_changes_nothing(image, delta, runs, err, bad):
    fd, m, stamps, img_hashes, old = image
    stamps[0] = 2 * 2 + 1        # page 0: written in round 1 already
    r, b, _ = _apply(image, delta, runs)
    assert r == -getattr(__import__("errno"), err) and b == bad
    assert os.pread(fd, 4 * PS, 0) == old
    assert [stamps[i] for i in range(4)] == [5, 3, 3, 3]


def test_apply_refuses_a_page_without_data(image):
    fd, m, stamps, img_hashes, old = image
    stamps[2] = 2 * 1      # held as zeros
    r, b, _ = _apply(image, record(PS) + record(PS), [1, 2])
    assert (r, b) == (-__import__("errno").ESTALE, 2)
    # ... unless it comes whole: then it is written (pwrite), the others patched
    r, b, hashes = _apply(image, record(PS) + record(0, b"w" * PS), [1, 2])
    assert r == 0
    assert os.pread(fd, 4 * PS, 0) == old[:2 * PS] + b"w" * PS + old[3 * PS:]
    assert [stamps[i] for i in range(4)] == [3, 5, 5, 3]


# -- sessions --------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 2])
async def test_session_rounds_go_as_deltas(nursery, tmp_path, channels):
    out = tmp_path / "out"
    rx, port, logs = await start_receiver(nursery, out)
    mem = {"ram": random_memory(NPAGES, 7, zero_fraction=0.0)}
    reader = MemReader(mem)
    hot = [(0, 40)]

    def touch(k: int) -> None:          # one byte of every hot page changes (QEMU's test guest)
        for p in range(40):
            mem["ram"][p * PS + (p * 8) % PS] = (mem["ram"][p * PS + (p * 8) % PS] + k) % 256

    async with connect_sender("127.0.0.1", port, key=KEY, regions=REGIONS, channels=channels,
                              batch_pages=8, delta_cache=auto_cache_bytes(NPAGES * PS)) as s:
        await s.send_pages({"ram": [(0, NPAGES)]}, reader, 0)
        await s.end_round(0)
        touch(1)
        await s.send_pages({"ram": hot}, reader, 1, cache=True)    # cached now, sent raw
        await s.end_round(1)
        assert s.statistics().delta_batches == 0
        wire1 = s.statistics().transferred_bytes
        touch(2)
        await s.send_pages({"ram": hot}, reader, 2, cache=True)    # deltas: 5 batches of 8 pages
        await s.end_round(2)
        st = s.statistics()
        assert (st.delta_batches, st.delta_raw_bytes) == (5, 40 * PS)
        assert st.delta_wire_bytes == sum(len(record(8 * p, b"w" * 8) + record(PS - 8 * p - 8)) for p in range(40))
        assert st.transferred_bytes - wire1 < 40 * 100
        # a hot page becomes zeros (forgotten), then data again: raw, then a delta
        touch(3)
        mem["ram"][3 * PS:4 * PS] = bytes(PS)
        await s.send_pages({"ram": hot}, reader, 3, cache=True)
        await s.end_round(3)
        mem["ram"][3 * PS:4 * PS] = os.urandom(PS)
        touch(4)
        await s.send_pages({"ram": hot}, reader, 4)     # (the last: nothing cached)
        res = await s.finish(digests(mem))
        st = s.statistics()
    assert res.complete and all(v.verified for v in res.regions.values())
    m = manifest(str(out))
    assert m["complete"] is True
    assert read_image(out, m, "ram") == bytes(mem["ram"])
    # round 3: the batch of page 3 (a zero run) and the others as deltas; round 4 too: page 3
    # has no copy (it went as zeros), so it goes whole inside its batch's deltas (the receiver,
    # which holds it as zeros, writes it)
    assert st.delta_batches == 5 + 5 + 5
    assert any("deltas allowed" in line for line in logs)


def _delta_frame(round_no: int, first: int, new_pages: bytes, delta: bytes) -> bytes:
    n = len(new_pages) // PS
    digest = wire.batch_digest(0, round_no, [first, n], [], [new_pages])
    return wire.encode_batch(0, round_no, [first, n], [], len(delta), digest, wire.DELTA) + delta


def _hostile_cases():
    old = random_memory(4, 11, zero_fraction=0.0)
    new = bytearray(old[PS:2 * PS])
    new[100:103] = b"xyz"
    good = record(100, b"xyz") + record(PS - 103)
    return old, {
        "wrong-base": (_delta_frame(1, 1, bytes(new), record(100, b"xyw") + record(PS - 103)),
                       "BATCH of region #0, round 1: its deltas, applied to the image, give other pages "
                       "than the sender's (batch hash mismatch)"),
        "malformed": (_delta_frame(1, 1, bytes(new), good[:-1]),
                      "BATCH of region #0, round 1: malformed deltas (at data page 0 of the batch)"),
        "no-copy": (_delta_frame(1, 9, bytes(new), good),
                    "BATCH of region #0, round 1: a delta for page 9, of which the image holds no copy "
                    "from an earlier round"),
        "same-round": (_delta_frame(0, 1, bytes(new), good),
                       "a delta for page 1, of which the image holds no copy from an earlier round"),
        "larger": (_delta_frame(1, 1, bytes(new), record(0, bytes(new))),
                   "bytes of delta data for 4096 bytes of pages (it must be smaller)"),
    }


@pytest.mark.parametrize("case", ["wrong-base", "malformed", "no-copy", "same-round", "larger", "unannounced"])
async def test_bad_delta_batch_fails_the_session(nursery, tmp_path, case):
    old, cases = _hostile_cases()
    frame, match = cases.get(case, cases["malformed"])
    if case == "unannounced":
        match = "BATCH of region #0, round 1: deltas, which the session did not announce"
    out = tmp_path / "out"
    rx, port, logs = await start_receiver(nursery, out)
    fs = await raw_session(port, REGIONS, delta=case != "unannounced")
    await fs.send_raw(batch_frame(0, 0, [(0, 4)], [], bytes(old)))
    await fs.send(wire.RoundEnd(0))
    await fs.expect(wire.RoundAck)
    await fs.send_raw(frame)
    # (nothing more: the receiver notices its writer's failure while waiting for the next frame)
    (o,) = await rx.wait_sessions(1)
    assert not o.complete and match in o.error
    m = manifest(str(out))
    assert m["complete"] is False
    if case not in ("wrong-base",):       # refused before any page changed
        assert read_image(out, m, "ram")[:4 * PS] == bytes(old)
    await fs.aclose()
    mem = {"ram": random_memory(NPAGES, 12)}                  # and the receiver serves on
    async with connect_sender("127.0.0.1", port, key=KEY, regions=REGIONS, delta_cache=1 << 20) as s:
        await s.send_pages({"ram": [(0, NPAGES)]}, MemReader(mem), 0)
        assert (await s.finish(digests(mem))).complete


def test_apply_survives_mutated_deltas(image):
    """1000 mutations of a valid batch's deltas (bytes flipped, cut, inserted, repeated): each is
    applied whole or refused with the image unchanged, never a crash or a write outside the
    pages of its runs."""
    import random
    fd, m, stamps, img_hashes, old = image
    rng = random.Random(5)
    good = record(100, b"xyz" * 3) + record(PS - 109) + record(8, b"q" * 16) + record(PS - 24)
    outcomes = {"applied": 0, "refused": 0}
    for k in range(1000):
        d = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(4)
            at = rng.randrange(len(d) + 1)
            if op == 0 and d:
                d[min(at, len(d) - 1)] ^= 1 << rng.randrange(8)
            elif op == 1:
                del d[at:at + rng.randint(1, 8)]
            elif op == 2:
                d[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            else:
                d[at:at] = d[at:at + rng.randint(1, 16)]
        before = os.pread(fd, 4 * PS, 0)
        saved = [stamps[i] for i in range(4)]
        r, _, _ = _apply(image, bytes(d), [1, 2])
        after = os.pread(fd, 4 * PS, 0)
        assert after[:PS] == before[:PS] and after[3 * PS:] == before[3 * PS:]     # outside the runs
        if r < 0:
            assert after == before and [stamps[i] for i in range(4)] == saved, (k, r)
        outcomes["refused" if r < 0 else "applied"] += 1
        for i in range(4):          # (stamps back for the next: data from round 0)
            stamps[i] = 3
    assert outcomes["applied"] > 50 and outcomes["refused"] > 500, outcomes
