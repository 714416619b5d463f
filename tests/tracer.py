"""A process that holds a PTRACE_SEIZE on a target (as a debugger, strace or CRIU would), for the
tests of targets that are already traced."""

from __future__ import annotations

import subprocess
import sys

_SCRIPT = """
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
if libc.ptrace(0x4206, int(sys.argv[1]), None, None) != 0:   # PTRACE_SEIZE
    print("error", ctypes.get_errno(), flush=True)
else:
    print("seized", flush=True)
time.sleep(3600)
"""


class Tracer:
    """`with Tracer(pid) as t:` pid is traced by process t.pid until the block ends."""

    def __init__(self, pid: int):
        self.proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, str(pid)], stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        line = self.proc.stdout.readline().strip()
        if line != "seized":
            self.close()
            raise RuntimeError(f"could not seize {pid}: {line}")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> "Tracer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
