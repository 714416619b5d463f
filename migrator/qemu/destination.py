"""The destination side: a QEMU that maps the received RAM image and takes the device state.

Started as soon as the receiver has created the image (before the RAM arrives: the receiver's
writes land in the same page cache that QEMU maps with share=on), it waits with `-incoming
defer` + `migrate-incoming`.  It is started with `-S`: once migrator verified the RAM and the
source QEMU sent its device state, the VM stands paused whatever the source's run state was;
only `resume()` runs it (`cont`).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from dataclasses import dataclass, field

from ..errors import MigratorError, UsageError
from ..precopy.report import Timeline
from .qmp import QMP, QmpError
from .source import wait_migration


@dataclass(frozen=True)
class DestinationConfig:
    """How to start the destination QEMU.

    Args:
        incoming: HOST:PORT where it listens for the source's device state.
        args: every VM option except the RAM ones (machine type, devices, drives, serial...):
            the same as the source's, so the device state fits.
        memdev: id of the source's memory backend (the RAM block name must match).
        binary: the QEMU executable.
        workdir: where its QMP socket and log go.
    """

    incoming: str
    args: list[str] = field(default_factory=list)
    memdev: str = "ram"
    binary: str = "qemu-system-x86_64"
    workdir: str = "."

    @classmethod
    def from_cli(cls, incoming: str, args: str, memdev: str, binary: str, workdir: str) -> "DestinationConfig":
        host, sep, port = incoming.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise UsageError(f"bad --qemu-incoming {incoming!r}: expected HOST:PORT")
        return cls(incoming, shlex.split(args), memdev, binary, workdir)


class DestinationVM:
    """One destination QEMU for one RAM image."""

    def __init__(self, cfg: DestinationConfig, image: str, size: int):
        if size % (1 << 20):
            raise MigratorError(f"guest RAM of {size} bytes is not a whole number of MiB")
        self.cfg = cfg
        self.image = image
        self.size = size
        self.qmp_path = os.path.join(os.path.abspath(cfg.workdir), "qemu-dest.qmp")
        self.log_path = os.path.join(os.path.abspath(cfg.workdir), "qemu-dest.log")
        self.proc: subprocess.Popen | None = None
        self.qmp: QMP | None = None
        self.resumed_at: float | None = None       # wall clock of the RESUME event
        self.timeline: dict[str, float] = {}       # incoming migration states, ms before RESUME
        self.marks = Timeline()                    # wall-clock stamps of the steps

    def command(self) -> list[str]:
        c = self.cfg
        return [c.binary, *c.args,
                "-object", f"memory-backend-file,id={c.memdev},size={self.size},share=on,"
                           f"mem-path={os.path.abspath(self.image)}",
                "-machine", f"memory-backend={c.memdev}", "-m", f"{self.size >> 20}M",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off", "-S", "-incoming", "defer"]

    def start(self, wait_s: float = 20.0) -> None:
        """Start QEMU and listen for the device state.

        Raises:
            MigratorError: QEMU exited or refused the incoming migration (its log is quoted).
        """
        if os.path.exists(self.qmp_path):
            os.unlink(self.qmp_path)
        self.marks.mark("dest-spawn")
        log = os.fdopen(os.open(self.log_path, os.O_WRONLY | os.O_TRUNC | os.O_CREAT | os.O_NOFOLLOW
                                | os.O_CLOEXEC, 0o644), "w")     # (never through a planted link)
        try:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            raise MigratorError(f"cannot start {self.cfg.binary}: {e.strerror or e}") from None
        finally:
            log.close()
        deadline = time.monotonic() + wait_s
        while not os.path.exists(self.qmp_path):
            if self.proc.poll() is not None:
                raise MigratorError(f"destination QEMU exited ({self.proc.returncode}): {self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise MigratorError(f"destination QEMU gave no QMP socket within {wait_s} s")
            time.sleep(0.001)
        self.marks.mark("dest-qmp-socket")
        try:
            self.qmp = QMP(self.qmp_path, connect_wait_s=wait_s)
            self.marks.mark("dest-qmp-connected")
            self.qmp.execute("migrate-set-capabilities", capabilities=[
                {"capability": "x-ignore-shared", "state": True},
                {"capability": "events", "state": True},
                {"capability": "return-path", "state": True}])
            self.qmp.execute("migrate-incoming", uri=f"tcp:{self.cfg.incoming}")
            self.marks.mark("dest-listening")
        except QmpError as e:
            self.kill()
            raise MigratorError(f"destination QEMU: {e}; log: {self.log_tail()}") from None

    def resume(self, wait_s: float = 60.0) -> float:
        """Wait for the device state, then `cont`.  Returns the wall clock of the RESUME event.

        Raises:
            MigratorError: the incoming migration failed or did not come.
        """
        assert self.qmp is not None
        self.marks.mark("dest-resume-start")
        status = wait_migration(self.qmp, 0, wait_s)
        self.marks.mark("dest-incoming-done")
        if status != "completed":
            info = self.qmp.execute("query-migrate")
            raise MigratorError(f"destination QEMU: incoming migration {status}: "
                                f"{info.get('error-desc', '')} {self.log_tail()}")
        since = len(self.qmp.events)
        self.qmp.execute("cont")         # (-S: paused until now)
        self.marks.mark("dest-cont-sent")
        self.resumed_at = self.qmp.wait_event("RESUME", 5.0, since=since).timestamp
        stamps = {e.data.get("status"): e.timestamp for e in self.qmp.events if e.name == "MIGRATION"}
        for k, v in stamps.items():
            self.marks.mark(f"dest-qemu-{k}", v)
        self.marks.mark("dest-qemu-RESUME", self.resumed_at)
        self.timeline = {k: round((v - self.resumed_at) * 1000, 1) for k, v in stamps.items()}
        return self.resumed_at

    def log_tail(self) -> str:
        try:
            with open(self.log_path) as f:
                return " | ".join(f.read().strip().splitlines()[-3:])
        except OSError:
            return ""

    def detach(self) -> None:
        """Let the VM run on after this process exits."""
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None

    def kill(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
