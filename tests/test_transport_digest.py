"""Region digests (transport/digest.py): the definition, written out here apart from the code, and
the incremental TableDigest both sides keep, which must equal a full computation after any
sequence of changes it was told about."""

import os
import random

import pytest
import xxhash

from migrator.precopy.sent import SentHashes
from migrator.transport.digest import LEAF_PAGES, TableDigest, digest_of_hashes, zero_page_hash


def _spec_digest(table: bytes) -> str:
    leaf = 8 * 256
    return xxhash.xxh3_128(b"".join(xxhash.xxh3_64_digest(table[i:i + leaf])
                                    for i in range(0, len(table), leaf))).hexdigest()


@pytest.mark.parametrize("npages", [0, 1, 255, 256, 257, 3 * 4096 + 17])
def test_digest_is_xxh3_128_over_leaf_hashes(npages):
    table = os.urandom(8 * npages)
    assert LEAF_PAGES == 256
    assert digest_of_hashes(table) == _spec_digest(table)
    assert TableDigest(bytearray(table), npages).digest() == _spec_digest(table)


def test_table_digest_follows_touched_changes_and_only_rehashes_those_leaves():
    rng = random.Random(7)
    npages = 5 * 4096 + 100
    table = bytearray(os.urandom(8 * npages))
    d = TableDigest(table, npages)
    assert d.digest() == _spec_digest(bytes(table))
    assert d.refresh() == 0                       # nothing changed since
    for _ in range(50):
        runs = []
        for _ in range(rng.randint(1, 4)):
            first = rng.randrange(npages)
            count = rng.randint(1, min(9000, npages - first))
            table[8 * first:8 * (first + count)] = os.urandom(8 * count)
            runs += [first, count]
        d.touch(runs)
        spans = {c for a, n in zip(runs[0::2], runs[1::2]) for c in range(a >> 8, ((a + n - 1) >> 8) + 1)}
        assert d.refresh() == len(spans)
        assert d.digest() == _spec_digest(bytes(table))


def test_table_digest_misses_an_untouched_change_by_design():
    # the table's owner must touch() what it changes: a change it does not report is not seen
    table = bytearray(8 * 8192)
    d = TableDigest(table, 8192)
    before = d.digest()
    table[8 * 5000] = 1
    assert d.digest() == before
    d.touch([5000, 1])
    assert d.digest() == _spec_digest(bytes(table)) != before
    table[0] = 1
    d.touch_all()
    assert d.digest() == _spec_digest(bytes(table))


def test_table_digest_refuses_runs_outside_the_table():
    d = TableDigest(bytearray(8 * 10), 10)
    with pytest.raises(ValueError):
        d.touch([8, 3])
    with pytest.raises(ValueError):
        d.touch([10, 1])
    with pytest.raises(ValueError):
        TableDigest(bytearray(8 * 9), 10)


def test_sent_hashes_digest_matches_the_table_after_each_record():
    zh = zero_page_hash(4096)
    n = 3 * 4096 + 5
    sent = SentHashes({"r": n})
    table = [zh] * n
    assert sent.digest("r") == digest_of_hashes(b"".join(h.to_bytes(8, "little") for h in table))
    rng = random.Random(3)
    for _ in range(20):
        first = rng.randrange(n - 10)
        hs = [rng.getrandbits(64) for _ in range(3)]
        sent.record("r", [first, 3], [first + 5, 2], b"".join(h.to_bytes(8, "little") for h in hs))
        table[first:first + 3] = hs
        table[first + 5:first + 7] = [zh, zh]
        if rng.random() < 0.5:
            sent.refresh()
        assert sent.digest("r") == digest_of_hashes(b"".join(h.to_bytes(8, "little") for h in table))
