"""Picking a tracker for a process and its regions, from the kernel probe and the target."""

from __future__ import annotations

from ..errors import UnsupportedError, UsageError
from ..kernel.maps import Region
from ..kernel.probe import Capabilities, probe, probe_map_files
from ..kernel.uffd import find_uffd_fds
from .base import Tracker
from .composite import CompositeTracker, is_shared
from .fullhash import FullHashTracker
from .ledger import LedgerRegistry
from .softdirty import NO_SOFT_DIRTY, SoftDirtyTracker
from .writeprotect import WriteProtectTracker

CHOICES = ("auto", "wp", "soft-dirty", "hash")


def make_tracker(pid: int, regions: list[Region], kind: str = "auto", *,
                 caps: Capabilities | None = None, registry: LedgerRegistry | None = None,
                 uffd_fd: int | None = None) -> Tracker:
    """A composite tracker: `kind` picks the mechanism for private memory (auto: write-protect if
    the kernel has it and the target holds a userfaultfd, else soft-dirty, else full hashing);
    shared memory always goes to the shmem ledger (or full hashing without map_files access).
    The chosen tracker's name says what was picked (e.g. "wp+ledger", "hash+ledger")."""
    if kind not in CHOICES:
        raise UsageError(f"unknown tracker {kind!r}: choose one of {', '.join(CHOICES)}")
    private = [r for r in regions if not is_shared(r)]
    shared = [r for r in regions if is_shared(r)]
    if caps is None and kind == "auto" and not private:
        # shared memory only (a QEMU VM's RAM): the ledger needs map_files, nothing else of the
        # probe (which costs a few ms of every migration's set-up)
        if probe_map_files().supported:
            return CompositeTracker(pid, regions, None, registry)
    caps = caps or probe()
    wp_ok = caps.uffd_wp_async_anon.supported and caps.pagemap_scan.supported and caps.pidfd_getfd.supported
    has_uffd = uffd_fd is not None or bool(find_uffd_fds(pid))

    if kind == "auto":
        if wp_ok and has_uffd:
            kind = "wp"
        elif caps.soft_dirty.supported:
            kind = "soft-dirty"
        else:
            kind = "hash"
    if kind == "wp":
        if not wp_ok:
            missing = [n for n in ("uffd_wp_async_anon", "pagemap_scan", "pidfd_getfd")
                       if not getattr(caps, n).supported]
            raise UnsupportedError(f"write-protect tracking unavailable: kernel lacks {', '.join(missing)}")
        if not has_uffd:
            raise UnsupportedError(
                f"process {pid} holds no userfaultfd: write-protect tracking needs a cooperating "
                "target (see docs/tracking.md); use --tracker hash for any process")
    if kind == "soft-dirty" and not caps.soft_dirty.supported:
        raise UnsupportedError(NO_SOFT_DIRTY)

    priv: Tracker | None = None
    if private:
        priv = {"wp": lambda: WriteProtectTracker(pid, private, uffd_fd=uffd_fd),
                "soft-dirty": lambda: SoftDirtyTracker(pid, private, supported=True),
                "hash": lambda: FullHashTracker(pid, private)}[kind]()
    if shared and not caps.map_files.supported:
        # no access to the objects themselves: hash them through the target's mappings
        hashed = FullHashTracker(pid, shared)
        if priv is None:
            return hashed
        return _Pair(pid, regions, priv, hashed)
    return CompositeTracker(pid, regions, priv, registry)


class _Pair(CompositeTracker):
    """Private tracker + full hashing of shared regions (when map_files cannot be opened)."""

    def __init__(self, pid: int, regions: list[Region], private: Tracker, shared: Tracker):
        Tracker.__init__(self, pid, regions)
        self.private, self.ledger = private, shared
        self.name = f"{private.name}+{shared.name}"
