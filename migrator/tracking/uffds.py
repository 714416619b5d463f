"""One userfaultfd per tracked process: the process's own (a cooperating target) or one injected.

Write-protect tracking needs a userfaultfd bound to each tracked process's mm.  A cooperating
process made one itself (`migrator guest --uffd`, mg_uffd_create): it is taken with pidfd_getfd and
preferred.  Any other process gets one injected by ptrace (migrator.kernel.inject), unless the pool
was made with inject=False.  Every tracker of a migration asks the same pool, so a process has one
uffd however many of its mappings are tracked, and its UFFDIO_API handshake is done once.

Only migrator holds the injected uffds (the target's copy is closed during the injection): when
migrator exits or is killed, the kernel releases them and every protection with them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedError
from ..kernel.uffd import Userfaultfd, find_uffd_fds


@dataclass(frozen=True)
class UffdOrigin:
    """How a process's userfaultfd was obtained (for reports)."""

    pid: int
    how: str              # "own" (the process made it) or "injected"
    detail: str           # e.g. "injected into thread 1234 in 41 us"


class UffdPool:
    """Userfaultfds of tracked processes, handshaken (UFFDIO_API with the WP features) once.

    inject: whether a process without a usable uffd of its own gets one injected.
    cooperative: pid -> descriptor number of a uffd the process holds for migrator (optional;
    without it a process's own uffd is found in /proc/PID/fd)."""

    def __init__(self, *, inject: bool = True, cooperative: dict[int, int] | None = None):
        self.inject = inject
        self._cooperative = dict(cooperative or {})
        self._uffds: dict[int, Userfaultfd] = {}
        self.origins: dict[int, UffdOrigin] = {}

    def get(self, pid: int) -> Userfaultfd:
        """The process's uffd, obtained on first use.  Raises UnsupportedError (the kernel lacks
        async write-protect; InjectionRefused when the process cannot be injected) or
        TargetGoneError."""
        u = self._uffds.get(pid)
        if u is not None:
            return u
        own = self._cooperative.get(pid)
        if own is None:
            fds = find_uffd_fds(pid)
            own = fds[0] if fds else None
        u, origin = None, None
        if own is not None:
            try:
                u = Userfaultfd.take(pid, own)
                u.api()
                origin = UffdOrigin(pid, "own", f"its own userfaultfd (fd {own})")
            except UnsupportedError:
                # a uffd the process uses for something else (already initialised): ours instead
                if u is not None:
                    u.close()
                u = None
                if not self.inject:
                    raise
        if u is None:
            if not self.inject:
                raise UnsupportedError(
                    f"process {pid} holds no userfaultfd and injection is off (--no-inject)")
            u = Userfaultfd.inject(pid)
            try:
                u.api()
            except BaseException:
                u.close()
                raise
            inj = u.injection
            origin = UffdOrigin(pid, "injected",
                                f"injected into thread {inj.tid} in {inj.total_s * 1e6:.0f} us"
                                + (" (user-mode faults only)" if inj.user_mode_only else ""))
        assert origin is not None
        self._uffds[pid] = u
        self.origins[pid] = origin
        return u

    def drop(self, pid: int) -> None:
        """Close the process's uffd (the process exited, or it is no longer tracked)."""
        u = self._uffds.pop(pid, None)
        if u is not None:
            u.close()

    def close(self) -> None:
        for pid in list(self._uffds):
            self.drop(pid)

