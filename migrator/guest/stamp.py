"""The page stamp every guest write leaves, and the checker that reads images by it.

A stamped page (4 KiB) starts with a 32-byte header: magic "MGPG", region id (u16), writer id
(u16), page index inside the region (u64), the writer's sequence number (u64) and a checksum
(u64, XXH3) of the rest of the page and of the header fields before it.  The rest of the page is
a pattern derived from the header, so an older write of the same page differs in every word.
A page never written reads as zero.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from ..errors import UsageError
from ._native import PAGE_SIZE, check, ffi, lib

# region ids (the stamp's "region" field)
REGION_SHARED = 1
REGION_ANON = 2
REGION_KINDS = {"shared": REGION_SHARED, "anon": REGION_ANON}

# writer ids (the stamp's "writer" field)
WRITER_POPULATE = 0
WRITER_VCPU = 1
WRITER_VHOST = 2
WRITER_PWRITE = 3
WRITER_TEXT = lib.MG_WRITER_TEXT   # flag: the page's body is words of text (GuestSpec.content)
CONTENTS = ("stamp", "text")        # page bodies: incompressible pattern, or text


def writer_id(writer: int, content: str = "stamp") -> int:
    """The stamp's writer field for a writer whose pages have this content."""
    return writer | (WRITER_TEXT if content == "text" else 0)
WRITER_NAMES = {WRITER_POPULATE: "populate", WRITER_VCPU: "vcpu", WRITER_VHOST: "vhost",
                WRITER_PWRITE: "pwrite"}

STATUS_NAMES = {
    lib.MG_ST_OK: "ok", lib.MG_ST_ZERO: "zero", lib.MG_ST_CORRUPT: "corrupt",
    lib.MG_ST_MISPLACED: "misplaced", lib.MG_ST_STALE: "stale", lib.MG_ST_MISSING: "missing",
    lib.MG_ST_DIFFERS: "differs",
}
PROBLEMS = ("corrupt", "misplaced", "stale", "missing", "differs")

Image = Union[bytes, bytearray, memoryview, str, os.PathLike]


def stamp_page(region: int, writer: int, index: int, seq: int,
               page_size: int = PAGE_SIZE) -> bytes:
    # (writer may carry WRITER_TEXT: see writer_id)
    """One stamped page, as the C writers write it (for tests and tools)."""
    buf = ffi.new("uint8_t[]", page_size)
    lib.mg_stamp(buf, page_size, region, writer, index, seq)
    return bytes(ffi.buffer(buf))


def region_id(region: str) -> int:
    """Stamp region id of a region given by kind ("shared", "anon") or name: "anon" is the
    private block; any other name is the shared RAM block (its memfd name)."""
    if region in REGION_KINDS:
        return REGION_KINDS[region]
    if not region:
        raise UsageError("empty region name")
    return REGION_SHARED


@dataclass(frozen=True)
class Finding:
    """One page of an image that is not as it should be."""

    page: int                       # page index inside the region
    status: str                     # one of PROBLEMS
    writer: str | None = None       # the image page's stamp (None if it has no valid stamp)
    seq: int | None = None
    expected_writer: str | None = None   # the expected page's stamp, when one was given
    expected_seq: int | None = None


@dataclass(frozen=True)
class VerifyResult:
    """What the checker found in an image: counts by status and the problem pages."""

    region: str
    pages: int
    counts: dict[str, int] = field(default_factory=dict)   # status name -> pages
    findings: tuple[Finding, ...] = ()
    compared: bool = False          # an expected image was given

    @property
    def ok(self) -> bool:
        return not self.findings

    def summary(self) -> str:
        parts = ", ".join(f"{n} {self.counts[n]}" for n in STATUS_NAMES.values() if self.counts.get(n))
        verdict = "OK" if self.ok else f"{len(self.findings)} bad pages"
        against = "against the expected image" if self.compared else "stamps only"
        return f"{self.region}: {self.pages} pages ({against}): {verdict}: {parts or 'empty'}"


def _load(image: Image, what: str) -> bytes | bytearray | memoryview:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return image
    try:
        return Path(image).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read the {what} {str(image)!r}: {e.strerror}") from None


def verify_image(image: Image, region: str, expected: Image | None = None, *,
                 first_index: int = 0, page_size: int = PAGE_SIZE) -> VerifyResult:
    """Check every page of a region image by its stamp, and against the source's final memory.

    Args:
        image: the image bytes, or the path of a raw image file.
        region: region name or kind ("guest-ram", "shared", "anon"); see region_id().
        expected: the source's final memory of the same region (bytes or path), or None.
        first_index: region page index of the image's first page.
        page_size: bytes a page.
    Raises:
        UsageError: unreadable file, size not a whole number of pages, sizes differ.
    """
    img = _load(image, "image")
    if len(img) % page_size:
        raise UsageError(f"image size {len(img)} is not a multiple of the page size {page_size}")
    npages = len(img) // page_size
    exp = None
    if expected is not None:
        exp = _load(expected, "expected image")
        if len(exp) != len(img):
            raise UsageError(f"image ({len(img)} bytes) and expected ({len(exp)} bytes) differ in size")
    rid = region_id(region)
    status = ffi.new("uint8_t[]", max(npages, 1))
    writers = ffi.new("uint16_t[]", max(npages, 1))
    seqs = ffi.new("uint64_t[]", max(npages, 1))
    img_c = ffi.from_buffer("uint8_t[]", img)
    exp_c = ffi.from_buffer("uint8_t[]", exp) if exp is not None else ffi.NULL
    check(lib.mg_check_pages(img_c, npages, page_size, rid, first_index, exp_c, status,
                             writers, seqs), "mg_check_pages")
    st = bytes(ffi.buffer(status, npages))
    counts = {name: st.count(code) for code, name in STATUS_NAMES.items() if st.count(code)}
    problems = sum(counts.get(n, 0) for n in PROBLEMS)
    bad = [i for i, code in enumerate(st) if code >= lib.MG_ST_CORRUPT] if problems else []
    est = ew = es = None
    if bad and exp_c != ffi.NULL:
        est = ffi.new("uint8_t[]", npages)
        ew = ffi.new("uint16_t[]", npages)
        es = ffi.new("uint64_t[]", npages)
        lib.mg_check_pages(exp_c, npages, page_size, rid, first_index, ffi.NULL, est, ew, es)
    findings = []
    for i in bad:
        valid = st[i] != lib.MG_ST_CORRUPT and st[i] != lib.MG_ST_MISSING
        e_valid = est is not None and est[i] in (lib.MG_ST_OK, lib.MG_ST_MISPLACED)
        findings.append(Finding(
            page=first_index + i, status=STATUS_NAMES[st[i]],
            writer=_writer_name(writers[i]) if valid else None,
            seq=int(seqs[i]) if valid else None,
            expected_writer=_writer_name(ew[i]) if e_valid else None,
            expected_seq=int(es[i]) if e_valid else None,
        ))
    return VerifyResult(region=region, pages=npages, counts=counts, findings=tuple(findings),
                        compared=exp is not None)


def _writer_name(writer: int) -> str:
    return WRITER_NAMES.get(writer & ~WRITER_TEXT, f"writer{writer}")
