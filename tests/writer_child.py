"""A target process for the tracking tests: maps memory, then writes on command.

Started by tests/child.py.  Prints one JSON line describing its regions, then reads JSON commands
from stdin, one per line, and answers each with one JSON line ({"ok": true, ...} or {"error": ...}).
Every write stores a fresh 8-byte counter at the start of the page, so contents always change.
"""

import argparse
import ctypes
import json
import mmap
import os
import sys
import threading
import time

from migrator.kernel.native import PAGE_SIZE
from migrator.kernel.scratch import Scratch
from migrator.kernel.uffd import create_in_this_process

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
MAP_FIXED = 0x10
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
ADVICE = {"pageout": getattr(mmap, "MADV_PAGEOUT", 21), "dontneed": mmap.MADV_DONTNEED,
          "hugepage": getattr(mmap, "MADV_HUGEPAGE", 14), "remove": getattr(mmap, "MADV_REMOVE", 9)}


libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_mremap_fixed = ctypes.CDLL(None, use_errno=True).mremap        # the 5-argument form
_mremap_fixed.restype = ctypes.c_void_p
_mremap_fixed.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]


class _SharedFrom:
    """npages of an existing shared object (a path such as /proc/PID/fd/N), from page offset."""

    def __init__(self, path: str, npages: int, offset: int):
        self.npages, self.size = npages, npages * PAGE_SIZE
        self.fd = os.open(path, os.O_RDWR)
        self.map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, offset=offset * PAGE_SIZE)
        from migrator.kernel.scratch import address_of
        self.addr = address_of(self.map)

    def madvise(self, advice: int, first: int = 0, n: int | None = None) -> None:
        n = self.npages - first if n is None else n
        self.map.madvise(advice, first * PAGE_SIZE, n * PAGE_SIZE)


def _close_all(memfd: int) -> None:
    """Close every descriptor of memfd's object, the one Python's mmap keeps (a dup) included."""
    ino = os.fstat(memfd).st_ino
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            if os.fstat(fd).st_ino == ino:
                os.close(fd)
        except OSError:
            pass


def _direct_loop(fd: int, s, file_pages: int, interval: float) -> None:
    import random
    rnd = random.Random(7)
    view = memoryview(s.map)
    while True:
        p = rnd.randrange(s.npages)
        os.preadv(fd, [view[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]], rnd.randrange(file_pages) * PAGE_SIZE)
        time.sleep(interval)


def _balloon_loop(s, interval: float) -> None:
    """As a balloon driver frees guest pages and the guest reuses them: a random page of s is
    punched through the mapping (MADV_REMOVE: no write call, no fault) and read back at once
    (a read fault: a zero page where data was), every interval."""
    import random
    rnd = random.Random(11)
    while True:
        p = rnd.randrange(s.npages)
        s.madvise(ADVICE["remove"], p, 1)
        ctypes.string_at(s.addr + p * PAGE_SIZE, 8)
        time.sleep(interval)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shm-pages", type=int, default=64)
    ap.add_argument("--anon-pages", type=int, default=64)
    ap.add_argument("--thp-pages", type=int, default=0, help="a 2 MiB-aligned anonymous THP range")
    ap.add_argument("--uffd", action="store_true")
    ap.add_argument("--no-populate", action="store_true")
    ap.add_argument("--shm-from", metavar="PATH",
                    help="map another process's memfd (/proc/PID/fd/N) as shm instead of a new one")
    ap.add_argument("--shm-offset", type=int, default=0, help="first object page mapped (--shm-from)")
    ap.add_argument("--close-memfd", action="store_true",
                    help="close the memfd once mapped (a mapper only: no descriptor to write it by)")
    a = ap.parse_args()

    uffd = create_in_this_process() if a.uffd else None
    regions = {
        "shm": _SharedFrom(a.shm_from, a.shm_pages, a.shm_offset) if a.shm_from
        else Scratch(a.shm_pages, "test-shm"),
        "anon": Scratch(a.anon_pages),
    }
    if a.thp_pages:
        regions["thp"] = Scratch(a.thp_pages, align=2 << 20)
        regions["thp"].madvise(ADVICE["hugepage"])
    counter = 0

    def write(addr: int) -> None:
        nonlocal counter
        counter += 1
        ctypes.memmove(addr, counter.to_bytes(8, "little"), 8)

    if not a.no_populate:
        for s in regions.values():
            for p in range(s.npages):
                write(s.addr + p * PAGE_SIZE)
    memfd = regions["shm"].fd
    if a.close_memfd:
        _close_all(memfd)
        memfd = None
    info = {"pid": os.getpid(), "uffd_fd": uffd, "page_size": PAGE_SIZE,
            "memfd": memfd,
            "regions": {k: {"start": s.addr, "end": s.addr + s.size} for k, s in regions.items()}}
    print(json.dumps(info), flush=True)

    forks = []
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        reply: dict = {"ok": True}
        try:
            s = regions.get(cmd.get("region", "shm"))
            pages = cmd.get("pages", [])
            if op == "write":
                for p in pages:
                    write(s.addr + p * PAGE_SIZE)
            elif op == "write_same":           # rewrite a page with the bytes it already holds
                for p in pages:
                    addr = s.addr + p * PAGE_SIZE
                    ctypes.memmove(addr, ctypes.string_at(addr, 8), 8)
            elif op == "pwrite":
                for p in pages:
                    counter += 1
                    os.pwrite(regions["shm"].fd, counter.to_bytes(8, "little"), p * PAGE_SIZE)
            elif op == "madvise":
                s.madvise(ADVICE[cmd["advice"]], cmd["first"], cmd["n"])
            elif op == "punch":
                r = libc.fallocate(regions["shm"].fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
                                   cmd["first"] * PAGE_SIZE, cmd["n"] * PAGE_SIZE)
                if r != 0:
                    raise OSError(ctypes.get_errno(), "fallocate")
            elif op == "remap":                # a new anonymous mapping over part of a region
                addr = s.addr + cmd["first"] * PAGE_SIZE
                r = libc.mmap(addr, cmd["n"] * PAGE_SIZE, mmap.PROT_READ | mmap.PROT_WRITE,
                              mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED, -1, 0)
                if r != addr:
                    raise OSError(ctypes.get_errno(), "mmap")
            elif op == "mremap":               # shrink the region in place to n pages
                r = libc.mremap(s.addr, s.size, cmd["n"] * PAGE_SIZE, 0)
                if r != s.addr:
                    raise OSError(ctypes.get_errno(), "mremap")
            elif op == "mprotect":             # e.g. read-only, then writable again
                prot = {"r": mmap.PROT_READ, "rw": mmap.PROT_READ | mmap.PROT_WRITE}[cmd["prot"]]
                if libc.mprotect(s.addr + cmd["first"] * PAGE_SIZE, cmd["n"] * PAGE_SIZE, prot) != 0:
                    raise OSError(ctypes.get_errno(), "mprotect")
            elif op == "move":                 # mremap the whole region to a new address
                dest = libc.mmap(None, s.size, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)   # PROT_NONE
                r = _mremap_fixed(s.addr, s.size, s.size, 1 | 2, dest)   # MREMAP_MAYMOVE | MREMAP_FIXED
                if r != dest:
                    raise OSError(ctypes.get_errno(), "mremap")
                reply["addr"] = r
            elif op == "munmap":
                if libc.munmap(s.addr + cmd["first"] * PAGE_SIZE, cmd["n"] * PAGE_SIZE) != 0:
                    raise OSError(ctypes.get_errno(), "munmap")
            elif op == "fork":                 # child writes its own pages, then waits
                r, w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    for p in cmd.get("child_pages", []):
                        write(s.addr + p * PAGE_SIZE)
                    os.write(w, b"x")
                    time.sleep(3600)
                    os._exit(0)
                os.read(r, 1)
                forks.append(pid)
                reply["child"] = pid
            elif op == "close_memfd":          # a mapper only from now on
                _close_all(regions["shm"].fd)
            elif op == "fork_exit":            # a child writes pages through the inherited
                pid = os.fork()                # mapping and exits; reaped at once
                if pid == 0:
                    for p in cmd.get("child_pages", []):
                        write(s.addr + p * PAGE_SIZE)
                    os._exit(0)
                os.waitpid(pid, 0)
            elif op == "direct_read":          # O_DIRECT read of a file page into a page;
                fd = os.open(cmd["path"], os.O_RDONLY | os.O_DIRECT)   # the descriptor kept
                view = memoryview(s.map)[cmd["page"] * PAGE_SIZE:(cmd["page"] + 1) * PAGE_SIZE]
                if os.preadv(fd, [view], 0) != PAGE_SIZE:
                    raise OSError("short O_DIRECT read")
                view.release()
                reply["fd"] = fd
            elif op == "direct_loop":          # a thread reading file pages with O_DIRECT
                fd = os.open(cmd["path"], os.O_RDONLY | os.O_DIRECT)   # into random pages,
                threading.Thread(target=_direct_loop, daemon=True,     # every interval, until exit
                                 args=(fd, s, cmd["file_pages"], cmd["interval"])).start()
            elif op == "balloon_loop":         # a thread punching pages and reading them
                threading.Thread(target=_balloon_loop, daemon=True,    # back, until exit
                                 args=(s, cmd["interval"])).start()
            elif op == "io_uring":             # an io_uring instance (io_uring_setup), kept
                params = ctypes.create_string_buffer(120)
                fd = libc.syscall(425, 4, params)
                if fd < 0:
                    raise OSError(ctypes.get_errno(), "io_uring_setup")
                reply["fd"] = fd
            elif op == "read":
                reply["data"] = ctypes.string_at(s.addr + cmd["page"] * PAGE_SIZE, 8).hex()
            elif op == "exit":
                print(json.dumps(reply), flush=True)
                break
            else:
                raise ValueError(f"unknown op {op}")
        except Exception as e:
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)
    for pid in forks:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
