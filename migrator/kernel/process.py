"""Process state from /proc/PID/stat: exists, stopped, waiting for a stop."""

from __future__ import annotations

import os
import time

from ..errors import MigratorError, TargetGoneError, UnsupportedError
from .resources import Closing, close_fd


def open_proc(pid: int, name: str, denied: type[MigratorError] = UnsupportedError,
              hint: str = "") -> int:
    """A read-only descriptor (O_CLOEXEC) of /proc/PID/NAME.  TargetGoneError if the process does
    not exist; denied("cannot open ...: permission denied" + hint) if we may not read it."""
    try:
        return os.open(f"/proc/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):     # (ESRCH: a zombie's pagemap)
        raise TargetGoneError(f"process {pid} does not exist (or exited)") from None
    except PermissionError:
        raise denied(f"cannot open /proc/{pid}/{name}: permission denied{hint}") from None


def process_state(pid: int) -> str:
    """The one-letter state (R, S, D, T, t, Z, ...).  Raises TargetGoneError if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        raise TargetGoneError(f"process {pid} exited") from None


def process_exists(pid: int) -> bool:
    """True while pid is a live (not zombie) process."""
    try:
        return process_state(pid) not in ("Z", "X")
    except TargetGoneError:
        return False


def is_stopped(pid: int) -> bool:
    return process_state(pid) in ("T", "t")


def wait_stopped(pid: int, timeout_s: float = 5.0) -> None:
    """Wait until pid is stopped (after SIGSTOP).  Raises TargetGoneError on exit or timeout."""
    deadline = time.monotonic() + timeout_s
    delay = 0.0001
    while True:
        st = process_state(pid)
        if st in ("T", "t"):
            return
        if st in ("Z", "X"):
            raise TargetGoneError(f"process {pid} exited")
        if time.monotonic() > deadline:
            raise TargetGoneError(f"process {pid} did not stop within {timeout_s} s (state {st})")
        time.sleep(delay)
        delay = min(delay * 2, 0.005)


def vsize(pid: int) -> int:
    """Size of the process's address space (bytes): changes on most mmap/munmap/mremap."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[20])
    except (FileNotFoundError, ProcessLookupError):
        raise TargetGoneError(f"process {pid} exited") from None


class StatReader(Closing):
    """/proc/PID/stat kept open and re-read with pread (a few microseconds a read)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.fd = open_proc(pid, "stat")

    def fields(self) -> list[bytes]:
        """Fields after the command name: [0] is the state, [20] the vsize."""
        try:
            data = os.pread(self.fd, 4096, 0)
        except ProcessLookupError:
            data = b""
        if not data:
            raise TargetGoneError(f"process {self.pid} exited")
        return data.rsplit(b")", 1)[1].split()

    def vsize(self) -> int:
        return int(self.fields()[20])

    def close(self) -> None:
        self.fd = close_fd(self.fd)
