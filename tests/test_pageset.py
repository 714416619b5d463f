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


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000).flatmap(lambda n: st.tuples(
    st.just(n), st.sets(st.integers(0, n - 1)), st.sets(st.integers(0, n - 1)))))
def test_union_and_difference_match_python_sets(case):
    """The C loops (mg_bitmap_or / mg_bitmap_andnot, and the runs' skip of clear 64-bit words)
    against Python's sets, on sizes that end mid-byte and mid-word."""
    n, a, b = case
    x, y = PageSet.of(n, a), PageSet.of(n, b)
    assert (x - y).pages() == sorted(a - b)
    assert (x | y).pages() == sorted(a | b)
    x.update(y)
    assert x.pages() == sorted(a | b) and len(x) == len(a | b)
    assert y.pages() == sorted(b)          # (the other operand untouched)


def test_sparse_runs_of_a_large_region():
    n = (8 << 30) // 4096 + 13                 # an 8 GiB region and a bit, ending mid-byte
    members = [0, 63, 64, 65, 4095, 1 << 20, n - 1]
    s = PageSet.of(n, members)
    assert s.pages() == members and len(s) == len(members)
    assert list(s.runs()) == [(0, 1), (63, 66), (4095, 4096), (1 << 20, (1 << 20) + 1), (n - 1, n)]


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
