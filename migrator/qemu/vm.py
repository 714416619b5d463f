"""Starting a source VM for tests, the benchmark and demos: QEMU (TCG) with its RAM in a shared
memfd backend, the project's test guest as boot disk, serial output to a file, QMP on a socket."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

from ..errors import MigratorError
from .qmp import QMP

BINARY = "qemu-system-x86_64"


def qemu_available(binary: str = BINARY) -> bool:
    return shutil.which(binary) is not None


def vm_args(boot_image: str, serial_path: str) -> list[str]:
    """Every VM option except RAM and QMP: what source and destination must share."""
    return ["-machine", "pc", "-accel", "tcg", "-nodefaults", "-vga", "none", "-display", "none",
            "-drive", f"file={os.path.abspath(boot_image)},format=raw,if=ide,cache=unsafe",
            "-serial", f"file:{os.path.abspath(serial_path)}"]


def source_ram_args(size: int, memdev: str = "ram") -> list[str]:
    return ["-object", f"memory-backend-memfd,id={memdev},size={size},share=on",
            "-machine", f"memory-backend={memdev}", "-m", f"{size >> 20}M"]


class SourceVM:
    """A running QEMU for `args` + RAM in a memfd; `qmp` is connected."""

    def __init__(self, workdir: str, boot_image: str, ram_size: int = 128 << 20, *,
                 binary: str = BINARY, name: str = "source"):
        self.workdir = os.path.abspath(workdir)
        self.serial_path = os.path.join(self.workdir, f"{name}.serial")
        self.qmp_path = os.path.join(self.workdir, f"{name}.qmp")
        self.log_path = os.path.join(self.workdir, f"{name}.log")
        self.boot_image = boot_image
        self.qmp: QMP | None = None           # (connected once QEMU listens)
        self.args = vm_args(boot_image, self.serial_path)
        cmd = [binary, *self.args, *source_ram_args(ram_size),
               "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.qmp_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise MigratorError(f"source QEMU did not start: {open(self.log_path).read()[-300:]}")
            time.sleep(0.005)
        self.qmp = QMP(self.qmp_path, connect_wait_s=10)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def serial_size(self) -> int:
        try:
            return os.path.getsize(self.serial_path)
        except OSError:
            return 0

    def wait_serial(self, at_least: int, wait_s: float = 20.0) -> None:
        """Wait until the serial log holds at_least bytes (the guest is running)."""
        deadline = time.monotonic() + wait_s
        while self.serial_size() < at_least:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise MigratorError(f"guest wrote {self.serial_size()} serial bytes, expected {at_least}")
            time.sleep(0.01)

    def kill(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
