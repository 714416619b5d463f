"""migrator: live-migration dirty-page tracking engine for Linux.

Data path, one package a stage:
  migrator.kernel    kernel interfaces (procfs maps, pagemap, PAGEMAP_SCAN, userfaultfd, shmem)
  migrator.tracking  trackers: which pages changed since the previous collect
  migrator.guest     a QEMU-like guest to migrate (shared-memory RAM, workloads, side writers)
  migrator.cli       the `migrator` command
"""

__version__ = "0.1.0"
