"""Picking a tracker for a process and its regions, from the kernel probe and the target.

auto, private memory: write-protect (userfaultfd WP_ASYNC + PAGEMAP_SCAN) with the target's own
uffd when it made one, else with one injected by ptrace; where that is refused (no ptrace rights,
a target already traced, a seccomp filter) or the kernel lacks it, soft-dirty, else full hashing.
auto, shared memory: write-protect on every process that maps it (MapperTracker), where the
kernel allows it, always together with the shmem ledger (the objects' contents: what page tables
cannot show).  Every fallback is said in the tracker's statistics().detail (the report's
tracker_detail); nothing falls back silently.
"""

from __future__ import annotations

from ..errors import TargetGoneError, UnsupportedError, UsageError
from ..kernel.maps import Region
from ..kernel.probe import (Capabilities, probe, probe_map_files, probe_pagemap_scan,
                            probe_uffd_wp_async_shmem)
from .base import Tracker
from .composite import CompositeTracker, PairTracker, is_shared
from .fullhash import FullHashTracker
from .ledger import LedgerRegistry
from .mappers import MapperTracker
from .softdirty import NO_SOFT_DIRTY, SoftDirtyTracker
from .uffds import UffdPool
from .writeprotect import WriteProtectTracker

CHOICES = ("auto", "wp", "soft-dirty", "hash")


def make_tracker(pid: int, regions: list[Region], kind: str = "auto", *,
                 caps: Capabilities | None = None, registry: LedgerRegistry | None = None,
                 uffd_fd: int | None = None, inject: bool = True,
                 hint_pids: list[int] | None = None,
                 no_syscall_writes: set[int] | None = None) -> Tracker:
    """A composite tracker: `kind` picks the mechanism for private memory (see the module
    docstring); shared memory goes to write-protect on its mappers (auto and wp) and always to the
    shmem ledger (or full hashing without map_files access).  The name says what was picked
    (e.g. "wp+wp-mappers+ledger", "hash+ledger").

    uffd_fd: the target's own userfaultfd, if known; inject=False never injects one (the
    cooperative uffd or another mechanism); hint_pids: processes known to map the shared memory
    (writers, a cgroup's tasks); no_syscall_writes: processes known never to write the shared
    memory by system call (a QEMU process: see tracking/sweepgate.py)."""
    if kind not in CHOICES:
        raise UsageError(f"unknown tracker {kind!r}: choose one of {', '.join(CHOICES)}")
    private = [r for r in regions if not is_shared(r)]
    shared = [r for r in regions if is_shared(r)]
    if caps is None and not private:
        # shared memory only (a QEMU VM's RAM): a few probes, not all (each costs set-up time)
        caps = _shared_caps()
    caps = caps or probe()
    pool = UffdPool(inject=inject, cooperative={pid: uffd_fd} if uffd_fd is not None else None)
    notes: list[str] = []
    try:
        return _make(pid, regions, private, shared, kind, caps, registry, pool, notes, hint_pids,
                     no_syscall_writes)
    except BaseException:
        pool.close()
        raise


def _make(pid: int, regions: list[Region], private: list[Region], shared: list[Region], kind: str,
          caps: Capabilities, registry: LedgerRegistry | None, pool: UffdPool, notes: list[str],
          hint_pids: list[int] | None, no_syscall_writes: set[int] | None = None) -> Tracker:
    scan_ok = caps.pagemap_scan.supported
    wp_private = scan_ok and caps.uffd_wp_async_anon.supported
    wp_shared = scan_ok and caps.uffd_wp_async_shmem.supported and caps.map_files.supported
    wanted = kind
    if kind == "wp" and not (wp_private if private else wp_shared):
        missing = [n for n in ("uffd_wp_async_anon" if private else "uffd_wp_async_shmem", "pagemap_scan")
                   if not getattr(caps, n).supported]
        raise UnsupportedError(f"write-protect tracking unavailable: kernel lacks {', '.join(missing)}")

    # the target's userfaultfd, its own or injected, for its private regions and its mappings
    # of shared memory; a refusal is a fallback under auto and an error under wp
    uffd_ok = False
    if kind in ("auto", "wp") and ((private and wp_private) or (shared and wp_shared)):
        try:
            pool.get(pid)
            uffd_ok = True
        except TargetGoneError:
            raise
        except UnsupportedError as e:
            if kind == "wp":
                raise UnsupportedError(f"write-protect tracking of process {pid}: {e}") from None
            notes.append(f"no write-protect: {e}")
    elif kind == "auto":
        notes.append("no write-protect: kernel lacks "
                     + ("uffd_wp_async_anon/pagemap_scan" if private else "uffd_wp_async_shmem/pagemap_scan"))

    if kind == "auto":
        kind = "wp" if (uffd_ok and (wp_private or not private)) else (
            "soft-dirty" if caps.soft_dirty.supported else "hash")
        if kind != "wp" and private:
            notes.append(f"private memory: {kind}")
    if kind == "soft-dirty" and not caps.soft_dirty.supported:
        raise UnsupportedError(NO_SOFT_DIRTY)

    priv: Tracker | None = None
    if private:
        priv = {"wp": lambda: WriteProtectTracker(pid, private, pool=pool),
                "soft-dirty": lambda: SoftDirtyTracker(pid, private, supported=True),
                "hash": lambda: FullHashTracker(pid, private)}[kind]()
    if shared and not caps.map_files.supported:
        # no access to the objects themselves: hash them through the target's mappings
        notes.append(f"shared memory hashed through the target's mappings: {caps.map_files.detail}")
        hashed = FullHashTracker(pid, shared)
        if priv is None:
            return hashed
        return PairTracker(pid, regions, priv, hashed, pool, notes)
    mappers = None
    if shared and uffd_ok and wp_shared and wanted in ("auto", "wp"):
        mappers = MapperTracker(pid, shared, pool, hint_pids=hint_pids)
    return CompositeTracker(pid, regions, priv, registry, mappers=mappers, pool=pool, notes=notes,
                            no_syscall_writes=no_syscall_writes)


def _shared_caps() -> Capabilities:
    """The probes shared-only tracking needs (write-protect on shmem, PAGEMAP_SCAN, map_files);
    the others reported as not probed."""
    from ..kernel.probe import Feature
    skipped = Feature(False, "not probed (shared memory only)")
    return Capabilities(soft_dirty=skipped, pagemap_scan=probe_pagemap_scan(),
                        uffd_wp_async_anon=skipped, uffd_wp_async_shmem=probe_uffd_wp_async_shmem(),
                        pidfd_getfd=skipped, map_files=probe_map_files(), swap_active=skipped,
                        thp=skipped)

