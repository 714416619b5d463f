"""Waiting on a condition, not for a fixed time: the tests' one polling helper (sync and trio).

A test that must see something happen (a process stopped, a file written, a counter moving)
polls for it with a deadline; when the deadline passes, the test fails naming what it waited
for.  A fixed sleep stays only where the passing time is itself under test, with a comment."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from typing import TypeVar

import trio

T = TypeVar("T")


def _polls(cond: Callable[[], T], timeout_s: float, what: str) -> Generator[None, None, T]:
    """The one polling loop: yields between checks (the caller sleeps), returns cond()'s first
    truthy value; AssertionError naming `what` once timeout_s seconds have passed without one."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what} (last seen: {value!r})")
        yield


def wait_until(cond: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.005) -> T:
    """cond()'s first truthy value, polled every interval_s seconds; AssertionError naming
    `what` if none comes within timeout_s seconds."""
    polls = _polls(cond, timeout_s, what)
    try:
        while True:
            next(polls)
            time.sleep(interval_s)
    except StopIteration as done:
        return done.value


async def await_until(cond: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.005) -> T:
    """wait_until() for trio code: polls between trio.sleep()s, never blocking the event loop."""
    polls = _polls(cond, timeout_s, what)
    try:
        while True:
            next(polls)
            await trio.sleep(interval_s)
    except StopIteration as done:
        return done.value
