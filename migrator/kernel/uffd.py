"""userfaultfd in async write-protect mode, driven from another process.

The uffd is bound to the mm of the process that created it, so it must be created inside the
target: a cooperating program calls create_in_this_process() (Python) or mg_uffd_create() (C,
csrc/track.h) and keeps the fd open.  The tracker finds it in /proc/PID/fd and takes a copy with
pidfd_getfd (needs ptrace-attach rights over the target).
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from ..errors import TargetGoneError, UnsupportedError
from .native import check, ffi, lib

if TYPE_CHECKING:
    from .inject import Injection

UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
WP_FEATURES = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM

_UFFD_LINK = "anon_inode:[userfaultfd]"


def create_in_this_process() -> int:
    """Guest-side helper: create a userfaultfd for the calling process's memory; keep it open."""
    return check(lib.mg_uffd_create(), "userfaultfd")


def find_uffd_fds(pid: int) -> list[int]:
    """Descriptor numbers of the userfaultfds the target holds."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        raise TargetGoneError(f"process {pid} does not exist (or exited)") from None
    out = []
    for n in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{n}") == _UFFD_LINK:
                out.append(int(n))
        except OSError:
            continue
    return sorted(out)


class Userfaultfd:
    """A userfaultfd usable by this process: our own, or one taken from a target."""

    def __init__(self, fd: int, pid: int):
        self.fd = fd
        self.pid = pid
        self.features = 0
        self.injection: Injection | None = None

    @classmethod
    def inject(cls, pid: int) -> "Userfaultfd":
        """Create a userfaultfd inside process pid, which need not cooperate (ptrace injection:
        migrator.kernel.inject.inject_userfaultfd), and take it.  The target keeps no copy; the
        Injection (timings, user_mode_only) is kept as .injection."""
        from .inject import inject_userfaultfd

        inj = inject_userfaultfd(pid)
        u = cls(inj.fd, pid)
        u.injection = inj
        return u

    @classmethod
    def take(cls, pid: int, target_fd: int | None = None) -> "Userfaultfd":
        """Copy the target's userfaultfd into this process (pidfd_open + pidfd_getfd)."""
        if target_fd is None:
            fds = find_uffd_fds(pid)
            if not fds:
                raise UnsupportedError(
                    f"process {pid} holds no userfaultfd: write-protect tracking needs the target "
                    "to create one (migrator.kernel.uffd.create_in_this_process / mg_uffd_create)")
            target_fd = fds[0]
        try:
            pidfd = check(lib.mg_pidfd_open(pid), "pidfd_open", pid=pid)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise TargetGoneError(f"process {pid} exited") from None
            raise
        try:
            fd = check(lib.mg_pidfd_getfd(pidfd, target_fd), "pidfd_getfd", pid=pid)
        except OSError as e:
            if e.errno == errno.EPERM:
                raise UnsupportedError(f"pidfd_getfd on process {pid}: no ptrace rights (run as root or as its owner)") from None
            if e.errno == errno.ESRCH:
                raise TargetGoneError(f"process {pid} exited") from None
            raise
        finally:
            os.close(pidfd)
        return cls(fd, pid)

    def api(self, features: int = WP_FEATURES) -> int:
        """UFFDIO_API handshake asking for features; returns the features granted.

        Raises UnsupportedError when the kernel lacks async write-protect."""
        out = ffi.new("uint64_t *")
        r = lib.mg_uffd_api(self.fd, features, out, ffi.NULL)
        if r == -errno.EINVAL and features:
            # either a feature is unknown to this kernel, or API was already done on this uffd
            probe = lib.mg_uffd_api(self.fd, 0, out, ffi.NULL)
            if probe == -errno.EINVAL:
                raise UnsupportedError("userfaultfd: UFFDIO_API refused (already initialised, or WP_ASYNC unsupported)")
            raise UnsupportedError(
                f"userfaultfd: kernel lacks async write-protect (features offered {out[0]:#x}, "
                f"wanted {features:#x}; needs Linux 6.7+)")
        check(r, "ioctl(UFFDIO_API)", pid=self.pid)
        self.features = out[0]
        return self.features

    def register_wp(self, start: int, length: int) -> None:
        check(lib.mg_uffd_register_wp(self.fd, start, length), f"ioctl(UFFDIO_REGISTER {start:#x}+{length:#x})", pid=self.pid)

    def unregister(self, start: int, length: int) -> None:
        check(lib.mg_uffd_unregister(self.fd, start, length), "ioctl(UFFDIO_UNREGISTER)", pid=self.pid)

    def writeprotect(self, start: int, length: int, protect: bool = True) -> None:
        check(lib.mg_uffd_writeprotect(self.fd, start, length, int(protect)), "ioctl(UFFDIO_WRITEPROTECT)", pid=self.pid)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
