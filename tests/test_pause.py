"""Pausing the source for the switch-over: all its processes or none (real processes)."""

import subprocess
import sys

import pytest

from migrator.errors import TargetGoneError
from migrator.precopy.pause import Pauser, _tasks_stopped
from waiting import wait_until


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_pause_and_resume_stop_every_thread():
    p = subprocess.Popen([sys.executable, "-c", "import threading, time\n"
                          "threading.Thread(target=time.sleep, args=(60,)).start(); print('ready', flush=True); "
                          "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ready\n"            # its second thread is running
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
        wait_until(lambda: _state(guest.pid) in ("S", "R"), 5, f"the guest {guest.pid} to run again")
    finally:
        guest.kill()
        guest.wait()
