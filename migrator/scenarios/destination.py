"""The destination side of a scenario run: the byte for byte check of a receiver's images
against the paused source (the receiver itself: migrator/receiver_process.py)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from ..errors import MigratorError

CHUNK = 8 << 20


@dataclass(frozen=True)
class DestinationCheck:
    identical: bool
    pages: int                  # pages compared
    detail: str                 # "" or what differs


def compare_with_source(pid: int, out_dir: str, page_size: int = 4096) -> DestinationCheck:
    """Every region image in out_dir (manifest.json) against /proc/PID/mem of the paused source,
    byte for byte, in chunks (a 4 GiB guest needs no 4 GiB buffer).  The manifest says complete
    once the receiver has the images on disk, after its verdict: waited for (up to 60 s)."""
    manifest = final_manifest(out_dir)
    if not manifest.get("complete"):
        return DestinationCheck(False, 0, "the receiver's manifest is not complete")
    pages = 0
    mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for r in manifest["regions"]:
            size = r["end"] - r["start"]
            bad: list[int] = []
            nbad = 0
            with open(os.path.join(out_dir, r["image"]), "rb") as img:
                done = 0
                while done < size:
                    n = min(CHUNK, size - done)
                    src = _pread_full(mem, n, r["start"] + done)
                    dst = img.read(n)
                    dst += bytes(n - len(dst))             # a short image reads as zeros
                    if src != dst:
                        for i in range(0, n, page_size):
                            if src[i:i + page_size] != dst[i:i + page_size]:
                                nbad += 1
                                if len(bad) < 5:
                                    bad.append((done + i) // page_size)
                    done += n
            pages += size // page_size
            if nbad:
                return DestinationCheck(False, pages, f"region {r['name']}: {nbad} pages differ "
                                                      f"from the source, first at page {bad}")
            if r.get("status") != "verified":
                return DestinationCheck(False, pages, f"region {r['name']}: status {r.get('status')}")
    finally:
        os.close(mem)
    return DestinationCheck(True, pages, "")


def final_manifest(out_dir: str, timeout_s: float = 60.0) -> dict:
    """The receiver's manifest.json once final: complete (written after its verdict went out,
    once the images are on disk) or failed (error set); as it is after timeout_s otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        with open(os.path.join(out_dir, "manifest.json")) as f:
            manifest = json.load(f)
        if manifest.get("complete") or manifest.get("error") or time.monotonic() > deadline:
            return manifest
        time.sleep(0.01)


def _pread_full(fd: int, n: int, offset: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = os.pread(fd, n - len(out), offset + len(out))
        if not chunk:
            raise MigratorError(f"short read of the source's memory at {offset + len(out):#x}")
        out += chunk
    return bytes(out)
