"""Shared pieces of the end-to-end migration tests: a receiver in its own process, a guest, and
the byte-for-byte check of the destination images against the paused source."""

from __future__ import annotations

import os

from migrator.guest.launcher import Guest
from migrator.scenarios.destination import compare_with_source, final_manifest
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
    """The receiver's manifest once final: complete, or failed (error set)."""
    return final_manifest(out_dir, timeout_s)


def assert_images_equal_source(guest: Guest, out_dir: str) -> None:
    """Every region's image equals the paused source byte for byte, and is verified (the one
    comparison the scenarios and benchmarks use too: migrator/scenarios/destination.py)."""
    check = compare_with_source(guest.pid, out_dir)
    assert check.identical, check.detail
