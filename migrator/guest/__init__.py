"""A QEMU-like guest to migrate: a memfd-backed shared RAM block and a private anonymous block,
dirtied by seeded workloads (C write loops), side writers (vhost-like mapper, pwrite, pager),
every page stamped so images can be verified.

The public names are re-exported here; the modules behind them are private.
"""

from .control import WriterStatistics as WriterStatistics
from .launcher import Guest as Guest
from .launcher import GuestStatistics as GuestStatistics
from .launcher import Region as Region
from .launcher import changed_pages as changed_pages
from .launcher import start_guest as start_guest
from .pressure import PageOut as PageOut
from .spec import GuestSpec as GuestSpec
from .spec import PageoutRange as PageoutRange
from .stamp import Finding as Finding
from .stamp import VerifyResult as VerifyResult
from .stamp import stamp_page as stamp_page
from .stamp import verify_image as verify_image
from .workloads import WORKLOADS as WORKLOADS
from .workloads import WorkloadSpec as WorkloadSpec

__all__ = [
    "Finding", "Guest", "GuestSpec", "GuestStatistics", "PageOut", "PageoutRange", "Region", "VerifyResult",
    "WORKLOADS", "WorkloadSpec", "WriterStatistics", "changed_pages", "start_guest", "stamp_page",
    "verify_image",
]
