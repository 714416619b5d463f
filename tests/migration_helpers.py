"""Shared pieces of the end-to-end migration tests: a receiver in its own process, a guest, and
the byte-for-byte check of the destination images against the paused source."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from migrator.guest.launcher import Guest


class ReceiverProcess:
    """`migrator receive` in its own process, listening on a free loopback port."""

    def __init__(self, out_dir: str, *extra: str):
        self.out_dir = out_dir
        self.log_path = os.path.join(os.path.dirname(out_dir.rstrip("/")), "receiver.log")
        self.log = open(self.log_path, "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "migrator", "receive", "--listen", "127.0.0.1:0",
                                      "--out", out_dir, *extra], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        self.port = 0
        while time.monotonic() < deadline:
            text = open(self.log_path).read()
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", text)
            if m:
                self.port = int(m.group(1))
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"receiver exited: {text}")
            time.sleep(0.02)
        if not self.port:
            raise RuntimeError("receiver did not start")

    def text(self) -> str:
        return open(self.log_path).read()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


def manifest(out_dir: str) -> dict:
    with open(os.path.join(out_dir, "manifest.json")) as f:
        return json.load(f)


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
