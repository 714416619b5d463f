"""The project's QEMU test guest: a 512-byte boot sector that, like QEMU's own migration test
guest, increments one byte in every 4 KiB page of a large range forever and writes a marker
character to the serial port (COM1, 0x3f8) after each pass.

The machine code is built here without an assembler; each instruction's bytes sit beside its
source line.  The same program in NASM syntax is guest_src/incr.asm; tests/test_qemu.py checks
that nasm (when installed) assembles it to exactly these bytes.

After a pause anywhere in a pass, every counted byte holds v+1 (pages the pass already visited)
or v (the rest), mod 256: `check_pattern` verifies exactly that shape.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ORG = 0x7C00
PAGE = 4096


@dataclass(frozen=True)
class GuestLayout:
    start: int = 1 << 20          # first page counted (1 MiB: above the BIOS area)
    end: int = 100 << 20          # end of the range (exclusive)
    marker: bytes = b"B"

    def __post_init__(self) -> None:
        if self.start % PAGE or self.end % PAGE or not (1 << 20) <= self.start < self.end <= (1 << 32) - PAGE:
            raise ValueError(f"bad test guest range {self.start:#x}-{self.end:#x}")
        if len(self.marker) != 1:
            raise ValueError("the marker is one byte")

    @property
    def pages(self) -> int:
        return (self.end - self.start) // PAGE


def boot_sector(layout: GuestLayout = GuestLayout()) -> bytes:
    """The 512-byte boot sector for `layout`."""
    u16 = lambda v: struct.pack("<H", v)   # noqa: E731
    u32 = lambda v: struct.pack("<I", v)   # noqa: E731
    GDT, GDTDESC, PM, INNER, OUTER = 0x48, 0x60, 0x1C, 0x2F, 0x2A    # offsets of the labels
    code = b"".join([
        # bits 16 (real mode, loaded at 0x7c00 by the BIOS)
        b"\xFA",                                        # cli
        b"\xE4\x92",                                    # in   al, 0x92      ; fast A20 gate
        b"\x0C\x02",                                    # or   al, 2
        b"\xE6\x92",                                    # out  0x92, al
        b"\x0F\x01\x16" + u16(ORG + GDTDESC),           # lgdt [gdtdesc]
        b"\x0F\x20\xC0",                                # mov  eax, cr0
        b"\x0C\x01",                                    # or   al, 1         ; PE
        b"\x0F\x22\xC0",                                # mov  cr0, eax
        b"\x66\xEA" + u32(ORG + PM) + u16(0x08),        # jmp  dword 0x08:pm ; flat 32-bit code
        # pm: (bits 32)
        b"\x66\xB8" + u16(0x10),                        # mov  ax, 0x10      ; flat data segment
        b"\x8E\xD8",                                    # mov  ds, ax
        b"\x8E\xC0",                                    # mov  es, ax
        b"\x8E\xD0",                                    # mov  ss, ax
        b"\x66\xBA" + u16(0x3F8),                       # mov  dx, 0x3f8     ; COM1
        # outer:
        b"\xB8" + u32(layout.start),                    # mov  eax, START
        # inner:
        b"\xFE\x00",                                    # inc  byte [eax]
        b"\x05" + u32(PAGE),                            # add  eax, 4096
        b"\x3D" + u32(layout.end),                      # cmp  eax, END
        b"\x72" + bytes([(INNER - 0x3D) & 0xFF]),       # jb   inner
        b"\xB0" + layout.marker,                        # mov  al, MARKER
        b"\xEE",                                        # out  dx, al
        b"\xEB" + bytes([(OUTER - 0x42) & 0xFF]),       # jmp  outer
    ])
    assert len(code) == 0x42, len(code)
    code += b"\x90" * (GDT - len(code))                 # align 8
    code += struct.pack("<QQQ", 0,                      # gdt: null descriptor
                        0x00CF9A000000FFFF,             #      0x08: code, base 0, 4 GiB, 32-bit
                        0x00CF92000000FFFF)             #      0x10: data, base 0, 4 GiB
    code += u16(3 * 8 - 1) + u32(ORG + GDT)             # gdtdesc: limit, base
    return code + b"\0" * (510 - len(code)) + b"\x55\xAA"


def write_boot_image(path: str, layout: GuestLayout = GuestLayout()) -> str:
    with open(path, "wb") as f:
        f.write(boot_sector(layout))
    return path


@dataclass(frozen=True)
class PatternCheck:
    ok: bool
    values: tuple[int, ...]      # distinct counter values seen (1 or 2)
    boundary_page: int | None    # first page still at the lower value (None: a whole pass)
    message: str


def check_pattern(ram: bytes | memoryview, layout: GuestLayout = GuestLayout()) -> PatternCheck:
    """Check guest RAM (bytes from guest physical address 0) for the test guest's shape: pages
    [start, boundary) hold v+1 and pages [boundary, end) hold v (mod 256)."""
    vals = bytes(memoryview(ram)[layout.start:layout.end:PAGE])
    if len(vals) != layout.pages:
        return PatternCheck(False, (), None, f"RAM too small: {len(ram)} bytes")
    distinct = tuple(sorted(set(vals)))
    first = vals[0]
    boundary = next((i for i, v in enumerate(vals) if v != first), None)
    if boundary is None:
        return PatternCheck(True, distinct, None, f"all {len(vals)} pages at {first}")
    low = vals[boundary]
    if (first - low) % 256 != 1:
        return PatternCheck(False, distinct, boundary,
                            f"page {boundary} holds {low}, its predecessors {first}: not one step")
    bad = next((i for i in range(boundary, len(vals)) if vals[i] != low), None)
    if bad is not None:
        return PatternCheck(False, distinct, boundary,
                            f"page {bad} holds {vals[bad]} after the boundary at page {boundary} "
                            f"(expected {low})")
    return PatternCheck(True, distinct, boundary,
                        f"pages 0..{boundary - 1} at {first}, {boundary}..{len(vals) - 1} at {low}")
