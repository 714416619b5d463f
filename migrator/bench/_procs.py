"""Processes the benchmarks start and watch: stopping one, reading its state."""

from __future__ import annotations

import os
import subprocess

from ..errors import TargetGoneError
from ..kernel.process import process_state


def state_letter(pid: int) -> str:
    """pid's state letter (R, S, D, T = stopped, t = traced, Z ...); "" once it is gone."""
    try:
        return process_state(pid)
    except TargetGoneError:
        return ""


def thread_counts(pid: int) -> tuple[int, int]:
    """(threads, idle trio workers) of pid.  Trio's idle cached worker threads (OS name "Trio
    thread N"; a busy one carries its job's name) exit by themselves after 10 s, so leak checks
    leave them out.  FileNotFoundError if pid is gone."""
    tids = os.listdir(f"/proc/{pid}/task")
    idle = 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                idle += f.read().startswith("Trio thread")
        except OSError:
            pass                 # (the thread just ended)
    return len(tids), idle


def stop_process(p: subprocess.Popen, sig: int, wait_s: float) -> None:
    """Send sig to p (a child) unless it has ended; SIGKILL it if it is still there wait_s
    seconds later; returns once it is reaped."""
    if p.poll() is None:
        p.send_signal(sig)
    try:
        p.wait(wait_s)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
