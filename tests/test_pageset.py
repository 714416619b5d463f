"""PageSet: the compact page set trackers return."""

from hypothesis import given, settings
from hypothesis import strategies as st

from migrator.tracking.pageset import PageSet


def test_ranges_runs_and_ops():
    s = PageSet(100)
    s.add_range(3, 20)
    s.add(50)
    s.add_range(90, 100)
    assert list(s.runs()) == [(3, 20), (50, 51), (90, 100)]
    assert len(s) == 17 + 1 + 10
    t = PageSet.of(100, [2, 50, 60])
    assert (s | t).pages() == [2] + list(range(3, 20)) + [50, 60] + list(range(90, 100))
    assert (s - t).pages() == list(range(3, 20)) + list(range(90, 100))
    assert 50 in s and 51 not in s and 1000 not in s
    assert PageSet.full(9).pages() == list(range(9))
    assert not PageSet(5)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3000).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)))))
def test_runs_match_members(case):
    n, members = case
    s = PageSet.of(n, members)
    assert s.pages() == sorted(members)
    assert len(s) == len(members)
    for a, b in s.runs():
        assert a < b and a in s and (b == n or b not in s)


def test_c_page_hashes_equal_xxh3_64_of_each_page():
    """The C per-page hash (AVX2 build where the CPU has it) is exactly XXH3-64 of each page."""
    import os

    import xxhash

    from migrator.transport.pagehash import page_hashes, zero_page_hash
    data = os.urandom(4096 * 70) + bytes(4096)
    got = page_hashes(data)
    want = b"".join(xxhash.xxh3_64_intdigest(data[i:i + 4096]).to_bytes(8, "little")
                    for i in range(0, len(data), 4096))
    assert got == want
    assert zero_page_hash() == xxhash.xxh3_64_intdigest(bytes(4096))
