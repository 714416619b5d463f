"""A trio instrument that finds the event loop blocked: a task step that took over a threshold
of wall time *and* slept in the kernel (a voluntary context switch of the trio thread, from
getrusage(RUSAGE_THREAD)) was waiting on something (a join, a sleep, a blocking syscall) while
every other task waited.  A step merely starved of CPU by a loaded machine switches
involuntarily only, and is not flagged."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import trio


@dataclass(frozen=True)
class Stall:
    task: str
    wall_ms: float
    cpu_ms: float
    voluntary_switches: int
    where: str        # the task's frame when its step ended (where it was resumed from next)


class StallWatch(trio.abc.Instrument):
    def __init__(self, threshold_s: float = 0.05):
        self.threshold_s = threshold_s
        self.stalls: list[Stall] = []
        self.steps = 0
        self._t0 = 0.0
        self._ru = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._t0 = time.perf_counter()
        self._ru = resource.getrusage(resource.RUSAGE_THREAD)

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._ru is None:          # (added from inside a step)
            return
        self.steps += 1
        wall = time.perf_counter() - self._t0
        if wall <= self.threshold_s:
            return
        ru = resource.getrusage(resource.RUSAGE_THREAD)
        vol = ru.ru_nvcsw - self._ru.ru_nvcsw
        cpu = (ru.ru_utime + ru.ru_stime) - (self._ru.ru_utime + self._ru.ru_stime)
        if vol == 0:
            return
        frames = []
        coro = task.coro
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is None:
                break
            frames.append(f"{frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno} {frame.f_code.co_name}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        self.stalls.append(Stall(task.name, wall * 1000, cpu * 1000, vol, " <- ".join(reversed(frames[-4:]))))
