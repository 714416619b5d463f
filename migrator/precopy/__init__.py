"""The pre-copy controller: live migration of a running process's memory.

    report = await migrate(MigrationTarget(pid, ["guest-ram"]), host, port, key=key,
                           policy=MigrationPolicy(downtime_limit_ms=300))
"""

from .controller import MigrationPolicy as MigrationPolicy
from .controller import MigrationTarget as MigrationTarget
from .controller import SourcePauser as SourcePauser
from .controller import migrate as migrate
from .report import MigrationReport as MigrationReport
from .report import RoundStats as RoundStats

__all__ = ["MigrationPolicy", "MigrationTarget", "SourcePauser", "migrate", "MigrationReport", "RoundStats"]
