"""The view holder (kernel/viewholder.py): a process of migrator's own holding read-only views of
shared memory objects, whose RssShmem counts the pages present in them.  A real holder process,
a real memfd, real hole punches from this process."""

import os
import subprocess
import sys
import time

import pytest

from migrator.errors import MigratorError
from migrator.kernel.native import PAGE_SIZE
from migrator.kernel.pagemap import PAGE_IS_PRESENT, Pagemap
from migrator.kernel.viewholder import ViewHolder, _punch

N = 64


@pytest.fixture
def memfd():
    fd = os.memfd_create("test-viewholder", os.MFD_CLOEXEC)
    os.ftruncate(fd, N * PAGE_SIZE)
    for p in range(0, N, 2):                     # even pages hold data, odd ones are holes
        os.pwrite(fd, bytes([p + 1]), p * PAGE_SIZE)
    yield fd
    os.close(fd)


def present(holder: ViewHolder, addr: int) -> list[int]:
    with Pagemap(holder.pid) as pm:
        runs, _ = pm.scan_regions(addr, addr + N * PAGE_SIZE, category_mask=PAGE_IS_PRESENT,
                                  return_mask=PAGE_IS_PRESENT)
    return [p for a, b, _ in runs for p in range((a - addr) // PAGE_SIZE, (b - addr) // PAGE_SIZE)]


def test_views_count_exactly_the_pages_present(memfd):
    """Populating the data pages maps exactly those; each punch takes one page out of the view
    and out of RssShmem at once (this kernel sums its per-CPU counters: the probe says so)."""
    with ViewHolder([memfd]) as h:
        assert h.rss_exact, "kernel 6.18 reports RssShmem exactly"
        addr = h.map(memfd, 0, N * PAGE_SIZE)
        assert h.rss_shmem_pages() == 0 and present(h, addr) == []
        data = [(addr + p * PAGE_SIZE, PAGE_SIZE) for p in range(0, N, 2)]
        assert h.populate(data) == 0
        assert present(h, addr) == list(range(0, N, 2))
        assert h.rss_shmem_pages() == N // 2
        for k, p in enumerate((4, 10, 62)):
            _punch(memfd, p * PAGE_SIZE, PAGE_SIZE)
            assert h.rss_shmem_pages() == N // 2 - k - 1
        assert present(h, addr) == [p for p in range(0, N, 2) if p not in (4, 10, 62)]


def test_populate_past_the_end_of_a_truncated_object_fails_cleanly(memfd):
    with ViewHolder([memfd]) as h:
        addr = h.map(memfd, 0, N * PAGE_SIZE)
        os.ftruncate(memfd, 8 * PAGE_SIZE)
        pages = [0, 2, 4, 6, 16]                 # (16: past the new end)
        assert h.populate([(addr + p * PAGE_SIZE, PAGE_SIZE) for p in pages]) == 1
        assert present(h, addr) == [0, 2, 4, 6]


def test_a_bad_command_is_an_error_naming_it(memfd):
    with ViewHolder([memfd]) as h:
        with pytest.raises(MigratorError, match="the view holder: error map: "):
            h.map(memfd, 3, PAGE_SIZE)           # (an unaligned offset)
        assert h.rss_shmem_pages() == 0          # (still serving)


def test_the_holder_dies_with_its_parent(memfd):
    """A migrator killed with SIGKILL leaves no holder behind (its input ends)."""
    code = ("import os, sys\n"
            "from migrator.kernel.viewholder import ViewHolder\n"
            "fd = os.memfd_create('t')\n"
            "h = ViewHolder([fd])\n"
            "print(h.pid, flush=True)\n"
            "os.kill(os.getpid(), 9)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    pid = int(p.stdout.split()[0])
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not os.path.exists(f"/proc/{pid}")
