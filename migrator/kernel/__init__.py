"""Kernel interfaces: one small module each (procfs maps, pagemap, PAGEMAP_SCAN, userfaultfd,
shmem objects), plus the probe that finds out, by exercising them, which ones this kernel has."""
