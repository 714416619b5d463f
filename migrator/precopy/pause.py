"""Stopping the source: pausing the guest and its writers for the switch-over, and throttling it
(auto-converge) with SIGSTOP/SIGCONT duty cycles."""

from __future__ import annotations

import os
import signal
import time

import trio

from ..errors import MigratorError, TargetGoneError
from ..guardian import ResumeSpec


def _tasks_stopped(pid: int) -> bool:
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        raise TargetGoneError(f"process {pid} exited") from None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                st = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if st not in ("T", "t", "Z", "X"):
            return False
    return True


class Pauser:
    """Pauses a set of processes (SIGSTOP, waiting until every thread is stopped) or a cgroup
    (v1 freezer), and resumes them."""

    def __init__(self, pids: list[int], cgroup: str | None = None):
        self.pids = list(dict.fromkeys(pids))
        self.cgroup = cgroup
        self.paused = False
        if cgroup is not None:
            self._freezer = cgroup if cgroup.startswith("/sys/") else os.path.join("/sys/fs/cgroup/freezer", cgroup.lstrip("/"))
            if not os.path.exists(os.path.join(self._freezer, "freezer.state")):
                raise MigratorError(f"cgroup {cgroup}: no freezer.state under {self._freezer}")

    def pause(self, timeout_s: float = 5.0) -> None:
        """Stop every process (or freeze the cgroup) and wait until each thread is stopped.

        Raises:
            TargetGoneError: a process exited; none is left stopped.
            MigratorError: one did not stop within timeout_s; none is left stopped.
        """
        if self.cgroup is not None:
            # the freezer stops every task of the cgroup (frozen tasks cannot take a SIGSTOP)
            self.paused = True
            self._write_freezer("FROZEN")
            deadline = time.monotonic() + timeout_s
            while self._read_freezer() != "FROZEN":
                if time.monotonic() > deadline:
                    raise MigratorError(f"cgroup {self.cgroup} did not freeze within {timeout_s} s")
                time.sleep(0.0005)
            return
        # all or none: if one process is gone (a side writer killed) or does not stop, those
        # already stopped are let go again before the error (the soak found the guest left
        # stopped after its writer died, with the report saying 'running')
        try:
            for pid in self.pids:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    raise TargetGoneError(f"process {pid} exited") from None
            deadline = time.monotonic() + timeout_s
            for pid in self.pids:
                while not _tasks_stopped(pid):
                    if time.monotonic() > deadline:
                        raise MigratorError(f"process {pid} did not stop within {timeout_s} s")
                    time.sleep(0.0002)
        except BaseException:
            self._continue()
            raise
        self.paused = True

    def resume(self) -> None:
        if self.cgroup is not None:
            self._write_freezer("THAWED")
            self.paused = False
            return
        self._continue()
        self.paused = False

    def resume_spec(self) -> ResumeSpec:
        return ResumeSpec(tuple(self.pids), self._freezer if self.cgroup is not None else None)

    def _continue(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def _write_freezer(self, state: str) -> None:
        with open(os.path.join(self._freezer, "freezer.state"), "w") as f:
            f.write(state)

    def _read_freezer(self) -> str:
        with open(os.path.join(self._freezer, "freezer.state")) as f:
            return f.read().strip()


class Throttle:
    """Auto-converge: stop the processes for `percent` % of every period (QEMU's CPU throttle
    vocabulary: start 20 %, +10 % a step, at most 99 %)."""

    INITIAL, STEP, MAX = 20, 10, 99

    def __init__(self, pids: list[int], period_s: float = 0.1):
        self.pids = list(pids)
        self.period_s = period_s
        self.percent = 0
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self._started = False

    def step_up(self) -> int:
        self.percent = self.INITIAL if self.percent == 0 else min(self.MAX, self.percent + self.STEP)
        return self.percent

    def _signal(self, sig: int) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    async def stop(self) -> None:
        """End the duty cycle and wait until the processes have been let go (SIGCONT), so that
        a pause that follows cannot be undone by a late SIGCONT."""
        self._scope.cancel()
        if self._started:
            await self._done.wait()

    async def run(self) -> None:
        """Duty-cycle until stop() or cancellation; always leaves the processes running."""
        self._started = True
        try:
            with self._scope:
                while True:
                    if self.percent <= 0:
                        await trio.sleep(self.period_s)
                        continue
                    self._signal(signal.SIGSTOP)
                    await trio.sleep(self.period_s * self.percent / 100)
                    self._signal(signal.SIGCONT)
                    await trio.sleep(self.period_s * (100 - self.percent) / 100)
        finally:
            self._signal(signal.SIGCONT)
            self._done.set()
