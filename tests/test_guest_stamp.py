"""The page stamp and the image checker, on images built in memory (no processes)."""

import pytest

from migrator.errors import UsageError
from migrator.guest import stamp_page, verify_image
from migrator.guest.stamp import REGION_ANON, REGION_SHARED, WRITER_PWRITE, WRITER_VCPU

PS = 4096


def image(n: int, seq: int = 1, region: int = REGION_SHARED, zero_from: int | None = None) -> bytearray:
    out = bytearray()
    for i in range(n):
        out += bytes(PS) if zero_from is not None and i >= zero_from else stamp_page(region, WRITER_VCPU, i, seq + i)
    return out


def test_clean_image_with_zero_tail():
    res = verify_image(bytes(image(8, zero_from=6)), "guest-ram")
    assert res.ok and res.pages == 8
    assert res.counts == {"ok": 6, "zero": 2}


@pytest.mark.parametrize("offset", [0, 5, 24, 31, 32, 1000, PS - 1])
def test_flipped_byte_is_corrupt(offset):
    img = image(4)
    img[2 * PS + offset] ^= 0x01
    res = verify_image(bytes(img), "guest-ram")
    assert [(f.page, f.status) for f in res.findings] == [(2, "corrupt")]
    assert res.counts == {"ok": 3, "corrupt": 1}


def test_stale_missing_differs_against_expected():
    expected = image(6, seq=100, zero_from=5)
    img = bytearray(expected)
    img[1 * PS:2 * PS] = stamp_page(REGION_SHARED, WRITER_VCPU, 1, 7)     # older write
    img[3 * PS:4 * PS] = bytes(PS)                                         # never sent
    img[5 * PS:6 * PS] = stamp_page(REGION_SHARED, WRITER_PWRITE, 5, 1)    # expected zero
    res = verify_image(bytes(img), "guest-ram", bytes(expected))
    got = [(f.page, f.status, f.writer, f.seq, f.expected_writer, f.expected_seq) for f in res.findings]
    assert got == [(1, "stale", "vcpu", 7, "vcpu", 101), (3, "missing", None, None, "vcpu", 103),
                   (5, "differs", "pwrite", 1, None, None)]
    assert res.counts == {"ok": 3, "stale": 1, "missing": 1, "differs": 1}


def test_misplaced_page_and_region():
    img = image(4)
    img[0:PS] = img[3 * PS:4 * PS]                                          # page 3's stamp at 0
    res = verify_image(bytes(img), "guest-ram")
    assert [(f.page, f.status) for f in res.findings] == [(0, "misplaced")]
    res = verify_image(bytes(image(2, region=REGION_ANON)), "guest-ram")
    assert res.counts == {"misplaced": 2}
    assert verify_image(bytes(image(2, region=REGION_ANON)), "anon").ok


def test_first_index_and_path(tmp_path):
    img = image(4)
    p = tmp_path / "img"
    p.write_bytes(img[2 * PS:])
    assert verify_image(p, "shared", first_index=2).counts == {"ok": 2}
    assert verify_image(p, "shared").counts == {"misplaced": 2}


def test_bad_inputs():
    with pytest.raises(UsageError, match="not a multiple"):
        verify_image(b"x" * 100, "guest-ram")
    with pytest.raises(UsageError, match="differ in size"):
        verify_image(bytes(image(2)), "guest-ram", bytes(image(3)))
    with pytest.raises(UsageError, match="cannot read"):
        verify_image("/nonexistent/image", "guest-ram")
