"""Soft-dirty tracker.  This machine's kernel has no CONFIG_MEM_SOFT_DIRTY, so the decoding is
tested on synthetic pagemap words here (mocked: the bits cannot be produced on this kernel), and
the tracker must refuse with a message naming the config option.  tests/kernels/ runs the real
thing on soft-dirty kernels."""

import os

import pytest

from migrator.errors import UnsupportedError
from migrator.kernel.pagemap import PM_FILE, PM_PRESENT, PM_SOFT_DIRTY, PM_SWAP, decode_match_py
from migrator.kernel.probe import probe_soft_dirty
from migrator.tracking.softdirty import SoftDirtyTracker, decode_soft_dirty

PFN = 0x1234


def test_decode_private_pages():
    words = [PM_PRESENT | PFN, PM_PRESENT | PM_SOFT_DIRTY | PFN, 0, PM_SWAP | PM_SOFT_DIRTY | (5 << 5),
             PM_SWAP | (6 << 5), PM_PRESENT | PM_SOFT_DIRTY]
    assert decode_soft_dirty(words, len(words)).pages() == [1, 3, 5]


def test_decode_shows_the_kernel_thread_losses():
    """Shared memory, 4 pages written since clear_refs (all soft-dirty), then pages 0-1 swapped
    out: their PTEs are cleared (entry none, no swap entry, no soft-dirty bit), and page 2 was
    swapped back in (present again, bit gone).  Soft-dirty alone reports only page 3: the loss the
    shmem ledger exists for."""
    written_before = [PM_PRESENT | PM_FILE | PM_SOFT_DIRTY | PFN] * 4
    assert decode_soft_dirty(written_before, 4).pages() == [0, 1, 2, 3]
    after_swap = [0, 0, PM_PRESENT | PM_FILE | PFN, PM_PRESENT | PM_FILE | PM_SOFT_DIRTY | PFN]
    assert decode_soft_dirty(after_swap, 4).pages() == [3]


def test_c_decoder_agrees_with_python_on_raw_bytes():
    import random
    rng = random.Random(7)
    words = [rng.getrandbits(64) for _ in range(5000)]
    raw = b"".join(w.to_bytes(8, "little") for w in words)
    assert decode_soft_dirty(raw, len(words)).pages() == decode_match_py(words, PM_SOFT_DIRTY, PM_SOFT_DIRTY)


def test_refused_without_kernel_support():
    if probe_soft_dirty().supported:
        pytest.skip("this kernel has soft-dirty: the real tests run instead (tests/kernels)")
    with pytest.raises(UnsupportedError, match="CONFIG_MEM_SOFT_DIRTY"):
        SoftDirtyTracker(os.getpid(), [])
