"""Pausing the source for the switch-over: all its processes or none (real processes)."""

import subprocess
import sys
import time

import pytest

from migrator.errors import TargetGoneError
from migrator.precopy.pause import Pauser, _tasks_stopped


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_pause_and_resume_stop_every_thread():
    p = subprocess.Popen([sys.executable, "-c", "import threading, time\n"
                          "threading.Thread(target=time.sleep, args=(60,)).start(); time.sleep(60)"])
    try:
        time.sleep(0.2)
        pauser = Pauser([p.pid])
        pauser.pause()
        assert pauser.paused and _tasks_stopped(p.pid)
        pauser.resume()
        assert not pauser.paused and _state(p.pid) in ("S", "R")   # (R: just woken by SIGCONT)
    finally:
        p.kill()
        p.wait()


def test_a_gone_process_leaves_none_stopped():
    """The guest's side writer was killed just before the pause: the pause fails naming it, and
    the guest, stopped first, runs again (the fault soak found it left stopped for good)."""
    guest = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    writer = subprocess.Popen([sys.executable, "-c", "pass"])
    writer.wait()                       # (its pid is free now: nothing to signal)
    try:
        pauser = Pauser([guest.pid, writer.pid])
        with pytest.raises(TargetGoneError, match=f"process {writer.pid} exited"):
            pauser.pause()
        assert not pauser.paused
        deadline = time.monotonic() + 5
        while _state(guest.pid) not in ("S", "R") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _state(guest.pid) in ("S", "R")
    finally:
        guest.kill()
        guest.wait()
