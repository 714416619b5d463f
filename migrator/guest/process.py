"""The guest process itself: maps and populates its RAM, starts its side writers, prints one
JSON line describing itself on stdout, then dirties memory until told to stop.

Run through `migrator guest` or, from start_guest(), as `python -m migrator.guest.process SPEC`.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import signal
import subprocess
import sys
import time
from typing import TextIO

from ..errors import MigratorError, UnsupportedError, UsageError
from ._native import PAGE_SIZE, ffi
from .control import ControlBlock
from .spec import GuestSpec, Layout, PageoutRange
from .stamp import REGION_ANON, REGION_SHARED, WRITER_POPULATE, WRITER_VCPU, writer_id
from .workloads import Target, WriteLoop, populate

RUN_CHUNK = 0.1          # seconds a C call runs before Python looks at signals and children
READY_WAIT = 15.0        # seconds a side writer may take to start
CHILD_EXIT_WAIT = 3.0    # seconds side writers get to exit before SIGKILL


def _address(m: mmap.mmap) -> int:
    return int(ffi.cast("uintptr_t", ffi.from_buffer(m)))


def _region_by_name(regions: list[dict], name: str) -> dict:
    for r in regions:
        if name in (r["name"], r["kind"]):
            return r
    raise UsageError(f"pager range names region {name!r}: the guest has "
                     f"{', '.join(r['name'] for r in regions)}")


def _pager_ranges(spec: GuestSpec, regions: list[dict]) -> list[list[int]]:
    """[[address, bytes], ...] of the pager's ranges (default: every populated part)."""
    out = []
    wanted = spec.pager_ranges or tuple(PageoutRange(r["name"]) for r in regions)
    for pr in wanted:
        r = _region_by_name(regions, pr.region)
        off = pr.offset // PAGE_SIZE * PAGE_SIZE
        end = r["populated"] if not pr.length else off + -(-pr.length // PAGE_SIZE) * PAGE_SIZE
        if off >= end or end > r["size"]:
            raise UsageError(f"pager range {pr.region}:{pr.offset}:{pr.length} is outside the "
                             f"region ({r['size']} bytes)")
        out.append([r["start"] + off, end - off])
    return out


def _check_fits(nbytes: int) -> None:
    """MigratorError if populating nbytes cannot fit in available memory plus free swap."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            info[k] = int(v.split()[0]) * 1024
    room = info.get("MemAvailable", 0) + info.get("SwapFree", 0)
    if nbytes > room:
        raise MigratorError(f"the guest's populated memory ({nbytes} bytes) does not fit: "
                            f"{room} bytes available (memory + free swap)")


def _spawn_writer(cfg: dict, fds: tuple[int, ...]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "migrator.guest.writers", json.dumps(cfg)],
        pass_fds=fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


class _Memory:
    """The guest's RAM: a sealed memfd mapped shared (as QEMU's memory-backend-memfd), and
    private anonymous memory, both populated as the layout says."""

    def __init__(self, spec: GuestSpec, lay: Layout, ps: int):
        try:
            self.memfd = os.memfd_create(spec.name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(self.memfd, lay.shared_pages * ps)
            # fixed size, sealed as QEMU seals its memfd RAM (memory-backend-memfd seal=on): lets
            # a migration source map it without risking SIGBUS from a shrink
            fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            self.shared = mmap.mmap(self.memfd, lay.shared_pages * ps, mmap.MAP_SHARED,
                                    mmap.PROT_READ | mmap.PROT_WRITE)
            self.shared_at = _address(self.shared)
            self.anon = self.anon_at = None
            if lay.anon_pages:
                self.anon = mmap.mmap(-1, lay.anon_pages * ps, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
                self.anon_at = _address(self.anon)
        except OSError as e:
            raise MigratorError(f"cannot create the guest's memory ({lay.shared_pages * ps} bytes "
                                f"shared, {lay.anon_pages * ps} bytes anon): {e.strerror}") from None
        populate(Target(npages=lay.shared_tail[0], first_index=0, region=REGION_SHARED,
                        address=self.shared_at), ps, writer_id(WRITER_POPULATE, spec.content))
        if self.anon_at is not None and lay.anon_populated[1]:
            populate(Target(npages=lay.anon_populated[1], first_index=0, region=REGION_ANON,
                            address=self.anon_at), ps, writer_id(WRITER_POPULATE, spec.content))

    def regions(self, spec: GuestSpec, lay: Layout, ps: int) -> list[dict]:
        """The regions as the guest's info line describes them (addresses, sizes, writers' areas)."""
        out = [{"name": spec.name, "kind": "shared", "start": self.shared_at,
                "end": self.shared_at + lay.shared_pages * ps, "size": lay.shared_pages * ps,
                "populated": lay.shared_tail[0] * ps, "fd": self.memfd,
                "areas": {"vcpu": lay.vcpu, "vhost": lay.vhost, "pwrite": lay.pwrite,
                          "tail": lay.shared_tail}}]
        if self.anon_at is not None:
            out.append({"name": "anon", "kind": "anon", "start": self.anon_at,
                        "end": self.anon_at + lay.anon_pages * ps, "size": lay.anon_pages * ps,
                        "populated": lay.anon_populated[1] * ps, "fd": None,
                        "areas": {"vcpu": lay.anon_populated, "tail": lay.anon_tail}})
        return out

    def vcpu_targets(self, spec: GuestSpec, lay: Layout) -> list[Target]:
        """What the vCPU loop writes (spec.target: shared, anon or both)."""
        targets = []
        if spec.target in ("shared", "both") and lay.vcpu[1] > lay.vcpu[0]:
            targets.append(Target(npages=lay.vcpu[1], first_index=0, region=REGION_SHARED,
                                  address=self.shared_at))
        if spec.target in ("anon", "both") and self.anon_at is not None and lay.anon_populated[1]:
            targets.append(Target(npages=lay.anon_populated[1], first_index=0, region=REGION_ANON,
                                  address=self.anon_at))
        return targets


def _create_uffd() -> int:
    from ..kernel.uffd import create_in_this_process   # the kernel layer owns uffd calls

    try:
        return create_in_this_process()
    except OSError as e:
        raise UnsupportedError(f"userfaultfd: {os.strerror(e.errno)}") from None


def _spawn_side_writers(spec: GuestSpec, lay: Layout, mem: _Memory, ctl: ControlBlock,
                        regions: list[dict]) -> dict[str, subprocess.Popen]:
    """The vhost-like and pwrite writers and the pager, each a process of its own."""
    base = {"guest_pid": os.getpid(), "ctl_fd": ctl.fd, "memfd": mem.memfd,
            "shared_size": lay.shared_pages * PAGE_SIZE, "content": spec.content}
    children: dict[str, subprocess.Popen] = {}
    for kind, ws, area in (("vhost", spec.vhost, lay.vhost), ("pwrite", spec.pwrite, lay.pwrite)):
        if ws is not None:
            children[kind] = _spawn_writer({**base, "kind": kind, "area": area,
                                            "workload": ws.__dict__}, (mem.memfd, ctl.fd))
    if spec.pager_interval is not None:
        children["pager"] = _spawn_writer({**base, "kind": "pager", "interval": spec.pager_interval,
                                           "ranges": _pager_ranges(spec, regions)}, (ctl.fd,))
    return children


def run_guest(spec: GuestSpec, out: TextIO = sys.stdout, *, die_with_parent: bool = False) -> int:
    """Be the guest: returns the exit status once stopped (SIGTERM/SIGINT or control block).

    die_with_parent: stop when the parent process exits (checked every RUN_CHUNK seconds; not
    PR_SET_PDEATHSIG, which fires when the parent *thread* exits, e.g. a worker thread).
    """
    parent = os.getppid() if die_with_parent else None
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)                  # own process group: pause = killpg(SIGSTOP)
    ps = PAGE_SIZE
    lay = Layout.of(spec, ps)
    _check_fits((lay.shared_tail[0] + lay.anon_populated[1]) * ps)
    uffd = _create_uffd() if spec.uffd else None
    mem = _Memory(spec, lay, ps)
    regions = mem.regions(spec, lay, ps)
    ctl = ControlBlock.create()
    vslot = ctl.slot("vcpu")
    loop = WriteLoop(spec.workload, mem.vcpu_targets(spec, lay), vslot, writer_id(WRITER_VCPU, spec.content))
    children = _spawn_side_writers(spec, lay, mem, ctl, regions)
    try:
        _wait_ready(ctl, children)
        vslot.pid = os.getpid()
        stopping = False

        def on_term(signum, frame):
            nonlocal stopping
            stopping = True
            vslot.stop = 1

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_term)
        info = {"pid": os.getpid(), "pgid": os.getpgrp(), "page_size": ps, "regions": regions,
                "writers": [{"kind": k, "pid": p.pid} for k, p in children.items()],
                "uffd_fd": uffd, "ctl_fd": ctl.fd,
                "workload": {"kind": spec.workload.kind, "rate": spec.workload.rate,
                             "seed": spec.workload.seed, "target": spec.target,
                             "pages": loop.total,
                             "hot": list(loop.hot) if spec.workload.kind == "hotcold" else None}}
        out.write(json.dumps(info) + "\n")
        out.flush()
        status = 0
        while not stopping and not vslot.stop:
            loop.run(RUN_CHUNK)
            if parent is not None and os.getppid() != parent:
                print("migrator guest: parent exited: stopping", file=sys.stderr)
                stopping = True
            for kind, p in children.items():
                if p.poll() is not None:
                    print(f"migrator guest: the {kind} writer exited with status {p.returncode}",
                          file=sys.stderr)
                    status = 1
                    stopping = True
        return status
    finally:
        ctl.stop_all()
        _reap(children)


def _wait_ready(ctl: ControlBlock, children: dict[str, subprocess.Popen]) -> None:
    deadline = time.monotonic() + READY_WAIT
    for kind, p in children.items():
        while not ctl.slot(kind).pid:
            if p.poll() is not None:
                raise MigratorError(f"the {kind} writer failed to start (status {p.returncode})")
            if time.monotonic() > deadline:
                raise MigratorError(f"the {kind} writer did not start within {READY_WAIT:.0f} s")
            time.sleep(0.005)


def _reap(children: dict[str, subprocess.Popen]) -> None:
    for p in children.values():
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.terminate()
    for p in children.values():
        try:
            p.wait(CHILD_EXIT_WAIT)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv: list[str]) -> int:
    try:
        return run_guest(GuestSpec.from_json(argv[1]), die_with_parent=True)
    except MigratorError as e:
        print(f"migrator guest: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
