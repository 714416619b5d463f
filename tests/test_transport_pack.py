"""The page stream's C fast path on real memory: how the sender packs batches (zero pages found in
place in a mapping of a real memfd, or after a pread), and how the receiver applies them to an
image file (page stamps: an older copy never overwrites a newer one)."""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import queue
import shutil
import tempfile
import time

import pytest
import xxhash

from conftest import require, swap_active
from migrator.transport._native import ffi, lib
from migrator.kernel.maps import read_maps, select_regions
from migrator.precopy.source import SourceMemory
from migrator.transport import wire
from migrator.transport.images import ImageSet
from migrator.transport.sender import _Packer
from migrator.transport.wire import Batch, RegionSpec

PS = 4096


def _content(npages: int) -> bytearray:
    """Page p: zeros if p % 5 in (1, 2), else data; page 7 has one non-zero byte, its last."""
    buf = bytearray(npages * PS)
    for p in range(npages):
        if p % 5 not in (1, 2):
            buf[p * PS:(p + 1) * PS] = (p.to_bytes(4, "little") + b"\xa5" * 60) * (PS // 64)
    buf[7 * PS:8 * PS] = bytes(PS - 1) + b"\x01"
    return buf


class _Memfd:
    def __init__(self, name: str, content: bytes, sealed: bool):
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, len(content))
        self.map = mmap.mmap(self.fd, len(content), mmap.MAP_SHARED)
        self.map[:] = content
        if sealed:
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.region = select_regions(read_maps(os.getpid()), [name])[0]
        self.source = SourceMemory(os.getpid(), [self.region])

    def close(self) -> None:
        self.source.close()
        self.map.close()
        os.close(self.fd)


def _pack(source, name: str, runs, batch_pages: int):
    pool: queue.Queue = queue.Queue()
    for _ in range(3):
        pool.put(mmap.mmap(-1, batch_pages * PS))
    out = []
    for b in _Packer(PS, batch_pages, pool, lambda: False).batches([(0, name, runs)], source, 4):
        m = wire.decode_frames(b.head + bytes(b.data), PS)[0]   # the frame as the receiver sees it
        out.append((m.data_runs, m.zero_runs, bytes(m.data)))
        pool.put(b.buf)
    return out


def _expected(content: bytes, runs, batch_pages: int, cut_by_window: bool):
    """Batches as the packer must build them: each page classified, data pages in order."""
    batches, data, zero, payload, n_data = [], [], [], b"", 0
    taken = 0

    def add(runs_, p):
        if runs_ and runs_[-1][0] + runs_[-1][1] == p:
            runs_[-1] = (runs_[-1][0], runs_[-1][1] + 1)
        else:
            runs_.append((p, 1))

    def flush():
        nonlocal data, zero, payload, n_data, taken
        if data or zero:
            batches.append((tuple(data), tuple(zero), payload))
        data, zero, payload, n_data, taken = [], [], b"", 0, 0

    for first, end in runs:
        for p in range(first, end):
            page = content[p * PS:(p + 1) * PS]
            if cut_by_window and taken == batch_pages:
                flush()
            if any(page):
                if not cut_by_window and n_data == batch_pages:
                    flush()
                add(data, p)
                payload += page
                n_data += 1
            else:
                add(zero, p)
            taken += 1
    flush()
    return batches


@pytest.mark.parametrize("sealed", [True, False], ids=["mapped", "pread"])
def test_packer_batches_exact(sealed):
    content = _content(100)
    m = _Memfd(f"pack-test-{sealed}", bytes(content), sealed)
    try:
        assert (m.source.mapped(m.region.name) is not None) == sealed
        runs = [(0, 30), (35, 36), (40, 100)]
        got = _pack(m.source, m.region.name, runs, batch_pages=8)
        # mapped: a batch ends when its 8 data pages are full; pread: every 8 pages read
        assert got == _expected(content, runs, 8, cut_by_window=not sealed)
        assert sum(len(b[2]) for b in got) == PS * sum(
            1 for a, e in runs for p in range(a, e) if any(content[p * PS:(p + 1) * PS]))
    finally:
        m.close()


def test_pack_pages_zero_cap_and_page_hashes():
    """The C packer stops at the zero-page cap and hashes each packed page with XXH3-64."""
    content = bytes(_content(40))
    st = ffi.new("struct mg_pack *")
    out = ffi.new("uint8_t[]", 40 * PS)
    hashes = ffi.new("uint64_t[]", 40)
    druns, zruns = ffi.new("uint64_t[]", 80), ffi.new("uint64_t[]", 80)
    st.out, st.hashes, st.data_runs, st.zero_runs = out, hashes, druns, zruns
    st.out_cap, st.run_cap, st.zero_cap = 40, 40, 5
    src = ffi.from_buffer(content)
    took = lib.mg_pack_pages(src, 100, 40, PS, st)
    # zero pages are 1, 2, 6, 11, 12, 16, ...; page 7 (one byte set, its last) is data; the
    # 6th zero page (16) does not fit
    assert took == 16
    assert st.zero_pages == 5
    assert ffi.unpack(zruns, 2 * st.n_zero_runs) == [101, 2, 106, 1, 111, 2]
    assert ffi.unpack(druns, 2 * st.n_data_runs) == [100, 1, 103, 3, 107, 4, 113, 3]
    data_pages = [0, 3, 4, 5, 7, 8, 9, 10, 13, 14, 15]
    assert st.out_pages == len(data_pages)
    assert bytes(ffi.buffer(out, len(data_pages) * PS)) == b"".join(content[p * PS:(p + 1) * PS] for p in data_pages)
    assert list(hashes[0:len(data_pages)]) == [xxhash.xxh3_64_intdigest(content[p * PS:(p + 1) * PS])
                                 for p in data_pages]


def test_source_maps_only_sealed_shared_memory():
    private = mmap.mmap(-1, 4 * PS)
    private[:] = b"x" * 4 * PS
    unsealed = _Memfd("pack-unsealed", bytes(4 * PS), sealed=False)
    sealed = _Memfd("pack-sealed", b"s" * 4 * PS, sealed=True)
    try:
        assert unsealed.source.mapped(unsealed.region.name) is None
        view = sealed.source.mapped(sealed.region.name)
        assert view is not None and bytes(view) == b"s" * 4 * PS
        maps = read_maps(os.getpid())
        addr = int(ffi.cast("uintptr_t", ffi.from_buffer(private)))
        anon = select_regions(maps, [f"{addr:x}-{addr + 4 * PS:x}"])[0]
        src = SourceMemory(os.getpid(), [anon])
        try:
            assert src.mapped(anon.name) is None
            assert bytes(src.read_runs(anon.name, [(1, 2)])) == b"x" * 2 * PS
        finally:
            src.close()
    finally:
        unsealed.close()
        sealed.close()
        private.close()


def _batch(round_no: int, data_runs, zero_runs, data: bytes = b"") -> Batch:
    flat = lambda runs: tuple(x for r in runs for x in r)  # noqa: E731
    hashes = b"".join(xxhash.xxh3_64_digest(data[i:i + PS])[::-1] for i in range(0, len(data), PS))
    return Batch(0, round_no, flat(data_runs), flat(zero_runs), 0, data, hashes)


def test_apply_batch_newer_round_wins(tmp_path):
    """Round stamps in C: a late copy from an older round never overwrites a newer one, a zero
    marker zeroes a page that held data, and the per-page hashes follow the file."""
    images = ImageSet(str(tmp_path), [RegionSpec("ram", 0, 8 * PS)], PS, "s")
    try:
        a, b, c = b"a" * PS, b"b" * PS, b"c" * PS
        images.apply(_batch(2, [(0, 3)], [], a * 3))           # round 2: pages 0-2 = a
        images.apply(_batch(1, [(1, 2)], [(0, 1)], b * 2))     # late round 1: all stale
        images.apply(_batch(2, [(5, 1)], [(1, 1)], c))         # round 2: page 1 zeroed, 5 = c
        images.apply(_batch(3, [], [(4, 3)]))                  # round 3: 4-6 zero (5 held data)
        with open(tmp_path / images.names[0], "rb") as f:
            assert f.read() == a + bytes(PS) + a + bytes(5 * PS)
        assert (images.pages_written, images.pages_zeroed, images.pages_stale) == (4, 4, 3)
        expect = [xxhash.xxh3_64_intdigest(p) for p in (a, bytes(PS), a)] + \
                 [xxhash.xxh3_64_intdigest(bytes(PS))] * 5
        assert list(images._images[0].hashes) == expect
    finally:
        images.close()


def test_apply_batch_rejects_run_outside_region(tmp_path):
    images = ImageSet(str(tmp_path), [RegionSpec("ram", 0, 4 * PS)], PS, "s")
    try:
        with pytest.raises(Exception, match="outside the region"):
            images.apply(_batch(0, [(3, 2)], [], b"z" * 2 * PS))
    finally:
        images.close()


def test_packer_skips_holes_without_allocating_them():
    """Pages never written (holes of the memfd) go out as zero runs without being read: reading
    them through the mapping would allocate them in the guest's memory object."""
    npages = 64
    fd = os.memfd_create("pack-holes", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, npages * PS)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        for p in (3, 10, 11, 12, 40):
            os.pwrite(fd, bytes([p]) * PS, p * PS)
        os.pwrite(fd, bytes(PS), 20 * PS)          # written zeros: data to SEEK_DATA, zero to us
        m = mmap.mmap(fd, npages * PS, mmap.MAP_SHARED, mmap.PROT_READ)
        try:
            region = select_regions(read_maps(os.getpid()), ["pack-holes"])[0]
            source = SourceMemory(os.getpid(), [region])
            try:
                blocks = os.fstat(fd).st_blocks
                got = _pack(source, region.name, [(0, npages)], batch_pages=16)
                assert got == [(((3, 1), (10, 3), (40, 1)), ((0, 3), (4, 6), (13, 27), (41, 23)),
                                b"".join(bytes([p]) * PS for p in (3, 10, 11, 12, 40)))]
                assert os.fstat(fd).st_blocks == blocks == 6 * PS // 512
            finally:
                source.close()
        finally:
            m.close()
    finally:
        os.close(fd)


def _resident(m: mmap.mmap, npages: int) -> list[int]:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    vec = ctypes.create_string_buffer(npages)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    assert libc.mincore(ctypes.c_void_p(addr), npages * PS, vec) == 0, os.strerror(ctypes.get_errno())
    return [p for p in range(npages) if vec.raw[p] & 1]


def test_packer_reads_swapped_out_pages_and_skips_punched_holes():
    """Pages of the object that are swapped out are data (not in the page cache, yet SEEK_DATA
    finds them): they are read back; pages punched out are holes: zeros, left unallocated."""
    require(swap_active(), "needs active swap (zram) for MADV_PAGEOUT of shmem pages")
    npages = 32
    fd = os.memfd_create("pack-swapped", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    m = None
    try:
        os.ftruncate(fd, npages * PS)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        content = b"".join(bytes([p + 1]) * PS for p in range(npages))
        os.pwrite(fd, content, 0)
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate
        fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        assert fallocate(fd, 3, 20 * PS, 4 * PS) == 0      # PUNCH_HOLE | KEEP_SIZE: pages 20-23
        m = mmap.mmap(fd, npages * PS, mmap.MAP_SHARED)
        m[:1] = m[:1]                                    # fault page 0 in, so the mapping exists
        # MADV_PAGEOUT walks page tables: pages 8-15 must be mapped here (the fault-around of
        # page 0's fault maps them only when it finds them ready, which it once did not)
        for p in range(8, 16):
            m[p * PS]
        # pages still in a per-CPU LRU batch are skipped by a pageout: a later one gets them
        for _ in range(50):
            m.madvise(getattr(mmap, "MADV_PAGEOUT", 21), 8 * PS, 8 * PS)
            if not set(range(8, 16)) & set(_resident(m, npages)):
                break
            time.sleep(0.02)
        require(not set(range(8, 16)) & set(_resident(m, npages)),
                "MADV_PAGEOUT did not swap out shmem pages 8-15 (swap full?)")
        region = select_regions(read_maps(os.getpid()), ["pack-swapped"])[0]
        source = SourceMemory(os.getpid(), [region])
        try:
            blocks = os.fstat(fd).st_blocks
            got = _pack(source, region.name, [(0, npages)], batch_pages=64)
            expect_data = content[:20 * PS] + content[24 * PS:]
            assert got == [(((0, 20), (24, 8)), ((20, 4),), expect_data)]
            assert os.fstat(fd).st_blocks == blocks == 28 * PS // 512
        finally:
            source.close()
    finally:
        if m is not None:
            m.close()
        os.close(fd)


def _pack_state(npages: int, known):
    st = ffi.new("struct mg_pack *")
    keep = (ffi.new("uint8_t[]", npages * PS), ffi.new("uint64_t[]", npages),
            ffi.new("uint64_t[]", 2 * npages), ffi.new("uint64_t[]", 2 * npages))
    st.out, st.hashes, st.data_runs, st.zero_runs = keep
    st.out_cap, st.run_cap, st.zero_cap = npages, npages, npages
    st.known, st.zero_hash = known, lib.mg_hash_zero_page(PS)
    return st, keep


def _bits(npages: int, pages) -> bytearray:
    b = bytearray((npages + 7) // 8)
    for p in pages:
        b[p >> 3] |= 1 << (p & 7)
    return b


def test_pack_pages_with_known_sends_only_what_differs():
    """Given the hashes of what the destination holds, only pages that hash differently are
    packed, as data or zeros, and their known entries become what was packed."""
    content = bytes(_content(20))
    h = [xxhash.xxh3_64_intdigest(content[p * PS:(p + 1) * PS]) for p in range(20)]
    zero = xxhash.xxh3_64_intdigest(bytes(PS))
    known = ffi.new("uint64_t[]", h)            # the destination holds everything ...
    known[0] = known[3] = 12345                 # ... but pages 0 and 3 (old data)
    known[1] = known[7] = known[8] = 777        # ... and 1 (now zeros), 7 and 8 (data now)
    st, keep = _pack_state(20, known)
    assert lib.mg_pack_pages(ffi.from_buffer(content), 0, 20, PS, st) == 20
    assert st.skipped == 15 and st.zero_pages == 1 and st.out_pages == 4
    assert ffi.unpack(st.zero_runs, 2 * st.n_zero_runs) == [1, 1]
    assert ffi.unpack(st.data_runs, 2 * st.n_data_runs) == [0, 1, 3, 1, 7, 2]
    sent = [0, 3, 7, 8]
    assert bytes(ffi.buffer(st.out, 4 * PS)) == b"".join(content[p * PS:(p + 1) * PS] for p in sent)
    assert list(st.hashes[0:4]) == [h[p] for p in sent]
    assert list(known) == h and h[1] == zero
    # holes (known zeros without reading): only those the destination holds with data
    known[12], known[13] = 5, zero
    st2, keep2 = _pack_state(20, known)
    assert lib.mg_pack_zeros(10, 5, st2) == 5
    assert ffi.unpack(st2.zero_runs, 2 * st2.n_zero_runs) == [10, 1, 12, 1, 14, 1]  # 10, 14: data in h
    assert st2.skipped == 2 and known[12] == known[10] == known[14] == zero
    # forced pages go out unchanged or not (pages a last collect reported, not yet sent)
    force = _bits(20, [5, 6, 11])
    st3, keep3 = _pack_state(20, known)
    st3.force = ffi.from_buffer(force)
    assert lib.mg_pack_pages(ffi.from_buffer(content), 0, 10, PS, st3) == 10
    assert lib.mg_pack_zeros(10, 4, st3) == 4
    assert ffi.unpack(st3.data_runs, 2 * st3.n_data_runs) == [5, 1]
    assert ffi.unpack(st3.zero_runs, 2 * st3.n_zero_runs) == [6, 1, 11, 1]
    assert st3.skipped == 11


@pytest.mark.parametrize("sealed", [True, False], ids=["mapped", "pread"])
def test_packer_with_known_hashes_of_a_memfd_with_holes(sealed):
    # (stable, i.e. hashed once, in the mapped case; hashed again after the copy in the other)
    stable = sealed
    """The final round's fused scan on a real memfd: the packer compares every page (holes
    without reading them, when mapped) with the destination's hashes and sends what differs."""
    content = bytearray(_content(64))
    m = _Memfd(f"pack-known-{sealed}", bytes(content), sealed)
    try:
        zero = xxhash.xxh3_64_intdigest(bytes(PS))
        dest = [xxhash.xxh3_64_intdigest(bytes(content[p * PS:(p + 1) * PS])) for p in range(64)]
        # the source changes after the destination got everything: page 4 rewritten, pages
        # 20..23 punched (a hole now; 21 and 22 were zeros already), page 30 zeroed in place
        m.map[4 * PS:5 * PS] = b"\x42" * PS
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate
        fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        assert fallocate(m.fd, 3, 20 * PS, 4 * PS) == 0      # PUNCH_HOLE | KEEP_SIZE
        m.map[30 * PS:31 * PS] = bytes(PS)
        known = bytearray(b"".join(x.to_bytes(8, "little") for x in dest))
        pool: queue.Queue = queue.Queue()
        for _ in range(3):
            pool.put(mmap.mmap(-1, 16 * PS))
        with ffi.from_buffer("uint64_t[]", known) as kc:
            packer = _Packer(PS, 16, pool, lambda: False, known={m.region.name: (kc, ffi.NULL, int(stable))})
            got = []
            for b in packer.batches([(0, m.region.name, [(0, 64)])], m.source, 1):
                # stable and mapped: the data pages go out from the mapping itself, not copied
                assert isinstance(b.data, tuple) == stable
                data = b"".join(bytes(d) for d in b.data) if stable else bytes(b.data)
                b.release()
                f = wire.decode_frames(b.head + data, PS)[0]
                got.append((f.data_runs, f.zero_runs, bytes(f.data)))
        if sealed:      # one batch: 16 data pages would fill it
            assert got == [(((4, 1),), ((20, 1), (23, 1), (30, 1)), b"\x42" * PS)]
        else:           # a batch per 16 pages read; none for 32..63, unchanged
            assert got == [(((4, 1),), (), b"\x42" * PS), ((), ((20, 1), (23, 1), (30, 1)), b"")]
        after = [int.from_bytes(known[8 * p:8 * p + 8], "little") for p in range(64)]
        assert after == [xxhash.xxh3_64_intdigest(bytes(m.map[p * PS:(p + 1) * PS])) for p in range(64)]
        assert after[20:24] == [zero] * 4
    finally:
        m.close()


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "pread"])
def test_stable_send_hashes_in_place_and_sends_from_the_mapping(mapped):
    """A send with the source paused (stable, no known hashes): every page hashed where it lies,
    zero pages told by that hash, and, mapped, the data pages sent from the mapping (no copy);
    the frames are exactly those of a plain send."""
    content = bytearray(_content(32))
    content[5 * PS:6 * PS] = bytes(PS)
    m = _Memfd(f"pack-stable-{mapped}", bytes(content), mapped)
    try:
        frames = {}
        for stable in (True, False):
            pool: queue.Queue = queue.Queue()
            for _ in range(3):
                pool.put(mmap.mmap(-1, 16 * PS))
            got = []
            packer = _Packer(PS, 16, pool, lambda: False, stable=stable)
            for b in packer.batches([(0, m.region.name, [(0, 32)])], m.source, 1):
                assert isinstance(b.data, tuple) == (stable and mapped)
                data = b"".join(bytes(d) for d in b.data) if isinstance(b.data, tuple) else bytes(b.data)
                b.release()
                f = wire.decode_frames(b.head + data, PS)[0]      # (its batch hash checked)
                got.append((f.data_runs, f.zero_runs, bytes(f.data)))
            frames[stable] = got
        assert frames[True] == frames[False]
        zeros = [p for p in range(32) if not any(content[p * PS:(p + 1) * PS])]
        assert 5 in zeros and len(zeros) < 32
        assert [p for _, zr, _ in frames[True] for first, n in zr for p in range(first, first + n)] == zeros
        assert b"".join(d for _, _, d in frames[True]) == b"".join(
            bytes(content[p * PS:(p + 1) * PS]) for p in range(32) if p not in zeros)
    finally:
        m.close()


def _largest_folio(path: str, npages: int, first: int = 0) -> int:
    """The largest folio (pages) among npages pages of the file from page `first` on, from the
    PFNs of a read-only mapping (/proc/self/pagemap) and /proc/kpageflags (root)."""
    from migrator.kernel.pagemap import Pagemap
    fd = os.open(path, os.O_RDONLY)
    m = mmap.mmap(fd, npages * PS, mmap.MAP_SHARED, mmap.PROT_READ, offset=first * PS)
    try:
        for i in range(npages):
            m[i * PS]                                  # (map each page)
        base = int(ffi.cast("uintptr_t", ffi.from_buffer(m)))
        with Pagemap(os.getpid()) as pm:
            pfns = [e & ((1 << 55) - 1) for e in pm.read(base, npages)]
        with open("/proc/kpageflags", "rb") as kf:
            flags = []
            for pfn in pfns:
                kf.seek(8 * pfn)
                flags.append(int.from_bytes(kf.read(8), "little"))
        largest = run = 0
        for f in flags:
            run = run + 1 if f >> 16 & 1 else 1       # KPF_COMPOUND_TAIL continues a folio
            largest = max(largest, run)
        return largest
    finally:
        m.close()
        os.close(fd)


def test_images_on_ext4_are_written_in_calls_of_64_kib(tmp_path):
    """ext4 makes a large folio of a large write, and every later 4 KiB rewrite of one of its
    pages walks it whole (33 us against 4-6 us here): an image on a disk file system is written
    in calls of at most 64 KiB, so its folios stay at 16 pages or fewer."""
    require(os.geteuid() == 0, "reading /proc/kpageflags needs root")
    from migrator.transport.images import TMPFS_MAGIC, WRITE_CHUNK, write_chunk_for
    d = tempfile.mkdtemp(dir="/var/tmp")
    try:
        images = ImageSet(d, [RegionSpec("ram", 0, 512 * PS)], PS, "s")
        try:
            img = images._images[0]
            t = ffi.new("uint64_t *")
            assert lib.mg_fs_type(img.fd, t) == 0 and t[0] == 0xEF53, "/var/tmp is not ext4 here"
            assert img.write_chunk == WRITE_CHUNK == 16 * PS
            images.apply(_batch(0, [(0, 256)], [], os.urandom(256 * PS)))
            os.fsync(img.fd)
            assert _largest_folio(os.path.join(d, images.names[0]), 256) <= 16
            # without the cap, the same write makes larger folios on this kernel
            data = os.urandom(256 * PS)
            os.pwrite(img.fd, data, 256 * PS)
            os.fsync(img.fd)
            assert _largest_folio(os.path.join(d, images.names[0]), 256, 256) > 16
        finally:
            images.close()
        fd = os.open("/dev/shm", os.O_RDONLY)
        try:
            assert write_chunk_for(fd) == 0 and TMPFS_MAGIC == 0x01021994
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(d, ignore_errors=True)
