"""Waiting on a condition, not for a fixed time: the tests' one polling helper (sync and trio).

A test that must see something happen (a process stopped, a file written, a counter moving)
polls for it with a deadline; when the deadline passes, the test fails naming what it waited
for.  A fixed sleep stays only where the passing time is itself under test, with a comment."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import trio

T = TypeVar("T")


def _timed_out(what: str, timeout_s: float, last: object) -> AssertionError:
    return AssertionError(f"timed out after {timeout_s:g} s waiting for {what} (last seen: {last!r})")


def wait_until(cond: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.005) -> T:
    """cond()'s first truthy value, polled every interval_s seconds; AssertionError naming
    `what` if none comes within timeout_s seconds."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout_s, value)
        time.sleep(interval_s)


async def await_until(cond: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.005) -> T:
    """wait_until() for trio code: polls between trio.sleep()s, never blocking the event loop."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout_s, value)
        await trio.sleep(interval_s)
