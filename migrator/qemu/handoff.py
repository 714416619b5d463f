"""`migrator receive --qemu-incoming ...`: the receiver starts the destination QEMU as soon as a
session's RAM image exists (or, told the RAM size, before any migration comes: `prestart`), and
hands the VM over once the RAM verified and the device state came."""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import trio

from ..errors import MigratorError
from ..transport.images import ImageSet
from ..transport.receiver import SessionOutcome
from ..transport.wire import RegionSpec
from .destination import DestinationConfig, DestinationVM


class DestinationHandoff:
    """Receiver hooks (on_setup, on_session_end) plus the task (`run`) that acts on them.

    After run() returns, `ok` says whether a VM was resumed and `vm` is it (still running).
    ram_size (bytes): the guest's RAM, known before the migration: prestart() can then start the
    VM at once, and a session whose RAM differs is refused."""

    def __init__(self, cfg: DestinationConfig, log: Callable[[str], None], ram_size: int | None = None):
        self.cfg = cfg
        self.log = log
        self.ram_size = ram_size
        self.image = f"qemu-{cfg.memdev}.img"      # the RAM image, in cfg.workdir (the receiver's --out)
        self.vm: DestinationVM | None = None
        self.ok = False
        self.error: str | None = None
        self._send, self._recv = trio.open_memory_channel[tuple](16)
        self.marks: dict[str, float] = {}       # wall-clock stamps of the hooks

    def image_names(self, regions: list[RegionSpec]) -> list[str]:
        """Receiver hook: the RAM image's name, or refuse a session this VM cannot take."""
        if len(regions) != 1:
            raise MigratorError(f"a QEMU destination takes one RAM region, the source sent {len(regions)}")
        if self.ram_size is not None and regions[0].size != self.ram_size:
            raise MigratorError(f"the source's RAM is {regions[0].size >> 20} MiB, the destination QEMU was "
                                f"started for {self.ram_size >> 20} MiB (receive --qemu-ram-size)")
        return [self.image]

    async def prestart(self) -> None:
        """Start the destination VM now, on an empty image of ram_size bytes (the session's images
        replace its contents, in the same file: the VM maps it share=on and waits paused).

        Raises:
            MigratorError: QEMU did not start (its log is quoted).
        """
        assert self.ram_size is not None
        path = os.path.join(self.cfg.workdir, self.image)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, self.ram_size)
            finally:
                os.close(fd)
        except OSError as e:
            raise MigratorError(f"cannot create the RAM image {path!r}: {e.strerror}") from None
        await self._launch(path, self.ram_size, f"started for {self.ram_size >> 20} MiB of RAM, ")

    async def _launch(self, path: str, size: int, note: str = "") -> None:
        """Start the destination VM on the image at path (size bytes); it is self.vm once up.
        Raises MigratorError if QEMU did not start."""
        vm = DestinationVM(self.cfg, path, size)
        try:
            await trio.to_thread.run_sync(vm.start)
            self.vm = vm
            await trio.lowlevel.checkpoint()     # stopped meanwhile: do not leave it running
        except BaseException:
            vm.kill()
            raise
        self.log(f"qemu: destination VM pid {vm.proc.pid} {note}maps {path}, waits for device state on "
                 f"{self.cfg.incoming} (QMP {vm.qmp_path})")

    def on_setup(self, images: ImageSet) -> None:
        self.marks["dest-setup"] = time.time()
        self._send.send_nowait(("setup", images))

    def on_verified(self, images: ImageSet) -> None:
        """The RAM image verified: hand over now, not after the images' fsync."""
        self.marks["dest-verified"] = time.time()
        self._send.send_nowait(("verified", images))

    def on_session_end(self, outcome: SessionOutcome) -> None:
        self.marks["dest-session-end"] = time.time()
        self._send.send_nowait(("end", outcome))

    def close(self) -> None:
        self._send.close()

    async def run(self) -> None:
        """Act on the hooks until the session ended.  A destination VM not handed over (failure,
        cancellation, the receiver stopped) is killed."""
        try:
            async with self._recv:
                async for kind, obj in self._recv:
                    if kind == "setup":
                        await self._start(obj)
                    elif kind == "verified":
                        await self._hand_over()
                    elif kind == "end":
                        if not obj.complete and self.vm is not None and not self.ok:
                            self.error = f"RAM not verified ({obj.error}): destination VM stopped"
                            self.log(f"qemu: {self.error}")
                            self.vm.kill()
                        return
        finally:
            if not self.ok and self.vm is not None:
                self.vm.kill()

    async def _start(self, images: ImageSet) -> None:
        if self.vm is not None:       # pre-started on this image
            return
        try:
            await self._launch(os.path.join(images.out_dir, images.names[0]), images.regions[0].size)
        except MigratorError as e:
            self.error = str(e)
            self.log(f"qemu: {e}")

    async def _hand_over(self) -> None:
        vm = self.vm
        if vm is None:
            return
        try:
            resumed = await trio.to_thread.run_sync(vm.resume)
        except MigratorError as e:
            self.error = str(e)
            self.log(f"qemu: {e}; destination VM stopped, the source resumes")
            vm.kill()
            return
        self.ok = True
        self.log(f"qemu: destination VM running (pid {vm.proc.pid}, resumed at {resumed:.6f}, "
                 f"QMP {vm.qmp_path}); incoming states, ms before the resume: "
                 + ", ".join(f"{k} {v}" for k, v in vm.timeline.items()))
        self.log("qemu: timeline " + json.dumps({**self.marks, **vm.marks}))
        vm.detach()
