"""migrator: live migration of a running process's memory, exact and proportional.

The public API is what this module exports (`__all__`), and `migrator.scenarios`'s; it is
documented in docs/api.md.  Everything else (the data path's packages below) is internal and
may change between versions:

  migrator.kernel     kernel interfaces (procfs maps, pagemap, PAGEMAP_SCAN, userfaultfd, shmem)
  migrator.tracking   trackers: which pages changed since the previous collect
  migrator.precopy    the pre-copy controller (rounds, switch-over, pause)
  migrator.transport  wire protocol, sender, receiver, images
  migrator.guest      a QEMU-like guest to migrate (shared-memory RAM, workloads, side writers)
  migrator.scenarios  repeatable migration scenarios, reports, baseline (public: its __all__)
  migrator.cli        the `migrator` command

    import migrator

    async with migrator.Receiver("/var/tmp/dest", key=key) as rx:
        report = await migrator.migrate(pid=pid, regions=["kind:anon"], to=rx, key=key,
                                        policy=migrator.MigrationPolicy(downtime_limit_ms=100))

Names are loaded on first use, so `import migrator` stays cheap (the CLI's start-up).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module it comes from (loaded on first access: PEP 562)
_EXPORTS = {
    "migrate": ".api",
    "Receiver": ".api",
    "start_guest": ".api",
    "probe": ".api",
    "Address": ".api",
    "MigrationPolicy": ".precopy.controller",
    "StopToken": ".precopy.controller",
    "MigrationReport": ".precopy.report",
    "RoundStats": ".precopy.report",
    "SessionOutcome": ".transport.receiver",
    "Guest": ".guest.launcher",
    "GuestSpec": ".guest.spec",
    "WorkloadSpec": ".guest.workloads",
    "Capabilities": ".kernel.probe",
    "Feature": ".kernel.probe",
    "load_key": ".transport.auth",
    "generate_key_file": ".transport.auth",
    "MigratorError": ".errors",
    "UsageError": ".errors",
    "UnsupportedError": ".errors",
    "TargetGoneError": ".errors",
    "RegionError": ".errors",
    "TransportError": ".errors",
    "ProtocolError": ".errors",
    "AuthError": ".errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'migrator' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value          # (later lookups skip this function)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:                    # (what type checkers and IDEs see)
    from .api import Address, Receiver, migrate, probe, start_guest
    from .errors import (AuthError, MigratorError, ProtocolError, RegionError, TargetGoneError,
                         TransportError, UnsupportedError, UsageError)
    from .guest.launcher import Guest
    from .guest.spec import GuestSpec
    from .guest.workloads import WorkloadSpec
    from .kernel.probe import Capabilities, Feature
    from .precopy.controller import MigrationPolicy, StopToken
    from .precopy.report import MigrationReport, RoundStats
    from .transport.auth import generate_key_file, load_key
    from .transport.receiver import SessionOutcome
