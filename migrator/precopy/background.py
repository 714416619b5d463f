"""Blocking set-up work beside the migration's I/O: a call in a thread of its own (Background), and
the migration's guardian started that way and armed before the first stop (Guard)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import trio

from ..guardian import Guardian
from .report import MigrationReport


class Background:
    """A blocking call running in a thread of its own from now on (set-up work beside I/O)."""

    def __init__(self, fn: Callable[[], object]):
        self.error: BaseException | None = None
        self._value: object = None
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(fn,), name="migrator-setup", daemon=True).start()

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            self._value = fn()
        except BaseException as e:
            self.error = e
        finally:
            self._done.set()

    def join(self) -> None:
        """Wait for the call to end (blocking: from a worker thread, or where waiting is the point)."""
        self._done.wait()

    async def result(self) -> object:
        """The call's value, or its exception raised here; the event loop waits in a worker thread."""
        if not self._done.is_set():
            await trio.to_thread.run_sync(self._done.wait)
        if self.error is not None:
            raise self.error
        return self._value


class Guard:
    """A migration's guardian (migrator/guardian.py), started beside round 0 in a thread of its
    own (a Python process's start, ~20-200 ms) and awaited only before the first stop."""

    def __init__(self, guardian: Guardian, rep: MigrationReport):
        self.guardian = guardian
        self._rep = rep
        self._starting = Background(guardian.start)

    async def armed(self) -> None:
        """Before anything stops the source: the guardian is up and armed."""
        if not self.guardian.armed:
            await self._starting.result()
            self.guardian.arm()
            if self.guardian.problem:
                self._rep.events.append(self.guardian.problem)

    def disarm(self) -> None:
        """From here a source resumed by the guardian could make two live copies."""
        self.guardian.disarm()

    def close(self) -> None:
        """Blocking (its start, its exit): call from a worker thread."""
        self._starting.join()
        self.guardian.close()
