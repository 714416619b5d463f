"""Trackers: which pages of the tracked regions changed since the previous collect.

One interface (Tracker: begin, collect, end), several backends:
  writeprotect.WriteProtectTracker   userfaultfd async WP + PAGEMAP_SCAN (atomic report+re-protect)
  softdirty.SoftDirtyTracker         clear_refs + pagemap bit 55 (where the kernel has it)
  ledger.ShmemLedger/LedgerTracker   page-cache content hashes of shared memory objects
  fullhash.FullHashTracker           content hashes of private memory of any process
  composite.CompositeTracker         PTE tracker for private memory + ledger for shared (default)
choose.make_tracker() picks one from the kernel probe.
"""

from .base import DirtyPages, RegionEvent, Tracker, TrackerStatistics
from .pageset import PageSet

__all__ = ["DirtyPages", "PageSet", "RegionEvent", "Tracker", "TrackerStatistics"]
