"""What the three binding modules share (kernel/native.py, transport/_native.py,
guest/_native.py): the page size and check(), which turns a C function's -errno return into an
OSError.  Nothing here loads compiled code."""

import os

PAGE_SIZE: int = os.sysconf("SC_PAGE_SIZE")     # bytes


def check(ret: int, call: str, *, pid: int | None = None) -> int:
    """Return ret if >= 0; else raise OSError(-ret) naming the call (and the pid)."""
    if ret >= 0:
        return ret
    where = f"{call} (pid {pid})" if pid is not None else call
    raise OSError(-ret, f"{where}: {os.strerror(-ret)}")
