"""Wire benchmark: raw TCP loopback throughput beside sender → receiver page throughput,
measured in the same run, receiver in its own process.  Source memories (memfds): random pages;
zero-heavy (1 page in 64 holds data, the others were written with zeros); untouched (the same,
but the zero pages were never written: holes, as in a guest's untouched RAM).

Before each session the benchmark writes and releases as much fresh memory as the receiver is
about to allocate (bench/_frames.py): on this VM the host backs guest memory on its first touch
(~3 s/GiB), and a session whose receiver got never-used frames ran 3x slower than the next one.
--cold-frames skips it."""

from __future__ import annotations

import argparse
import fcntl
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

import trio

from ..transport._native import ffi, lib
from ..kernel.maps import read_maps, select_regions
from ..precopy.source import SourceMemory
from ..receiver_process import wait_port_file
from ..transport import DEFAULT_CHANNELS, RegionSpec, connect_sender
from ..units import parse_size
from ._frames import warm_frames
from ._procs import stop_process

PS = 4096
KEY = b"bench-key-bench-key-bench-key-00"

_RAW_RECEIVER = r"""
import socket, sys
srv = socket.create_server(("127.0.0.1", 0)); print(srv.getsockname()[1], flush=True)
while True:
    c, _ = srv.accept()
    total = int.from_bytes(c.recv(8, socket.MSG_WAITALL), "big")
    buf = bytearray(1 << 20); v = memoryview(buf); got = 0
    while got < total:
        n = c.recv_into(v)
        if not n: break
        got += n
    c.sendall(b"k"); c.close()
"""

_RECEIVER = r"""
import sys
import migrator.cli as c
sys.exit(c.main(sys.argv[1:]))
"""


def register(sub) -> None:
    p = sub.add_parser("wire", help="page streaming throughput vs raw TCP on loopback")
    p.add_argument("--size", default="1G", help="bytes of memory per run (default 1G: a small guest)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--channels", type=int, default=DEFAULT_CHANNELS,
                   help=f"default {DEFAULT_CHANNELS}, as migrate's")
    p.add_argument("--reader", choices=("mapped", "pread"), default="mapped",
                   help="how the source reads its memfd: from a mapping (sealed memfd, as QEMU's "
                        "RAM; the default) or with pread (unsealed)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--out-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                   help="where the receiver writes its images (default /dev/shm: measure the "
                        "stream, not the disk)")
    p.add_argument("--no-preallocate", dest="preallocate", action="store_false",
                   help="do not have the receiver preallocate its images")
    p.add_argument("--cold-frames", action="store_true",
                   help="do not warm the frames each session's receiver allocates (see "
                        "bench/_frames.py)")
    p.set_defaults(handler=run)


def _raw_tcp(port: int, size: int) -> float:
    buf = memoryview(os.urandom(1 << 20))
    with socket.create_connection(("127.0.0.1", port)) as s:
        t0 = time.perf_counter()
        s.sendall(size.to_bytes(8, "big"))
        left = size
        while left:
            n = min(left, len(buf))
            s.sendall(buf[:n])
            left -= n
        s.recv(1)
        return size / (time.perf_counter() - t0)


class _Memory:
    """The benchmark's source memory: a memfd mapped in this process, read by the real source
    (precopy.source.SourceMemory, through /proc/self/map_files) as it reads a guest's RAM.
    Sealed against shrinking (as QEMU seals its memfd RAM) the sender packs pages straight from
    a mapping of it; unsealed, it reads them with pread first (reader "pread")."""

    def __init__(self, name: str, content: bytes, sealed: bool, holes: bool = False):
        self.size = len(content)
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, self.size)
        self.map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED)
        if holes:     # zero pages never written: holes of the memfd, as untouched guest RAM
            view = memoryview(content)
            for p in range(0, self.size, PS):
                if any(view[p:p + PS]):
                    os.pwrite(self.fd, view[p:p + PS], p)
        else:
            self.map[:] = content
        if sealed:
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.region = select_regions(read_maps(os.getpid()), [name])[0]
        self.source = SourceMemory(os.getpid(), [self.region])
        # read with pread: a read through the mapping would fill the holes
        self.digest = self.source.digest(self.region.name)

    def close(self) -> None:
        self.source.close()
        self.map.close()
        os.close(self.fd)


def _bare_zero_scan(mem: _Memory) -> float:
    """Bytes/s of the bare zero-page test over the memory (one thread, C, through the source's
    own mapping): the ceiling of streaming zero-heavy memory, which must read every byte."""
    view = mem.source.mapped(mem.region.name)
    if view is None:
        return 0.0
    with ffi.from_buffer(view) as buf:
        t0 = time.perf_counter()
        lib.mg_count_zero_pages(buf, mem.size // PS, PS)
        return mem.size / (time.perf_counter() - t0)


def _rss_peak_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _session(args: argparse.Namespace, port: int, mem: _Memory, rx_pid: int, key: bytes | None = KEY,
             encrypt: bool = False, compress: str = "none") -> tuple[float, int, int]:
    """One timed session (see _pages), after warming the frames its receiver will allocate."""
    if not args.cold_frames:
        warm_frames(mem.size + (256 << 20))
    return trio.run(_pages, port, mem, args.channels, rx_pid, key, encrypt, compress)


async def _pages(port: int, mem: _Memory, channels: int, rx_pid: int, key: bytes | None = KEY,
                 encrypt: bool = False, compress: str = "none") -> tuple[float, int, int]:
    npages = mem.size // PS
    name = mem.region.name
    region = RegionSpec(name, 0, mem.size)
    async with connect_sender("127.0.0.1", port, key=key, regions=[region], channels=channels,
                              encrypt=encrypt, compress=compress) as s:
        # the stream, not the session set-up: its batch buffers are faulted in by then (a
        # migration overlaps that with its own set-up)
        await trio.to_thread.run_sync(s.buffers_ready.wait, 5.0)
        t0 = time.perf_counter()
        await s.send_pages({name: [(0, npages)]}, mem.source, 0)
        await s.end_round(0)
        dt = time.perf_counter() - t0
        rss = _rss_peak_kib(rx_pid)
        res = await s.finish({name: mem.digest})
        if not res.complete:
            raise SystemExit("benchmark migration did not verify")
        wire_bytes = s.statistics().transferred_bytes
    return mem.size / dt, rss, wire_bytes


def _sources(size: int, sealed: bool) -> tuple[dict[str, _Memory], _Memory]:
    """The memfds migrated: random pages, zero-heavy (1 page in 64 holds data), the same with
    the zero pages never written (holes), and text pages (stamped, compressible)."""
    random_mem = os.urandom(size)
    zero_mem = bytearray(size)
    for p in range(0, size // PS, 64):          # 1 page in 64 holds data
        zero_mem[p * PS:(p + 1) * PS] = random_mem[p * PS:(p + 1) * PS]
    from ..guest.stamp import WRITER_VCPU, stamp_page, writer_id
    text_writer = writer_id(WRITER_VCPU, "text")
    text_mem = b"".join(stamp_page(1, text_writer, i, 1) for i in range(size // PS))
    text = _Memory("bench-text", text_mem, sealed)
    del text_mem
    sources = {"random": _Memory("bench-random", random_mem, sealed),
               "zero_heavy": _Memory("bench-zero-heavy", bytes(zero_mem), sealed),
               "untouched": _Memory("bench-untouched", bytes(zero_mem), sealed, holes=True)}
    del random_mem, zero_mem
    return sources, text


def _receiver(out: str, sub: str, key_file: str | None, preallocate: bool) -> subprocess.Popen:
    """`migrator receive` writing to out/sub, its port in out/sub.port; keyed if key_file."""
    return subprocess.Popen([sys.executable, "-c", _RECEIVER, "receive", "--listen", "127.0.0.1:0",
                             "--out", os.path.join(out, sub), "--port-file", os.path.join(out, sub + ".port")]
                            + (["--key-file", key_file] if key_file else [])
                            + (["--preallocate"] if preallocate else []),
                            stdout=subprocess.DEVNULL)


def _one_run(i: int, args: argparse.Namespace, size: int, sources: dict[str, _Memory], text: _Memory,
             ports: dict[str, int], rx: subprocess.Popen, rx_plain: subprocess.Popen,
             results: dict[str, list[float]], rss_kib: list[int]) -> None:
    """One measured run, in this order: raw TCP, the bare zero scan, each source sealed, random
    pages unsealed, encrypted and with --compress auto, text pages without and with it; its line printed."""
    rx_port = ports["rx"]
    results["raw_tcp"].append(_raw_tcp(ports["raw"], size))
    results["bare_zero_scan"].append(_bare_zero_scan(sources["zero_heavy"]))
    for kind, mem in sources.items():
        bw, rss, _ = _session(args, rx_port, mem, rx.pid)
        results[kind].append(bw)
        rss_kib.append(rss)
    bw, _, _ = _session(args, ports["plain"], sources["random"], rx_plain.pid, None)
    results["random_unsealed"].append(bw)
    bw, _, _ = _session(args, rx_port, sources["random"], rx.pid, KEY, True)
    results["random_encrypted"].append(bw)
    # --compress auto on this fast link: it must find compressing not worth it
    bw, _, _ = _session(args, rx_port, sources["random"], rx.pid, KEY, False, "auto")
    results["random_auto"].append(bw)
    for kind, comp in (("text", "none"), ("text_auto", "auto")):
        bw, _, _ = _session(args, rx_port, text, rx.pid, KEY, False, comp)
        results[kind].append(bw)
    print(f"  run {i + 1}: raw TCP {results['raw_tcp'][-1] / 1e6:6.0f} MB/s   "
          f"random pages {results['random'][-1] / 1e6:6.0f} MB/s "
          f"(unsealed {results['random_unsealed'][-1] / 1e6:.0f}, "
          f"encrypted {results['random_encrypted'][-1] / 1e6:.0f}, "
          f"compress auto {results['random_auto'][-1] / 1e6:.0f})   "
          f"text {results['text'][-1] / 1e6:6.0f} MB/s (compress auto "
          f"{results['text_auto'][-1] / 1e6:.0f})   "
          f"zero-heavy {results['zero_heavy'][-1] / 1e6:6.0f} MB/s   "
          f"untouched {results['untouched'][-1] / 1e6:6.0f} MB/s", flush=True)


def _summary(args: argparse.Namespace, size: int, results: dict[str, list[float]], rss_kib: list[int]) -> dict:
    """The summary printed (min / median MB/s, the ratios against their targets, the receiver's
    peak RSS) and returned."""
    def mm(xs):
        return min(xs), statistics.median(xs)
    summary = {k: {"min_Bps": mm(v)[0], "median_Bps": mm(v)[1], "runs": v} for k, v in results.items()}
    ratio = summary["random"]["median_Bps"] / summary["raw_tcp"]["median_Bps"]
    zratio = summary["zero_heavy"]["median_Bps"] / summary["random"]["median_Bps"]
    uratio = summary["untouched"]["median_Bps"] / summary["random"]["median_Bps"]
    sealed = summary["random"]["median_Bps"] / summary["random_unsealed"]["median_Bps"]
    encrypted = summary["random_encrypted"]["median_Bps"] / summary["random_unsealed"]["median_Bps"]
    auto_random = summary["random_auto"]["median_Bps"] / summary["random"]["median_Bps"]
    auto_text = summary["text_auto"]["median_Bps"] / summary["text"]["median_Bps"]
    summary.update(ratio_sealed_to_unsealed=sealed, ratio_encrypted_to_unsealed=encrypted,
                   ratio_auto_to_none_random=auto_random, ratio_auto_to_none_text=auto_text)
    summary.update(ratio_random_to_raw=ratio, ratio_zero_to_random=zratio,
                   ratio_untouched_to_random=uratio,
                   receiver_peak_rss_kib=max(rss_kib), size=size, channels=args.channels,
                   reader=args.reader, cold_frames=args.cold_frames)
    print("summary (min / median MB/s):")
    for k in results:
        print(f"  {k:14s} {summary[k]['min_Bps'] / 1e6:8.0f} / {summary[k]['median_Bps'] / 1e6:8.0f}")
    paired = [x / r for x, r in zip(results["random"], results["raw_tcp"])]
    summary["paired_ratios_random_to_raw"] = paired
    print(f"  random / raw TCP   = {ratio:.2f}  (target >= 0.75, issue 16); each run / its own raw "
          f"TCP: min {min(paired):.2f}, median {statistics.median(paired):.2f}")
    print(f"  sealed / unsealed  = {sealed:.2f}  (every frame authenticated, the default with a "
          f"key; target >= 0.80)")
    print(f"  encrypted / unsealed = {encrypted:.2f}  (--encrypt)")
    print(f"  compress auto / none = {auto_random:.2f} random pages, {auto_text:.2f} text pages "
          f"(a fast link: target >= 0.95)")
    print(f"  zero-heavy / random = {zratio:.1f}x (target >= 10x; 63 of 64 pages written zeros)")
    print(f"  untouched / random  = {uratio:.1f}x (the same, zero pages never written: memfd holes)")
    if summary["bare_zero_scan"]["median_Bps"]:
        scan = summary["zero_heavy"]["median_Bps"] / summary["bare_zero_scan"]["median_Bps"]
        summary["ratio_zero_to_bare_scan"] = scan
        print(f"  zero-heavy / bare zero scan = {scan:.2f} (the scan reads every byte: memory bandwidth)")
    print(f"  receiver peak RSS  = {max(rss_kib) / 1024:.1f} MiB for {size >> 20} MiB regions")
    return summary


def run(args: argparse.Namespace) -> int:
    size = parse_size(args.size) // PS * PS
    print(f"wire benchmark: {size >> 20} MiB per run, {args.runs} runs, {args.channels} channel(s), "
          f"random pages sealed (key: the default), unsealed (no key) and encrypted, "
          f"source memfd read {'from a mapping' if args.reader == 'mapped' else 'with pread'}, "
          f"receiver in its own process, loopback", flush=True)
    sources, text = _sources(size, args.reader == "mapped")
    out = tempfile.mkdtemp(prefix="migrator-bench-", dir=args.out_dir)
    key_file = os.path.join(out, "key")
    with open(key_file, "wb") as f:
        f.write(KEY)
    raw = subprocess.Popen([sys.executable, "-c", _RAW_RECEIVER], stdout=subprocess.PIPE, text=True)
    # a receiver with the key (frames sealed: the default "mac", and --encrypt), and one
    # without a key (loopback only: nothing sealed), for the price of sealing in the same run
    rx = _receiver(out, "images", key_file, args.preallocate)
    rx_plain = _receiver(out, "images-plain", None, args.preallocate)
    results: dict[str, list[float]] = {"raw_tcp": [], "random": [], "random_unsealed": [],
                                       "random_encrypted": [], "random_auto": [], "text": [],
                                       "text_auto": [], "zero_heavy": [], "untouched": [],
                                       "bare_zero_scan": []}
    rss_kib: list[int] = []
    try:
        ports = {"raw": int(raw.stdout.readline()),
                 "rx": wait_port_file(os.path.join(out, "images.port"), rx),
                 "plain": wait_port_file(os.path.join(out, "images-plain.port"), rx_plain)}
        for i in range(args.runs):
            _one_run(i, args, size, sources, text, ports, rx, rx_plain, results, rss_kib)
    finally:
        for p in (raw, rx, rx_plain):
            stop_process(p, signal.SIGINT if p is rx else signal.SIGTERM, 5)
        shutil.rmtree(out, ignore_errors=True)
        for m in sources.values():
            m.close()
        text.close()
    summary = _summary(args, size, results, rss_kib)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0
