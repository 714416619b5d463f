"""Shared pieces of the end-to-end migration tests: a receiver in its own process, a guest, and
the byte-for-byte check of the destination images against the paused source."""

from __future__ import annotations

import json
import os
import time

from migrator.guest.launcher import Guest
from migrator.receiver_process import ReceiverProcess as _ReceiverProcess


class ReceiverProcess(_ReceiverProcess):
    """`migrator receive` in its own process (the scenario runner's), with extra arguments."""

    def __init__(self, out_dir: str, *extra: str):
        super().__init__(out_dir, os.path.join(os.path.dirname(out_dir.rstrip("/")), "receiver.log"),
                         extra=extra)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def manifest(out_dir: str, timeout_s: float = 30.0) -> dict:
    """The receiver's manifest once final: complete, or failed (error set).  A complete one is
    written after the verdict went out, once the images are on disk."""
    deadline = time.monotonic() + timeout_s
    while True:
        with open(os.path.join(out_dir, "manifest.json")) as f:
            m = json.load(f)
        if m["complete"] or m.get("error") or time.monotonic() > deadline:
            return m
        time.sleep(0.01)


def source_bytes(guest: Guest, start: int, end: int) -> bytes:
    """The paused source's memory [start, end) as its process sees it."""
    fd = os.open(f"/proc/{guest.pid}/mem", os.O_RDONLY)
    try:
        out = bytearray()
        while len(out) < end - start:
            chunk = os.pread(fd, min(end - start - len(out), 8 << 20), start + len(out))
            assert chunk, "short read of source memory"
            out += chunk
        return bytes(out)
    finally:
        os.close(fd)


def assert_images_equal_source(guest: Guest, out_dir: str) -> dict:
    """Every region's image equals the paused source byte for byte; returns the manifest."""
    m = manifest(out_dir)
    assert m["complete"] is True
    for r in m["regions"]:
        with open(os.path.join(out_dir, r["image"]), "rb") as f:
            img = f.read()
        img += bytes(r["size"] - len(img))
        src = source_bytes(guest, r["start"], r["end"])
        if img != src:
            bad = [i for i in range(0, r["size"], 4096) if img[i:i + 4096] != src[i:i + 4096]]
            raise AssertionError(f"region {r['name']}: {len(bad)} pages differ, first {bad[:5]}")
        assert r["status"] == "verified"
    return m
