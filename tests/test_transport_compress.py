"""Batch compression (--compress): exact pages through every codec, never a compressed batch
larger than the raw one, auto only while the link is the bottleneck, and bad compressed data a
ProtocolError naming the batch (issue 16)."""

from __future__ import annotations

import random

import lz4.block
import pytest
import zstandard

from migrator.transport import RegionSpec, connect_sender, digest_bytes
from migrator.transport.compress import LZ4, ZSTD

from migration_helpers import manifest
from transport_helpers import KEY, PS, MemReader, batch_frame, raw_session, read_image, start_receiver

NPAGES = 512
REGIONS = [RegionSpec("ram", 0, NPAGES * PS)]
WORDS = (b"migrator kernel page shmem ledger memfd round pause guest vhost dirty track "
         b"convergence receiver sender batch image digest verify").split()


def text_memory(npages: int, seed: int) -> bytearray:
    """Pages as a database's or a text heap's: words (compressible ~4x), a few zero and random
    pages between them."""
    rng = random.Random(seed)
    buf = bytearray(npages * PS)
    for p in range(npages):
        kind = rng.random()
        if kind < 0.1:
            continue                                     # zero page
        if kind < 0.2:
            buf[p * PS:(p + 1) * PS] = rng.randbytes(PS)  # incompressible
            continue
        text = b" ".join(rng.choice(WORDS) for _ in range(PS // 4))
        buf[p * PS:(p + 1) * PS] = text[:PS]
    return buf


async def _migrate(port, mem, compress, key=KEY, encrypt=False, max_bandwidth=None, channels=1,
                   batch_pages=64):
    async with connect_sender("127.0.0.1", port, key=key, regions=REGIONS, compress=compress,
                              encrypt=encrypt, max_bandwidth=max_bandwidth, channels=channels,
                              batch_pages=batch_pages) as s:
        await s.send_pages({"ram": [(0, NPAGES)]}, MemReader(mem), 0)
        res = await s.finish({"ram": digest_bytes(mem["ram"])})
        return res, s.statistics()


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
@pytest.mark.parametrize("encrypt", [False, True], ids=["mac", "aead"])
async def test_compressed_migration_is_exact_and_smaller(nursery, tmp_path, codec, encrypt):
    out = tmp_path / "out"
    rx, port, logs = await start_receiver(nursery, out)
    mem = {"ram": text_memory(NPAGES, 1)}
    res, st = await _migrate(port, mem, codec, encrypt=encrypt)
    assert res.complete
    assert read_image(out, manifest(str(out)), "ram") == bytes(mem["ram"])
    assert st.compressed_batches == st.batches               # every batch is mostly text
    assert st.compressed_wire_bytes < st.compressed_raw_bytes * 0.6
    assert st.transferred_bytes < st.pages_normal * PS * 0.6
    assert any(f"{codec} allowed" in line for line in logs)


async def test_incompressible_pages_go_raw(nursery, tmp_path):
    """Random pages never shrink by 1/8: every batch goes raw (none is sent larger)."""
    out = tmp_path / "out"
    rx, port, logs = await start_receiver(nursery, out)
    mem = {"ram": bytearray(random.Random(2).randbytes(NPAGES * PS))}
    res, st = await _migrate(port, mem, "zstd")
    assert res.complete and st.compressed_batches == 0
    assert st.transferred_bytes >= NPAGES * PS
    assert read_image(out, manifest(str(out)), "ram") == bytes(mem["ram"])


async def test_auto_compresses_when_the_link_is_the_bottleneck(nursery, tmp_path):
    """A 20 MB/s cap: once the send queue is full (its first few batches go raw), the
    producers would wait, so auto compresses (and the migration moves fewer bytes); the image
    is exact."""
    out = tmp_path / "out"
    rx, port, logs = await start_receiver(nursery, out)
    mem = {"ram": text_memory(NPAGES, 3)}
    res, st = await _migrate(port, mem, "auto", max_bandwidth=20e6, batch_pages=8)
    assert res.complete
    assert st.compressed_batches > st.batches // 2
    assert st.transferred_bytes < st.pages_normal * PS * 0.8
    assert read_image(out, manifest(str(out)), "ram") == bytes(mem["ram"])


async def test_none_sends_raw(nursery, tmp_path):
    out = tmp_path / "out"
    rx, port, logs = await start_receiver(nursery, out)
    mem = {"ram": text_memory(NPAGES, 4)}
    res, st = await _migrate(port, mem, "none", max_bandwidth=50e6)
    assert res.complete and st.compressed_batches == 0
    assert not any("allowed" in line for line in logs)


def _bad_batches():
    page = b"p" * PS
    two = page * 2
    return {
        "garbage": (batch_frame(0, 0, [(0, 2)], [], two, compressed=b"not zstd at all", codec=ZSTD),
                    "BATCH of region #0, round 0, from page 0: bad zstd data"),
        "bomb": (batch_frame(0, 0, [(0, 1)], [], page,
                             compressed=zstandard.ZstdCompressor().compress(b"\0" * (8 << 20)), codec=ZSTD),
                 "BATCH of region #0, round 0, from page 0: zstd frame declares 8388608 bytes, its runs announce 4096"),
        "short": (batch_frame(0, 0, [(5, 2)], [], two, compressed=zstandard.ZstdCompressor().compress(page),
                              codec=ZSTD),
                  "from page 5: zstd frame declares 4096 bytes, its runs announce 8192"),
        "wrong-hash": (batch_frame(0, 0, [(0, 2)], [], two, compressed=zstandard.ZstdCompressor().compress(b"q" * 2 * PS),
                                   codec=ZSTD), "hash mismatch"),
    }


@pytest.mark.parametrize("case", ["garbage", "bomb", "short", "wrong-hash"])
async def test_bad_compressed_batch_fails_the_session(nursery, tmp_path, case):
    frame, match = _bad_batches()[case]
    out = tmp_path / "out"
    rx, port, logs = await start_receiver(nursery, out)
    fs = await raw_session(port, REGIONS, compress=ZSTD)
    await fs.send_raw(frame)
    (o,) = await rx.wait_sessions(1)
    assert not o.complete and match in o.error
    assert manifest(str(out))["complete"] is False
    await fs.aclose()
    mem = {"ram": text_memory(NPAGES, 5)}                     # and the receiver serves on
    res, _ = await _migrate(port, mem, "lz4")
    assert res.complete


async def test_lz4_bad_data(nursery, tmp_path):
    out = tmp_path / "out"
    rx, port, logs = await start_receiver(nursery, out)
    fs = await raw_session(port, REGIONS, compress=LZ4)
    bad = lz4.block.compress(b"z" * PS, store_size=False)     # one page's worth, two announced
    await fs.send_raw(batch_frame(0, 0, [(0, 2)], [], b"z" * 2 * PS, compressed=bad, codec=LZ4))
    (o,) = await rx.wait_sessions(1)
    assert not o.complete and "lz4 data decompresses to 4096 bytes, its runs announce 8192" in o.error
