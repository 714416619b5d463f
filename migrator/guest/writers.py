"""Side writers: separate processes started by the guest, each in one control-block slot.

  vhost   maps the guest's RAM memfd (inherited fd) MAP_SHARED and stamps pages of its area
          through that mapping, like a vhost-user backend;
  pwrite  pwrite()s stamped pages into its area of the memfd, like device DMA;
  pager   pushes chosen ranges of the guest out with process_madvise(MADV_PAGEOUT) every
          interval, like host memory pressure.

Run as `python -m migrator.guest.writers CONFIG_JSON` (the guest does this; see process.py).
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import sys
import time

from ._native import PAGE_SIZE, check, ffi, lib
from .control import ControlBlock
from .stamp import REGION_SHARED, WRITER_PWRITE, WRITER_VHOST, writer_id
from .workloads import Target, WorkloadSpec, WriteLoop

RUN_CHUNK = 0.1        # seconds a C call runs before Python looks at signals again


def _run_writer(cfg: dict, slot) -> None:
    ws = WorkloadSpec(**cfg["workload"])
    s, e = cfg["area"]
    if cfg["kind"] == "vhost":
        ram = mmap.mmap(cfg["memfd"], cfg["shared_size"], mmap.MAP_SHARED,
                        mmap.PROT_READ | mmap.PROT_WRITE)
        base = int(ffi.cast("uintptr_t", ffi.from_buffer(ram)))
        target = Target(npages=e - s, first_index=s, region=REGION_SHARED,
                        address=base + s * PAGE_SIZE)
        writer = WRITER_VHOST
    else:
        target = Target(npages=e - s, first_index=s, region=REGION_SHARED, fd=cfg["memfd"],
                        fd_offset=s * PAGE_SIZE)
        writer = WRITER_PWRITE
    loop = WriteLoop(ws, [target], slot, writer_id(writer, cfg.get("content", "stamp")))
    slot.pid = os.getpid()
    while not slot.stop:
        loop.run(RUN_CHUNK)


def _run_pager(cfg: dict, slot) -> None:
    pid = cfg["guest_pid"]
    pidfd = os.pidfd_open(pid)
    pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    ranges = cfg["ranges"]                              # [[address, bytes], ...]
    addrs = ffi.new("uint64_t[]", [a for a, _ in ranges])
    lens = ffi.new("uint64_t[]", [n for _, n in ranges])
    total = sum(n for _, n in ranges) // PAGE_SIZE
    interval = cfg["interval"]
    slot.rate = 0.0
    slot.pid = os.getpid()
    next_t = time.monotonic()
    while not slot.stop:
        advised = check(lib.mg_pageout(pidfd, addrs, lens, len(ranges)), "process_madvise", pid=pid)
        present = sum(check(lib.mg_count_present(pagemap, a, n // PAGE_SIZE, PAGE_SIZE),
                            "pagemap read", pid=pid) for a, n in ranges)
        slot.pages += advised // PAGE_SIZE
        slot.extra = total - present
        slot.rounds += 1
        next_t += interval
        while not slot.stop and time.monotonic() < next_t:
            time.sleep(min(0.05, max(0.0, next_t - time.monotonic())))


def main(argv: list[str]) -> int:
    cfg = json.loads(argv[1])
    lib.mg_set_pdeathsig(signal.SIGKILL)               # die with the guest
    if os.getppid() != cfg["guest_pid"]:
        return 1                                        # the guest died before we got here
    block = ControlBlock(cfg["ctl_fd"], owner=False)
    slot = block.slot(cfg["kind"])

    def on_term(signum, frame):
        slot.stop = 1

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # the guest decides when we stop
    try:
        if cfg["kind"] == "pager":
            _run_pager(cfg, slot)
        else:
            _run_writer(cfg, slot)
    except OSError as e:
        print(f"migrator guest {cfg['kind']} writer: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
