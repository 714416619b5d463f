"""The compiled fast path (csrc/track.c) and the one helper that turns its -errno returns into
exceptions.  Only migrator.kernel and migrator.tracking modules call `lib` directly."""

import os

from .._track_c import ffi, lib

__all__ = ["ffi", "lib", "check", "PAGE_SIZE"]

PAGE_SIZE: int = os.sysconf("SC_PAGE_SIZE")


def check(ret: int, call: str, *, pid: int | None = None) -> int:
    """Return ret if >= 0; else raise OSError(-ret) naming the call (and the pid)."""
    if ret >= 0:
        return ret
    code = -ret
    where = f"{call} (pid {pid})" if pid is not None else call
    err = OSError(code, f"{where}: {os.strerror(code)}")
    err.errno = code
    raise err
