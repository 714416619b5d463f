"""The guest's control block and process-group control (pause, resume, stop).

The control block is a small shared memfd ("migrator-guest-ctl") holding one struct mg_ctl slot a
writer: pages written, the rate asked, a stop flag.  The guest creates it, side writers inherit
it, and a controller opens it through /proc/PID/fd/N, so stats can be read and rates set even
while the guest is paused.
"""

from __future__ import annotations

import mmap
import os
import signal
import time
from dataclasses import dataclass

from ..errors import MigratorError, TargetGoneError
from ._native import ffi

CTL_NAME = "migrator-guest-ctl"
SLOTS = ("vcpu", "vhost", "pwrite", "pager")      # slot index = position
CTL_BYTES = 4096
STOP_WAIT = 5.0        # seconds a pause waits for every process to reach the stopped state


class ControlBlock:
    """The mapped control block: one struct mg_ctl per entry of SLOTS."""

    def __init__(self, fd: int, *, owner: bool) -> None:
        self.fd = fd
        self._owner = owner
        self._map = mmap.mmap(fd, CTL_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._slots = ffi.cast("struct mg_ctl *", ffi.from_buffer(self._map))

    @classmethod
    def create(cls) -> "ControlBlock":
        """A new, zeroed control block (guest side); its fd is inheritable by side writers."""
        fd = os.memfd_create(CTL_NAME, 0)
        os.ftruncate(fd, CTL_BYTES)
        return cls(fd, owner=True)

    @classmethod
    def open(cls, pid: int, fd: int) -> "ControlBlock":
        """The control block of a running guest (controller side), via /proc/PID/fd/FD."""
        try:
            own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TargetGoneError(f"guest {pid} has no control block fd {fd} (exited?)") from None
        return cls(own, owner=False)

    def slot(self, name: str):
        """The struct mg_ctl * of a writer slot."""
        return self._slots + SLOTS.index(name)

    def stop_all(self) -> None:
        for i in range(len(SLOTS)):
            self._slots[i].stop = 1

    def close(self) -> None:
        self._slots = None
        try:
            self._map.close()
        except BufferError:       # a cffi view still alive somewhere: the map dies with us
            pass
        os.close(self.fd)


@dataclass(frozen=True)
class WriterStatistics:
    """One writer's counters (pages are 4 KiB pages; rate in bytes/s, < 0 = unlimited)."""

    kind: str
    pid: int
    pages: int          # pages written (the pager: pages advised out)
    rounds: int         # rate-control slices run (the pager: rounds)
    rate: float
    last_seq: int       # last stamp sequence number used
    not_present: int   # the pager: pages of its ranges not present in the guest page tables after its last round (pagemap bit 63)


def read_statistics(block: ControlBlock, page_size: int) -> dict[str, WriterStatistics]:
    """Counters of every slot that has a process (pid set)."""
    out = {}
    for name in SLOTS:
        s = block.slot(name)
        if s.pid:
            out[name] = WriterStatistics(kind=name, pid=int(s.pid), pages=int(s.pages),
                                         rounds=int(s.rounds), rate=float(s.rate) * page_size
                                         if s.rate >= 0 else -1.0, last_seq=int(s.seq),
                                         not_present=int(s.extra))
    return out


def _task_states(pid: int) -> list[str]:
    """State letter of every thread of pid ([] if it is gone)."""
    states = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return states
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except FileNotFoundError:
            continue
        states.append(stat[stat.rindex(")") + 2])
    return states


def pause_group(pgid: int, pids: list[int]) -> None:
    """SIGSTOP the process group and wait until every thread of every pid is stopped ('T').

    Raises:
        TargetGoneError: the group no longer exists.
        MigratorError: a process did not stop within STOP_WAIT seconds.
    """
    try:
        os.killpg(pgid, signal.SIGSTOP)
    except ProcessLookupError:
        raise TargetGoneError(f"guest process group {pgid} is gone") from None
    deadline = time.monotonic() + STOP_WAIT
    for pid in pids:
        while True:
            states = _task_states(pid)
            if not states:
                raise TargetGoneError(f"guest process {pid} is gone")
            if all(s == "T" for s in states):
                break
            if time.monotonic() > deadline:
                raise MigratorError(f"guest process {pid} did not stop (states {states})")
            time.sleep(0.0005)


def resume_group(pgid: int, block: ControlBlock | None = None) -> None:
    """SIGCONT the process group; with the control block, first tell every writer to restart
    its pacing from now (no catch-up burst for the time it was stopped)."""
    if block is not None:
        for name in SLOTS:
            block.slot(name).resumed += 1
    try:
        os.killpg(pgid, signal.SIGCONT)
    except ProcessLookupError:
        raise TargetGoneError(f"guest process group {pgid} is gone") from None
