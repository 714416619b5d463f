"""Parsing /proc/PID/maps into typed regions and selecting them by name, range and kind."""

import os

import pytest

from child import Child
from migrator.errors import RegionError, TargetGoneError, UsageError
from migrator.kernel.maps import RegionKind, parse_maps_text, read_maps, select_regions

MAPS = """\
55d0c0000000-55d0c0002000 r--p 00000000 fd:00 1234 /usr/bin/qemu
55d0c0a00000-55d0c0b00000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0008000000 rw-s 00000000 00:01 4242 /memfd:guest-ram (deleted)
7f0008000000-7f0008100000 rw-p 00000000 00:00 0
7f0008100000-7f0008200000 r--p 00000000 00:00 0
7f0008200000-7f0008300000 rw-s 00000000 00:01 77 /dev/zero (deleted)
7f0008300000-7f0008400000 rw-s 00000000 00:1a 99 /dev/shm/vm0
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
7ffd00100000-7ffd00104000 r--p 00000000 00:00 0 [vvar]
7ffd00104000-7ffd00106000 r-xp 00000000 00:00 0 [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]
"""


def test_kinds_and_names():
    maps = parse_maps_text(MAPS)
    got = [(m.name, m.kind.value) for m in maps]
    assert got == [
        ("/usr/bin/qemu", "file"), ("[heap]", "anon"), ("guest-ram", "shared"),
        ("anon@7f0008000000", "anon"), ("anon@7f0008100000", "anon"), ("/dev/zero", "shared"),
        ("/dev/shm/vm0", "shared"), ("[stack]", "anon"), ("[vvar]", "special"),
        ("[vdso]", "special"), ("[vsyscall]", "special"),
    ]
    ram = maps[2]
    assert (ram.dev, ram.inode, ram.start, ram.end) == ((0, 1), 4242, 0x7F0000000000, 0x7F0008000000)


def test_select_by_name():
    (r,) = select_regions(parse_maps_text(MAPS), ["guest-ram"])
    assert (r.name, r.kind, r.start, r.end, r.object_key) == (
        "guest-ram", RegionKind.SHARED, 0x7F0000000000, 0x7F0008000000, (0, 1, 4242))
    (h,) = select_regions(parse_maps_text(MAPS), ["[heap]"])
    assert (h.name, h.start, h.end) == ("[heap]", 0x55D0C0A00000, 0x55D0C0B00000)


def test_select_by_range_merges_split_anon_and_clips():
    maps = parse_maps_text(MAPS)
    (r,) = select_regions(maps, ["7f0008000000-7f0008200000"])   # rw-p + r--p: one anon region
    assert (r.kind, r.start, r.end) == (RegionKind.ANON, 0x7F0008000000, 0x7F0008200000)
    (c,) = select_regions(maps, ["7f0004000000-7f0005000000"])   # inside guest-ram: clipped
    assert (c.name, c.start, c.end, c.offset) == ("guest-ram+4000000", 0x7F0004000000, 0x7F0005000000, 0x4000000)


def test_select_by_kind():
    names = [r.name for r in select_regions(parse_maps_text(MAPS), ["kind:shared"])]
    assert names == ["guest-ram", "/dev/zero", "/dev/shm/vm0"]


def test_selection_errors():
    maps = parse_maps_text(MAPS)
    with pytest.raises(RegionError, match="no mapping matches 'nope'"):
        select_regions(maps, ["nope"])
    with pytest.raises(UsageError, match="bad address range"):
        select_regions(maps, ["7f0008000123-7f0008000000"])
    with pytest.raises(ValueError, match="unparsable maps line"):
        parse_maps_text("garbage\n")


def test_real_process_regions_and_gone_process():
    c = Child("--shm-pages", "8", "--anon-pages", "8")
    try:
        (r,) = select_regions(read_maps(c.pid), ["test-shm"])
        a, b = c.span("shm")
        assert (r.kind, r.start, r.end, r.inode) == (RegionKind.SHARED, a, b,
                                                      os.fstat(os.open(f"/proc/{c.pid}/fd/{c.info['memfd']}", os.O_RDONLY)).st_ino)
    finally:
        c.kill()
    with pytest.raises(TargetGoneError, match=str(c.pid)):
        read_maps(c.pid)
