"""The controller's side of a guest: start one (start_guest) or attach to one from its JSON line
(Guest.from_info), then pause, resume, read stats, set rates, read its memory, stop it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass

from ..errors import MigratorError, TargetGoneError, UsageError
from ._native import check, ffi, lib
from .control import SLOTS, ControlBlock, WriterStatistics, pause_group, read_statistics, resume_group
from .spec import GuestSpec

START_WAIT = 60.0        # seconds to map, populate and print the JSON line
STOP_WAIT = 10.0         # seconds a guest gets to exit before SIGKILL
HASH_BUF = 4 << 20       # bytes read at a time when hashing a region


@dataclass(frozen=True)
class Region:
    """A guest memory block: addresses in the guest, sizes in bytes, areas in page indices."""

    name: str
    kind: str                       # "shared" (memfd) or "anon" (private anonymous)
    start: int
    end: int
    size: int
    populated: int                  # bytes stamped at start (the rest is the never-touched tail)
    fd: int | None                  # the guest's fd number of the memfd (shared only)
    areas: dict[str, tuple[int, int]]


@dataclass(frozen=True)
class GuestStatistics:
    """Counters of every writer of the guest (see WriterStatistics)."""

    writers: dict[str, WriterStatistics]
    paused: bool

    @property
    def pages_written(self) -> int:
        return sum(w.pages for k, w in self.writers.items() if k != "pager")


class Guest:
    """A running guest.  Use as a context manager: leaving it stops the guest."""

    def __init__(self, info: dict, proc: subprocess.Popen | None = None, log=None) -> None:
        self.info = info
        self._log = log                 # the guest's stderr (a temporary file), when we started it
        self.pid: int = info["pid"]
        self.pgid: int = info.get("pgid", info["pid"])
        self.page_size: int = info["page_size"]
        self.uffd_fd: int | None = info.get("uffd_fd")
        self.regions: dict[str, Region] = {
            r["name"]: Region(name=r["name"], kind=r["kind"], start=r["start"], end=r["end"],
                              size=r["size"], populated=r.get("populated", r["size"]),
                              fd=r.get("fd"), areas={k: tuple(v) for k, v in r.get("areas", {}).items()})
            for r in info["regions"]}
        self.writer_pids: dict[str, int] = {w["kind"]: w["pid"] for w in info["writers"]}
        self.paused = False
        self._proc = proc
        self._ctl = ControlBlock.open(self.pid, info["ctl_fd"]) if info.get("ctl_fd") is not None else None

    @classmethod
    def from_info(cls, info: dict | str) -> "Guest":
        """Attach to a guest started elsewhere, from its JSON start line."""
        return cls(json.loads(info) if isinstance(info, str) else info)

    @property
    def pids(self) -> list[int]:
        """The guest and its side writers."""
        return [self.pid, *self.writer_pids.values()]

    def selectors(self) -> list[str]:
        """Region selectors of all its memory, for migrate(regions=...): the shared block by
        name, the anonymous one by its address range."""
        return [r.name if r.kind == "shared" else f"{r.start:x}-{r.end:x}" for r in self.regions.values()]

    # --- control ---------------------------------------------------------------------------
    def pause(self) -> None:
        """Stop the guest and every side writer; returns once all are in state T."""
        pause_group(self.pgid, self.pids)
        self.paused = True

    def resume(self) -> None:
        resume_group(self.pgid, self._ctl)
        self.paused = False

    def stats(self) -> GuestStatistics:
        """Per-writer counters, read from the shared control block (works while paused)."""
        if self._ctl is None:
            raise MigratorError("no control block: the guest's JSON line has no ctl_fd")
        return GuestStatistics(writers=read_statistics(self._ctl, self.page_size), paused=self.paused)

    def set_rate(self, rate: float, writer: str = "vcpu") -> None:
        """Set a writer's rate in bytes/s (< 0: as fast as possible) while it runs."""
        if writer not in SLOTS or writer == "pager":
            raise UsageError(f"no rate for writer {writer!r}: expected vcpu, vhost or pwrite")
        if self._ctl is None:
            raise MigratorError("no control block: the guest's JSON line has no ctl_fd")
        self._ctl.slot(writer).rate = rate / self.page_size if rate >= 0 else -1.0

    def stop(self) -> int | None:
        """Stop the guest and its writers (also when paused).  Returns its exit status if it
        is our child, else None."""
        if self._ctl is not None:
            self._ctl.stop_all()
        try:
            os.killpg(self.pgid, signal.SIGCONT)
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self.paused = False
        status = None
        if self._proc is not None:
            try:
                status = self._proc.wait(STOP_WAIT)
            except subprocess.TimeoutExpired:
                os.killpg(self.pgid, signal.SIGKILL)
                status = self._proc.wait()
        else:
            deadline = time.monotonic() + STOP_WAIT
            while _alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.01)
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        return status

    def log(self) -> str:
        """What the guest and its writers printed on stderr so far ('' if not started by us)."""
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def __enter__(self) -> "Guest":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- memory, from outside --------------------------------------------------------------
    def _open_region(self, name: str) -> tuple[int, int, Region]:
        """(fd, byte offset of the region in it, region): the memfd or /proc/PID/mem."""
        r = self.region(name)
        try:
            if r.kind == "shared" and r.fd is not None:
                return os.open(f"/proc/{self.pid}/fd/{r.fd}", os.O_RDONLY | os.O_CLOEXEC), 0, r
            return os.open(f"/proc/{self.pid}/mem", os.O_RDONLY | os.O_CLOEXEC), r.start, r
        except FileNotFoundError:
            raise TargetGoneError(f"guest {self.pid} is gone") from None

    def region(self, name: str) -> Region:
        for r in self.regions.values():
            if name in (r.name, r.kind):
                return r
        raise UsageError(f"the guest has no region {name!r} (it has {', '.join(self.regions)})")

    def read_region(self, name: str) -> bytes:
        """The region's whole memory as the guest sees it now (pause first for a stable view)."""
        fd, off, r = self._open_region(name)
        try:
            buf = bytearray(r.size)
            view = memoryview(buf)
            done = 0
            while done < r.size:
                n = os.preadv(fd, [view[done:done + (64 << 20)]], off + done)
                if n <= 0:
                    raise MigratorError(f"short read of region {name!r} at byte {done}")
                done += n
            return bytes(buf)
        finally:
            os.close(fd)

    def save_region(self, name: str, path: str | os.PathLike) -> int:
        """Write the region's memory to a raw file (for `migrator verify --expected`).
        Returns bytes written."""
        data = self.read_region(name)
        with open(path, "wb") as f:
            f.write(data)
        return len(data)

    def page_hashes(self, name: str) -> array:
        """XXH3-64 of every page of the region, read from outside (array of unsigned 64-bit)."""
        fd, off, r = self._open_region(name)
        try:
            n = r.size // self.page_size
            hashes = array("Q", bytes(8 * n))
            buf = ffi.new("uint8_t[]", HASH_BUF)
            check(lib.mg_hash_fd_pages(fd, off, n, self.page_size, buf, HASH_BUF,
                                       ffi.from_buffer("uint64_t[]", hashes)), "hash region", pid=self.pid)
            return hashes
        finally:
            os.close(fd)


def _alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def changed_pages(before: array, after: array) -> bytes:
    """One byte a page: 1 where the two hash arrays differ."""
    if len(before) != len(after):
        raise UsageError("hash arrays of different regions")
    out = ffi.new("uint8_t[]", max(len(before), 1))
    lib.mg_count_different(ffi.from_buffer("uint64_t[]", before), ffi.from_buffer("uint64_t[]", after),
                           len(before), out)
    return bytes(ffi.buffer(out, len(before)))


def start_guest(spec: GuestSpec) -> Guest:
    """Start a guest process (its own process group) and return once it runs.

    Raises:
        MigratorError: it failed to start (its error message is in the exception).
    """
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "migrator.guest.process", spec.to_json()],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                            process_group=0)
    line = _read_line(proc, START_WAIT)
    if not line:
        try:
            proc.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err.seek(0)
        msg = err.read().decode(errors="replace").strip().splitlines()
        raise MigratorError(f"the guest failed to start: {msg[-1] if msg else f'status {proc.returncode}'}")
    return Guest(json.loads(line), proc, err)


def _read_line(proc: subprocess.Popen, wait: float) -> str:
    """The first stdout line of proc ('' if it exits or wait seconds pass without one)."""
    import selectors
    fd = proc.stdout.fileno()
    data = b""
    deadline = time.monotonic() + wait
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return ""
            chunk = os.read(fd, 65536)
            if not chunk:
                return ""
            data += chunk
    return data.split(b"\n", 1)[0].decode()
