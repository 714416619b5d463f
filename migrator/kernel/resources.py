"""Small helpers for objects that own descriptors or other closable things, so that each owner
writes its close() in a line per resource."""

from __future__ import annotations

import os
from typing import Protocol, Self


class _Closable(Protocol):
    def close(self) -> object: ...


class Closing:
    """Mixin: `with obj:` calls obj.close() at the end (the subclass defines close())."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def close_fd(fd: int) -> int:
    """Close fd if it is open (>= 0); returns -1, the value an owner keeps for a closed fd:
    `self.fd = close_fd(self.fd)`."""
    if fd >= 0:
        os.close(fd)
    return -1


def closed(obj: _Closable | None) -> None:
    """Close obj unless it is None; returns None: `self.pagemap = closed(self.pagemap)`."""
    if obj is not None:
        obj.close()
