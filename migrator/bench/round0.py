"""Round 0 of real migrations, end to end with the CLI, beside raw TCP measured in the same run.

Each run migrates, with `migrator migrate` in its own process (the code path users run) to
`migrator receive` in its own process (with a key: frames sealed, as users run it):
- a `migrator guest` (memfd RAM + 64 MiB private, random writes at 1 MB/s);
- a plain process holding a memfd of the same size, filled with random bytes (no userfaultfd,
  no stamps: the floor of what any target costs);
and reads round 0's bytes and duration from the migration's JSON report.  Two baselines are
measured in the same run:
- raw TCP: one `sendall` loop from a 1 MiB buffer into one `recv_into` loop, both in their own
  processes: two copies, both in cache (the issue's yardstick);
- raw memory->file: the same loops, but the sender sends a GiB of populated memory and the
  receiver writes each 4 MiB it gets at its place in a file of the output folder (pwrite, as the
  images are written): moving memory with no check at all, the floor of any migration over TCP.
Each run's ratios are to the baselines measured just before it.  The receiver writes to
/dev/shm (tmpfs: the stream, not the disk) or to a folder on disk (--out-dir); a session's
images are deleted after its run.

Before each migration the benchmark writes and releases as much fresh memory as the receiver is
about to allocate (bench/_frames.py): on this VM a physical frame the guest never used costs the
host ~3 s/GiB at its first touch, which a run would otherwise pay or not by chance.  Each run
prints what the warm-up cost; --cold-frames skips it.

It also counts CPU seconds per GiB moved: raw TCP's sender and receiver; migrator's sending
process during round 0 (`cpu_ms` of the round, every thread) and its receiver over the whole
session (from /proc/PID/stat).  Where the sender and the receiver share the machine's cores, as
here, the two divide the cores between them: raw TCP's CPU per GiB over migrator's is the
throughput ratio to expect when both are CPU-bound (raw TCP on loopback is not always: it can
run above it).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

from ..guest.launcher import start_guest
from ..guest.spec import GuestSpec
from ..guest.workloads import WorkloadSpec
from ..receiver_process import wait_port_file
from ..transport import DEFAULT_CHANNELS
from ..units import parse_size
from ._frames import warm_frames
from ._procs import stop_process
from .wire import _RAW_RECEIVER, _raw_tcp

KEY = b"bench-key-bench-key-bench-key-00"

# raw TCP of memory into a file: what moving a guest's memory costs with no check at all. The
# receiver takes 4 MiB at a time (recv_into) and writes each piece at its place in a file of
# the output folder (pwrite: the page cache is allocated as the image's is), one thread; the
# file goes once the sender has it acknowledged.
_RAW_FILE_RECEIVER = r"""
import os, socket, sys
out = sys.argv[1]
srv = socket.create_server(("127.0.0.1", 0)); print(srv.getsockname()[1], flush=True)
buf = bytearray(4 << 20); v = memoryview(buf)
while True:
    c, _ = srv.accept()
    total = int.from_bytes(c.recv(8, socket.MSG_WAITALL), "big")
    path = os.path.join(out, "raw-image")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    got = 0
    while got < total:
        n = c.recv_into(v, min(len(buf), total - got), socket.MSG_WAITALL)
        if not n: break
        os.pwrite(fd, v[:n], got)
        got += n
    c.sendall(b"k"); c.close()
    os.close(fd); os.unlink(path)
"""


def _raw_memory_tcp(port: int, mem: mmap.mmap) -> float:
    """B/s of sending all of mem (memory the sender reads page by page, not a buffer hot in
    cache) to the raw file receiver, which lands it in a file."""
    view = memoryview(mem)
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:
            t0 = time.perf_counter()
            s.sendall(len(mem).to_bytes(8, "big"))
            for off in range(0, len(mem), 4 << 20):
                s.sendall(view[off:off + (4 << 20)])
            s.recv(1)
            return len(mem) / (time.perf_counter() - t0)
    finally:
        view.release()


def _source_memory(size: int) -> mmap.mmap:
    """size bytes of private memory filled with random data (16 MiB repeated)."""
    mem = mmap.mmap(-1, size)
    chunk = os.urandom(1 << 24)
    for off in range(0, size, len(chunk)):
        mem[off:off + min(len(chunk), size - off)] = chunk[:min(len(chunk), size - off)]
    return mem

# a process with a memfd of N bytes of random data, mapped shared (named bench-memfd), idle
_MEMFD_PROCESS = r"""
import mmap, os, sys, time
n = int(sys.argv[1])
fd = os.memfd_create("bench-memfd", os.MFD_CLOEXEC)
os.ftruncate(fd, n)
m = mmap.mmap(fd, n, mmap.MAP_SHARED)
chunk = os.urandom(1 << 24)
for off in range(0, n, len(chunk)):
    m[off:off + min(len(chunk), n - off)] = chunk[:min(len(chunk), n - off)]
print("ready", flush=True)
while True:
    time.sleep(60)
"""


def register(sub) -> None:
    p = sub.add_parser("round0", help="round 0 of real CLI migrations vs raw TCP (guest and plain memfd)")
    p.add_argument("--size", default="1G", help="shared memory of each target (default 1G)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--channels", type=int, default=DEFAULT_CHANNELS,
                   help=f"default {DEFAULT_CHANNELS}, as migrate's")
    p.add_argument("--targets", default="guest,memfd", help="which of guest,memfd (default both)")
    p.add_argument("--out-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                   help="where the receiver writes (default /dev/shm; a disk folder such as "
                        "/var/tmp measures the disk-backed receiver)")
    p.add_argument("--compress", default="auto", choices=["auto", "zstd", "lz4", "none"])
    p.add_argument("--cold-frames", action="store_true",
                   help="do not warm the frames the receiver allocates before each migration "
                        "(see bench/_frames.py: on a lazily backed VM a run then pays the host's "
                        "first touch of fresh memory, or not, by chance)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.set_defaults(handler=run)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "migrator", *args]


def _migrate(pid: int, regions: list[str], port: int, key_file: str, channels: int,
             compress: str, report: str) -> dict:
    cmd = _cli("migrate", "--pid", str(pid), *[x for r in regions for x in ("--region", r)],
               "--to", f"127.0.0.1:{port}", "--key-file", key_file, "--channels", str(channels),
               "--compress", compress, "--downtime-limit", "1000", "--json", report)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise SystemExit(f"migration failed ({p.returncode}): {p.stderr.strip()[-800:]}")
    with open(report) as f:
        return json.load(f)


def _round0(rep: dict) -> tuple[float, int]:
    r0 = rep["per_round"][0]
    return r0["bytes"] / (r0["duration_ms"] / 1000), r0["bytes"]


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) process pid has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_during(pid: int, fn: Callable[[], object]) -> tuple[object, float]:
    """fn()'s result, and the CPU seconds process pid used meanwhile."""
    c0 = _cpu_s(pid)
    out = fn()
    return out, _cpu_s(pid) - c0


def _drop_images(folder: str) -> None:
    """Delete a finished session's image files: a GiB of tmpfs each, which this machine's
    proactive reclaim (DAMON, paging out unmapped page cache) would otherwise push to swap
    during later runs, compressing incompressible pages on the cores being measured."""
    for name in os.listdir(folder):
        if not name.startswith("manifest"):
            os.unlink(os.path.join(folder, name))


def _start_targets(targets: list[str], size: int, procs: dict[str, object]) -> None:
    """The targets started into procs: the guest (random writes at 1 MB/s) and the memfd process."""
    if "guest" in targets:
        g = start_guest(GuestSpec(shared_ram=size, anon_ram=64 << 20,
                                  workload=WorkloadSpec(kind="random", rate=1e6, seed=1)))
        procs["guest"] = g
    if "memfd" in targets:
        m = subprocess.Popen([sys.executable, "-c", _MEMFD_PROCESS, str(size)],
                             stdout=subprocess.PIPE, text=True)
        if m.stdout.readline().strip() != "ready":
            raise SystemExit("the memfd process did not start")
        procs["memfd"] = m


def _stop_all(rig: "_Rig") -> None:
    """The targets, then the receivers stopped; the work dir removed."""
    raw, rx = rig.raw, rig.rx
    for name, p in rig.procs.items():
        if name == "guest":
            p.stop()
        else:
            p.kill()
            p.wait()
    for p in (raw, rig.raw_file, rx):
        if p is not None:
            stop_process(p, signal.SIGINT if p is rx else signal.SIGTERM, 10)
    if rig.memory is not None:
        rig.memory.close()
    shutil.rmtree(rig.work, ignore_errors=True)


@dataclass
class _Rig:
    """What every run uses: the work dir and key, the raw TCP receivers (cache to cache, and
    memory into a file, with the memory it sends) and migrator's receiver (processes and
    ports), and the targets' processes."""
    work: str
    key_file: str
    raw: subprocess.Popen
    rx: subprocess.Popen
    raw_file: subprocess.Popen | None = None
    memory: mmap.mmap | None = None
    procs: dict[str, object] = field(default_factory=dict)
    raw_port: int = 0
    raw_file_port: int = 0
    port: int = 0
    warm_s_per_gib: list[float] = field(default_factory=list)   # each warm-up's cost


def _one_run(i: int, args: argparse.Namespace, targets: list[str], size: int, rig: _Rig,
             results: dict[str, list[float]], cpu: dict[str, dict[str, list[float]]]) -> None:
    """One measured run: the two baselines, then each target's migration (its round 0); appended to
    results (B/s) and cpu (CPU s per GiB, each side); its line printed."""
    procs, port, key_file = rig.procs, rig.port, rig.key_file
    gib = size / (1 << 30)

    def baseline(key: str, receiver: subprocess.Popen, send: Callable[[], float]) -> float:
        t0 = time.thread_time()
        bps, rx_cpu = _cpu_during(receiver.pid, send)
        cpu[key]["sender"].append((time.thread_time() - t0) / gib)
        cpu[key]["receiver"].append(rx_cpu / gib)
        results[key].append(bps)
        return bps

    bps = baseline("raw_tcp", rig.raw, lambda: _raw_tcp(rig.raw_port, size))
    line = f"  run {i + 1}: raw TCP {bps / 1e6:6.0f} MB/s"
    if not args.cold_frames:
        warm_frames(size + (256 << 20))
    bps = baseline("raw_memory", rig.raw_file, lambda: _raw_memory_tcp(rig.raw_file_port, rig.memory))
    line += f"   raw memory->file {bps / 1e6:6.0f} MB/s"
    for t in targets:
        report = os.path.join(rig.work, f"{t}.json")
        if t == "guest":
            g = procs["guest"]
            a = g.regions["anon"]
            pid, regions = g.pid, [g.region("shared").name, f"{a.start:x}-{a.end:x}"]
        else:
            pid, regions = procs["memfd"].pid, ["bench-memfd"]
        if not args.cold_frames:        # the receiver's images and tables, and some slack
            rig.warm_s_per_gib.append(warm_frames(size + (256 << 20)))
        rep, rx_cpu = _cpu_during(rig.rx.pid, lambda: _migrate(
            pid, regions, port, key_file, args.channels, args.compress, report))
        _drop_images(os.path.join(rig.work, "images"))
        bps, nbytes = _round0(rep)
        results[t].append(bps)
        cpu[t]["sender"].append(rep["per_round"][0]["cpu_ms"] / 1000 / (nbytes / (1 << 30)))
        cpu[t]["receiver"].append(rx_cpu / (rep["transferred_bytes"] / (1 << 30)))
        line += f"   {t} round 0 {bps / 1e6:6.0f} MB/s ({bps / results['raw_tcp'][-1]:.2f}x)"
        if not args.cold_frames:
            line += f" [warm-up {rig.warm_s_per_gib[-1]:.2f} s/GiB]"
    print(line, flush=True)


def _summary(results: dict[str, list[float]], cpu: dict[str, dict[str, list[float]]]) -> dict:
    """The summary printed (min / median MB/s against raw TCP, CPU seconds per GiB) and returned."""
    summary: dict = {k: {"min_Bps": min(v), "median_Bps": statistics.median(v), "runs": v}
                     for k, v in results.items()}
    print("summary (min / median MB/s; median / raw TCP median; each run / its own raw TCP, "
          "min / median):")
    raw_runs, floor_runs = results["raw_tcp"], results["raw_memory"]
    for k, v in summary.items():
        ratio = v["median_Bps"] / summary["raw_tcp"]["median_Bps"]
        v["ratio_to_raw"] = ratio
        line = f"  {k:10s} {v['min_Bps'] / 1e6:7.0f} / {v['median_Bps'] / 1e6:7.0f}   {ratio:.2f}x"
        if k != "raw_tcp":
            # raw TCP itself moves by 2x from minute to minute on a shared host: each run's
            # ratio to the raw TCP measured just before it shares that run's conditions
            paired = [x / r for x, r in zip(v["runs"], raw_runs)]
            v["paired_ratios"] = paired
            line += f"   per run {min(paired):.2f} / {statistics.median(paired):.2f}"
        if k not in ("raw_tcp", "raw_memory"):
            to_floor = [x / r for x, r in zip(v["runs"], floor_runs)]
            v["paired_ratios_to_raw_memory"] = to_floor
            line += (f"   (target >= 0.60, issue 16); / raw memory->file per run "
                     f"{min(to_floor):.2f} / {statistics.median(to_floor):.2f}")
        print(line)
    print("CPU seconds per GiB moved (median; sender: round 0, receiver: the whole session):")
    raw_cpu = None
    for k, v in cpu.items():
        med = {side: statistics.median(x) for side, x in v.items()}
        summary[k]["cpu_s_per_gib"] = med
        total = med["sender"] + med["receiver"]
        if k == "raw_tcp":
            raw_cpu = total
            print(f"  {k:10s} sender {med['sender']:.2f}  receiver {med['receiver']:.2f}  total {total:.2f}")
        else:
            bound = raw_cpu / total if raw_cpu and total else 0.0
            summary[k]["cpu_ratio"] = bound
            print(f"  {k:10s} sender {med['sender']:.2f}  receiver {med['receiver']:.2f}  total {total:.2f}"
                  f"   CPU ratio raw / this = {bound:.2f}")
    return summary


def run(args: argparse.Namespace) -> int:
    size = parse_size(args.size)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in targets if t not in ("guest", "memfd")]
    if bad:
        raise SystemExit(f"unknown target(s) {bad}: guest, memfd")
    work = tempfile.mkdtemp(prefix="migrator-bench-round0-", dir=args.out_dir)
    os.chmod(work, 0o700)
    key_file = os.path.join(work, "key")
    with open(key_file, "wb") as f:
        f.write(KEY)
    print(f"round 0 benchmark: {size >> 20} MiB targets {', '.join(targets)}, {args.runs} runs, "
          f"{args.channels} channel(s), --compress {args.compress}, receiver writing to {work}",
          flush=True)
    raw = subprocess.Popen([sys.executable, "-c", _RAW_RECEIVER], stdout=subprocess.PIPE, text=True)
    raw_out = os.path.join(work, "raw")
    os.mkdir(raw_out, 0o700)
    raw_file = subprocess.Popen([sys.executable, "-c", _RAW_FILE_RECEIVER, raw_out],
                                stdout=subprocess.PIPE, text=True)
    rx = subprocess.Popen(_cli("receive", "--listen", "127.0.0.1:0", "--out", os.path.join(work, "images"),
                               "--key-file", key_file, "--port-file", os.path.join(work, "port")),
                          stdout=subprocess.DEVNULL)
    rig = _Rig(work, key_file, raw, rx, raw_file)
    results: dict[str, list[float]] = {"raw_tcp": [], "raw_memory": [], **{t: [] for t in targets}}
    # CPU seconds per GiB: raw TCP's two sides, and each target's sender (round 0) and receiver
    cpu: dict[str, dict[str, list[float]]] = {k: {"sender": [], "receiver": []} for k in results}
    try:
        rig.raw_port = int(raw.stdout.readline())
        rig.raw_file_port = int(raw_file.stdout.readline())
        rig.memory = _source_memory(size)
        rig.port = wait_port_file(os.path.join(work, "port"), rx)
        _start_targets(targets, size, rig.procs)
        for i in range(args.runs):
            _one_run(i, args, targets, size, rig, results, cpu)
    finally:
        _stop_all(rig)
    summary = _summary(results, cpu)
    if rig.warm_s_per_gib:
        w = rig.warm_s_per_gib
        print(f"frames warmed before each migration: {min(w):.2f} / {statistics.median(w):.2f} / "
              f"{max(w):.2f} s/GiB (min / median / max; ~0.7 when the host backs them already, "
              f"~3 on its first touch: see bench/_frames.py)")
    summary.update(size=size, channels=args.channels, out_dir=args.out_dir, compress=args.compress,
                   cpus=os.cpu_count(), cold_frames=args.cold_frames,
                   warm_s_per_gib=rig.warm_s_per_gib)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0
