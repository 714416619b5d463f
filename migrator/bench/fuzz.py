"""Fuzzer against LIVE `migrator receive` processes: >= 1M mutated inputs (connections and
frames).  By default two receivers, one with a key (frames sealed: mutations are sealed too, so
they pass the AES-GCM tag and reach the parser) and one without (raw bytes straight to the
parser), each started as `migrator receive --listen 127.0.0.1:0 --out DIR [--key-file F]`.

Inputs, each counted once (a connection, or a frame that reached the receiver's parser):
- pre-auth connections (`conn`): random bytes, mutated HELLOs, crafted headers (oversized
  claims, every type byte, bad lengths), truncated frames, HELLO+AUTH(+SETUP) pipelined blind,
  valid frames of the wrong type; closed with an EOF (the receiver must answer and close) or a
  reset; `auth`: a real HELLO/CHALLENGE exchange, then a mutated AUTH (with a key: a flipped,
  reflected, truncated, wrong-mode or wrong-channel proof: any WELCOME for a proof that is not
  the right one is an authentication bypass); `slow`: a prefix, then silence (the 5 s handshake
  timeout must close it).  Source addresses 127.0.0.2.. (at most 8 pending per address);
- `setup`: a handshake, then one SETUP, mutated or at a limit (names, ranges, page sizes,
  channel counts, codecs, duplicates, 1024/1025 regions, beyond 1 TiB, beyond --max-memory);
- `session`: a handshake, a valid SETUP, then frames on 1-3 channels: a prefix of valid-but-odd
  BATCH/PREPARE/ROUND_END (random runs and rounds, overlapping, repeated, stale, zero-only,
  maximal run counts and sizes, compressed when the session allows it) pipelined, then mutated
  frames at random (bit flips in header, meta and data; msgpack-level mutations of values,
  types, keys and lengths, with the batch hash and data re-fitted so they get past the hash
  check; deep nesting; huge containers; non-canonical encodings; boundary values; wrong frame
  types for the state; duplicates; truncations; decompression bombs).  After each mutated frame
  a ROUND_END marker tells whether it was accepted (ROUND_ACK) or refused (ERROR); the first
  refused one ends the session.  A session that survives ends with END and the digests of a
  model of the receiver's page stamps (or wrong ones, or just goes away).

Checks, per receiver:
- crash: the process died (exit status or signal, the innermost exception of its stderr);
- hang: at each checkpoint (every --checkpoint inputs, all fuzz connections closed), a fresh
  small migration (connect_sender, 16 pages, END, RESULT verified) within 5 s;
- stuck connection: no answer or close within --io-timeout (3 in a phase end it: the probe
  judges);
- leaks: VmRSS after the warm-up (the first phase) vs the end, judged against the highest
  checkpoint of the run's first half (failed sessions' buffers wait for the cyclic garbage
  collector, so RSS floats); descriptors and busy threads (not trio's idle cached workers)
  after the warm-up vs the end; the peak RSS of each phase (VmHWM, reset at checkpoints)
  against --max-memory + --peak-margin-mib;
- "unexpected" (protocol oracles): a valid frame or SETUP refused, a frame or SETUP the
  protocol forbids accepted (a batch out of its region, an oversized run list...), a clean
  session that does not verify or a wrong digest that does, a WELCOME for a wrong proof, a
  malformed answer.

Deterministic inputs: each worker draws from random.Random(seed, phase, worker).  The inputs
are kept in a ring buffer per receiver; on a crash, hang or leak they are written to a
JSON-lines file in --findings-dir.  After a crash the inputs in flight and those that just
ended are replayed one by one against a fresh receiver to find one that reproduces it alone
(`--replay FILE` does it by hand); its mutation kind is then quarantined for the rest of the run
and the dead receiver restarted, so the run goes on finding other things (`--skip` leaves out
kinds known to crash, until fixed).  SIGTERM (or SIGINT) stops fuzzing early and still checks
and reports.  Exit status 0 only without any finding.
"""

from __future__ import annotations

import argparse
import array
import collections
import dataclasses
import inspect
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Awaitable, Callable

import msgpack
import trio
import xxhash

from ..errors import MigratorError, PeerReportedError, ProtocolError, TransportError, TruncatedFrameError
from ..receiver_process import START_WAIT, wait_port_file
from ..transport import RegionSpec, connect_sender, wire
from ..transport.auth import proof
from ..transport.digest import BufferReader
from ..transport.framing import FrameStream, PeerClosed
from ..transport.pagehash import page_hashes, zero_page_hash
from ..transport.seal import derive, transcript
from ._procs import state_letter, stop_process, thread_counts

try:        # batch compression (protocol extension; absent in older trees)
    from ..transport import compress as _compress
except ImportError:         # pragma: no cover
    _compress = None

KEY = b"fuzz-key-fuzz-key-fuzz-key-00000"
PS = 4096
PROBE_TIMEOUT = 5.0           # a fresh migration must complete within this (a hang otherwise)
HANDSHAKE_TIMEOUT = 5.0       # the receiver's (receiver.HANDSHAKE_TIMEOUT)
MARK_BASE = 1 << 29           # ROUND_END numbers used as markers (valid: < wire.MAX_ROUND)
IP_BIND_ADDRESS_NO_PORT = 24
RECENT = 3000                 # inputs kept per receiver for the findings file ...
RECENT_SESSIONS = 25          # ... of which sessions (with all their frames)
CODE = [""]                   # folder holding the snapshot of the migrator package receivers run
MAX_CHANNELS = [3]            # channels of a fuzz session at most (--max-channels)
MAX_TRIAGE = 80               # inputs replayed alone after a crash

_RECEIVER = r"""
import sys
import migrator.cli as c
sys.exit(c.main(sys.argv[1:]))
"""

HEADER = wire.HEADER
T = wire.T
_SETUP_FIELDS = {f.name for f in dataclasses.fields(wire.Setup)}
HAS_CODECS = (_compress is not None and "compress" in _SETUP_FIELDS and hasattr(wire, "MAX_CODEC")
              and "compression" in inspect.signature(wire.encode_batch).parameters)
CODECS = (1, 2) if HAS_CODECS else ()
HAS_DELTA = "delta" in _SETUP_FIELDS      # (delta batches: protocol version 6)
HAS_COMMIT = ("commit" in {f.name for f in dataclasses.fields(wire.End)} and hasattr(wire, "Commit")
              and hasattr(wire, "Synced"))       # (END -> RESULT -> SYNCED -> COMMIT)

INTERESTING_INTS = [0, 1, -1, 2, 3, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 127, 128, 255, 256, 1023,
                    1024, 1025, 4095, 4096, 4097, 8191, 8192, 8193, 16383, 16384, 16385, 65535,
                    65536, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, (2 << 20), (16 << 20),
                    (1 << 30) - 1, 1 << 30, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32,
                    1 << 40, (1 << 40) + 4096, (1 << 53) + 1, (1 << 62), (1 << 63) - 1, 1 << 63,
                    (1 << 64) - 1, -128, -129, -(1 << 31), -(1 << 63)]
PROTO_KEYS = ["v", "nonce", "session", "channel", "auth", "enc", "mac", "page_size", "channels",
              "regions", "compress", "delta", "images", "r", "n", "d", "z", "h", "c", "p", "digests",
              "complete", "verified", "message"]
REGION_NAMES = ["ram", "ram-hi", "vga.vram", "pc.rom", "[heap]", "guest ram", "rég-ü", "a"]


# --- small helpers ------------------------------------------------------------------------------


def frame(t: int, meta: Any, data: bytes = b"", **hdr) -> bytes:
    """A frame with meta packed by msgpack (header lengths right unless overridden; _Raw
    values spliced in as raw msgpack)."""
    return raw_frame(t, _splice_raw(msgpack.packb(meta, use_bin_type=True)), data, **hdr)


def deep(depth: int, kind: str = "list") -> "_Raw":
    """A value nested `depth` levels deep (lists or maps), as raw msgpack."""
    return _Raw((b"\x91" if kind == "list" else b"\x81\xa1a") * depth + b"\xc0")


def raw_frame(t: int, meta: bytes, data: bytes = b"", *, magic: bytes = wire.MAGIC,
              version: int = wire.VERSION, meta_len: int | None = None,
              data_len: int | None = None) -> bytes:
    return HEADER.pack(magic, version & 0xFF, t & 0xFF, len(meta) if meta_len is None else meta_len,
                       len(data) if data_len is None else data_len) + meta + data


async def drain(receive: Callable[[int], Awaitable[bytes]], into: bytearray | None = None,
                limit: int | None = None) -> None:
    """Read with receive (a trio socket's recv, a stream's receive_some) 64 KiB at a time until
    the peer closes or the connection fails, appending to `into` (None: dropped) until it holds
    over `limit` bytes.  Under the caller's timeout, `into` keeps what came before it."""
    while True:
        try:
            d = await receive(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        if not d:
            return
        if into is not None:
            into += d
            if limit is not None and len(into) > limit:
                return


def consistent(buf: bytes) -> bool:
    """The frame's header announces exactly its length (the receiver then reads nothing more)."""
    if len(buf) < wire.HEADER_SIZE:
        return False
    _, _, _, ml, dl = HEADER.unpack_from(buf)
    return len(buf) == wire.HEADER_SIZE + ml + dl


def norm_error(msg: str) -> str:
    """An error message with its numbers and quoted values generalised (for counting)."""
    msg = re.sub(r"sender \S+", "sender P", msg)
    msg = re.sub(r"'[^']{0,200}'|\"[^\"]{0,200}\"", "'…'", msg)
    msg = re.sub(r"\d+", "N", msg)
    return msg[:110]


def parse_plain(buf: bytes) -> list[tuple[str, Any]]:
    """The unsealed frames of a pre-auth answer: [(type name, meta)]; ('?', ...) if not frames."""
    out: list[tuple[str, Any]] = []
    pos = 0
    while pos < len(buf):
        if len(buf) - pos < wire.HEADER_SIZE:
            out.append(("?", "truncated header"))
            break
        magic, _, t, ml, dl = HEADER.unpack_from(buf, pos)
        if magic != wire.MAGIC:
            out.append(("?", "bad magic"))
            break
        meta = buf[pos + wire.HEADER_SIZE:pos + wire.HEADER_SIZE + ml]
        if len(meta) < ml:
            out.append(("?", "truncated meta"))
            break
        try:
            name = T(t).name
        except ValueError:
            name = f"type{t}"
        try:
            m = msgpack.unpackb(meta, raw=False)
        except Exception:
            m = None
        out.append((name, m))
        pos += wire.HEADER_SIZE + ml + dl
    return out


def jsonable(x: Any) -> Any:
    if isinstance(x, (bytes, bytearray, memoryview)):
        return {"hex": bytes(x).hex()}
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def unjson(x: Any) -> Any:
    if isinstance(x, dict):
        if set(x) == {"hex"}:
            return bytes.fromhex(x["hex"])
        return {k: unjson(v) for k, v in x.items()}
    if isinstance(x, list):
        return [unjson(v) for v in x]
    return x


def compress_data(codec: int, data: bytes) -> bytes:
    if codec == 1:
        import zstandard
        return zstandard.ZstdCompressor(level=1).compress(data)
    import lz4.block
    return lz4.block.compress(data, store_size=False)


_BOMBS: dict[tuple[int, int], bytes] = {}


def bomb(codec: int, nbytes: int) -> bytes:
    """nbytes of zeros compressed (zstd: streamed, the frame header declaring the size), cached."""
    key = (codec, nbytes)
    if key not in _BOMBS:
        if codec == 1:
            import zstandard
            co = zstandard.ZstdCompressor(level=1).compressobj(size=nbytes)
            zeros = bytes(1 << 20)
            parts, left = [], nbytes
            while left:
                n = min(left, len(zeros))
                parts.append(co.compress(zeros[:n]))
                left -= n
            parts.append(co.flush())
            _BOMBS[key] = b"".join(parts)
        else:
            _BOMBS[key] = compress_data(2, bytes(min(nbytes, 64 << 20)))
    return _BOMBS[key]


class Quarantine(set):
    """Mutation tags not to generate: those that crashed the receiver in this run (exact), and
    --skip substrings (any tag containing one)."""

    def __init__(self, skip=()):
        super().__init__()
        self.skip = tuple(skip)

    def __contains__(self, tag) -> bool:
        return set.__contains__(self, tag) or any(x in tag for x in self.skip)


class Budget:
    def __init__(self, n: int):
        self.left = n

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


# --- the receiver under test ------------------------------------------------------------------


def proc_sample(pid: int) -> dict:
    """VmRSS (KiB), open descriptors and threads of a process; busy_threads leaves out trio's
    idle cached workers ("Trio thread N"), which exit by themselves after 10 s."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads, idle = thread_counts(pid)
    return {"rss_kib": rss, "peak_kib": hwm, "fds": fds, "threads": threads,
            "busy_threads": threads - idle}


def reset_peak(pid: int) -> None:
    """Restart VmHWM from the current RSS (so each phase has its own peak)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class Target:
    """One `migrator receive` process (restarted after a crash or a hang: a new generation)."""

    def __init__(self, name: str, keyed: bool, root: str, max_memory: str, quiet: bool = False,
                 malloc_env: bool = False):
        self.name = name
        self.keyed = keyed
        self.key = KEY if keyed else None
        self.root = root
        self.max_memory = max_memory
        from ..units import parse_size
        self.max_memory_bytes = parse_size(max_memory)
        self.quiet = quiet
        # glibc: large blocks always mmapped and freed heap tops trimmed, so that VmRSS follows
        # the memory the receiver holds (not what its allocator keeps after peaks): leaks show
        self.env = dict(os.environ)
        if malloc_env:
            self.env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
        self.generation = 0
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log_tail: collections.deque = collections.deque(maxlen=200)
        self.log_lines = 0
        self.recent_small: collections.deque = collections.deque(maxlen=RECENT)
        self.recent_sessions: collections.deque = collections.deque(maxlen=RECENT_SESSIONS)
        self.count: collections.Counter = collections.Counter()
        self.errors: collections.Counter = collections.Counter()
        self.answers: collections.Counter = collections.Counter()
        self.outcomes: collections.Counter = collections.Counter()   # per mutation op: acc/rej
        self.checkpoints: list[dict] = []
        self.baseline: dict | None = None       # sampled after the warm-up (per generation)
        self.launch: dict | None = None
        self.generations: list[dict] = []
        self.reported = 0          # generation whose end was reported (crash or hang)
        self.phase_stuck = 0       # stuck connections in the current phase

    def remember(self, rec: dict) -> None:
        (self.recent_sessions if rec["kind"] == "session" else self.recent_small).append(rec)

    def recent(self) -> list[dict]:
        """The inputs kept, oldest first."""
        return sorted(list(self.recent_small) + list(self.recent_sessions), key=lambda r: r["t"])

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def start(self) -> None:
        self.generation += 1
        self.out = os.path.join(self.root, f"{self.name}-{self.generation}")
        os.makedirs(self.out, exist_ok=True)
        port_file = os.path.join(self.root, f"{self.name}-{self.generation}.port")
        cmd = [sys.executable, "-c", _RECEIVER, "receive", "--listen", "127.0.0.1:0", "--out",
               self.out, "--max-memory", self.max_memory, "--port-file", port_file]
        if self.keyed:
            key_file = os.path.join(self.root, "key")
            with open(key_file, "wb") as f:
                f.write(KEY)
            cmd += ["--key-file", key_file]
        self.stderr_path = os.path.join(self.root, f"{self.name}-{self.generation}.stderr")
        env = dict(self.env)
        if CODE[0]:      # the code this fuzzer runs, not whatever the tree holds by now (and
            # not from the current directory, which `python -c` puts first on sys.path)
            env["PYTHONPATH"] = os.pathsep.join([CODE[0]] + [x for x in
                                                 env.get("PYTHONPATH", "").split(os.pathsep) if x])
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env,
                                         cwd=self.root, stdin=subprocess.DEVNULL, text=True, bufsize=1)
        threading.Thread(target=self._drain, args=(self.proc,), daemon=True,
                         name=f"drain-{self.name}").start()
        try:
            self.port = wait_port_file(port_file, self.proc, START_WAIT, self.stderr_tail)
        except MigratorError as e:
            stop_process(self.proc, signal.SIGKILL, 5)
            raise SystemExit(f"fuzz: the {self.name} receiver did not start: {e}") from None
        self.launch = proc_sample(self.pid)
        reset_peak(self.pid)
        self.baseline = None
        self.generations.append({"generation": self.generation, "pid": self.pid,
                                 "port": self.port, "launch": self.launch})
        if not self.quiet:
            print(f"receiver {self.name} (generation {self.generation}): pid {self.pid} on "
                  f"127.0.0.1:{self.port}, {'key' if self.keyed else 'no key'}, "
                  f"--max-memory {self.max_memory}", flush=True)

    def _drain(self, proc: subprocess.Popen) -> None:
        """Read the receiver's log (a full pipe would block it)."""
        for line in proc.stdout:
            self.log_tail.append(line.rstrip("\n")[:500])
            self.log_lines += 1

    def stderr_tail(self, n: int = 4000) -> str:
        try:
            with open(self.stderr_path, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - n))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def death(self) -> dict:
        rc = self.proc.poll()
        sig = signal.Signals(-rc).name if rc is not None and rc < 0 else None
        tail = self.stderr_tail(20000)
        return {"returncode": rc, "signal": sig, "stderr_tail": tail[-6000:],
                "log_tail": list(self.log_tail)[-20:],
                "signature": crash_signature(tail, f"signal {sig}" if sig else f"exit {rc}")}

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGINT, 5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def clean_out(self) -> None:
        """Between sessions: remove the images of sessions past (fuzzed region names would
        otherwise pile up files)."""
        try:
            for name in os.listdir(self.out):
                if name.endswith(".img"):
                    os.unlink(os.path.join(self.out, name))
        except OSError:
            pass


def crash_signature(stderr: str, default: str) -> str:
    """The innermost exception of a traceback (ExceptionGroup boxes included) and where it was
    raised: 'RecursionError: ... | File "wire.py", line 407, in check_region_name'."""
    lines = [re.sub(r"^[\s|+]*", "", x) for x in stderr.splitlines()]
    exc = where = None
    for i, line in enumerate(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b", line) \
                and not line.startswith(("ExceptionGroup", "BaseExceptionGroup")):
            exc = line
            files = [x for x in lines[:i] if x.startswith("File ")]
            ours = [x for x in files if "/migrator/" in x]
            where = (ours or files or [None])[-1]
            if not line.startswith("During handling"):
                last = (exc, where)
    if exc is None:
        return default
    exc, where = last
    return (exc[:240] + (" | " + re.sub(r'File ".*/', 'File "', where) if where else ""))[:400]


# --- mutations --------------------------------------------------------------------------------

_PLACEHOLDER = b"\xfe\xfd\xfc\xfb" * 4   # spliced out of packed meta and replaced by raw bytes


class _Raw(msgpack.ExtType):
    """Raw msgpack bytes to splice into a packed meta (packed as ext 42 + marker, then replaced)."""

    def __new__(cls, raw: bytes):
        self = super().__new__(cls, 42, b"\xfa\xfb\xfc\xfd" + raw)
        return self


def _splice_raw(mb: bytes) -> bytes:
    """Replace every _Raw placeholder in packed bytes by its raw bytes."""
    while True:
        i = mb.find(b"*\xfa\xfb\xfc\xfd")     # (ext type 42 = 0x2a, then the marker)
        if i < 0:
            return mb
        # the ext header precedes: fixext (d4..d8), ext8 (c7 n), ext16 (c8 nn), ext32 (c9 nnnn)
        if mb[i - 1] in (0xD4, 0xD5, 0xD6, 0xD7, 0xD8):
            start = i - 1
            size = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}[mb[i - 1]]
        elif i >= 2 and mb[i - 2] == 0xC7:
            start, size = i - 2, mb[i - 1]
        elif i >= 3 and mb[i - 3] == 0xC8:
            start, size = i - 3, int.from_bytes(mb[i - 2:i], "big")
        elif i >= 5 and mb[i - 5] == 0xC9:
            start, size = i - 5, int.from_bytes(mb[i - 4:i], "big")
        else:
            return mb
        raw = mb[i + 5:i + 1 + size]
        mb = mb[:start] + raw + mb[i + 1 + size:]


class Mut:
    """Mutations of frames and of msgpack values, from one random.Random."""

    def __init__(self, rng: random.Random, quarantine: set[str]):
        self.rng = rng
        self.quarantine = quarantine

    # values

    def value(self) -> Any:
        r = self.rng
        k = r.random()
        if k < 0.33:
            v = r.choice(INTERESTING_INTS)
            return v + r.choice((-1, 0, 0, 1)) if -(1 << 63) < v < (1 << 64) - 1 else v
        if k < 0.43:
            return r.choice((True, False, None))
        if k < 0.47:
            return r.choice((0.0, -1.5, 4096.0, 1e300, float("nan"), float("inf")))
        if k < 0.58:
            return r.choice(("", "a", "x" * r.choice((31, 32, 33, 255, 256, 1001)), "\x00", "ram\n",
                             "é" * 130, "\u202e", "../../etc/passwd", "0" * 32, "f" * 32,
                             "F" * 32, "\x7f", "ram/../x", "\ufeff"))
        if k < 0.68:
            return r.choice((b"", b"\x00", bytes(r.choice((1, 15, 16, 17, 31, 32, 33, 64))),
                             r.randbytes(r.choice((16, 32)))))
        if k < 0.84:
            n = r.choice((0, 1, 2, 3, 4, 5, 7, 16))
            return [self.value() if r.random() < 0.3 else r.choice(INTERESTING_INTS) for _ in range(n)]
        if k < 0.9:
            return r.choice(({}, {"a": 1}, {1: 2}, {"r": 0}, {b"k": None}))
        if k < 0.95:
            if r.random() < 0.3:     # the timestamp extension (-1), wrong length or not
                return _Raw(b"\xd6\xff" + r.randbytes(4) if r.random() < 0.5 else b"\xc7\x03\xff" + r.randbytes(3))
            return msgpack.ExtType(r.choice((0, 1, 127)), r.randbytes(r.choice((0, 4, 8, 12))))
        v: Any = r.choice((0, None, "x"))
        for _ in range(r.randint(2, 60)):
            v = [v]
        return v

    def big(self) -> Any:
        r = self.rng
        return r.choice((list(range(r.choice((16383, 16385, 20000)))), [0] * 40000,
                         "x" * r.choice((1001, 5000)), bytes(r.choice((5000, 70000))),
                         {str(i): i for i in range(3000)}, [[0, 1]] * 5000))

    # walking a value

    def walk(self, obj: Any, leaf: Callable[[], Any], path: str = "") -> tuple[Any, str]:
        """obj with one place changed: (new obj, path of the change)."""
        r = self.rng
        if isinstance(obj, dict) and obj and r.random() < 0.85:
            o = dict(obj)
            k = r.choice(list(o))
            op = r.choice(("into", "into", "into", "into", "replace", "delete", "add", "rename"))
            if op == "into":
                o[k], p = self.walk(o[k], leaf, f"{path}.{k}")
                return o, p
            if op == "replace":
                o[k] = leaf()
                return o, f"{path}.{k}"
            if op == "delete":
                del o[k]
                return o, f"{path}.-{k}"
            if op == "add":
                o[r.choice(PROTO_KEYS + ["", "x" * 300, b"k", 7])] = leaf()
                return o, f"{path}.+"
            o[r.choice(PROTO_KEYS)] = o.pop(k)
            return o, f"{path}.~{k}"
        if isinstance(obj, list) and obj and r.random() < 0.8:
            o = list(obj)
            i = r.randrange(len(o))
            op = r.choice(("into", "into", "into", "replace", "delete", "insert", "dup", "cut",
                           "grow", "swap"))
            if op == "into":
                o[i], p = self.walk(o[i], leaf, f"{path}[]")
                return o, p
            if op == "replace":
                o[i] = leaf()
            elif op == "delete":
                del o[i]
            elif op == "insert":
                o.insert(i, leaf())
            elif op == "dup":
                o.insert(i, o[i])
            elif op == "cut":
                del o[i:]
            elif op == "grow":
                o += o * r.choice((1, 2, 100))
            else:
                j = r.randrange(len(o))
                o[i], o[j] = o[j], o[i]
            return o, f"{path}[]{op}"
        if isinstance(obj, bool) and r.random() < 0.5:
            return int(obj), f"{path}:int"
        if isinstance(obj, int) and not isinstance(obj, bool) and r.random() < 0.5:
            return r.choice((obj + 1, obj - 1, obj * 2, obj ^ (1 << r.randrange(64)), -obj, float(obj),
                             bool(obj), str(obj))), f"{path}:arith"
        if isinstance(obj, bytes) and r.random() < 0.5:
            return r.choice((obj[:-1], obj + b"\x00", obj.decode("latin-1"), b"")), f"{path}:len"
        return leaf(), f"{path}="

    # frames

    def frame(self, t: int, meta: Any, data: bytes = b"",
              fix: Callable[[Any], tuple[Any, bytes]] | None = None,
              ops: tuple[str, ...] | None = None) -> tuple[bytes, str, bool]:
        """A mutated frame built from (t, meta, data): (bytes, tag, equivalent)."""
        for _ in range(8):
            out = self._frame(t, meta, data, fix, ops)
            if out is not None and out[1] not in self.quarantine:
                return out
        return frame(t, meta, data), "none", True

    _OPS = (("bitflip", 14), ("byte", 8), ("header", 10), ("truncate", 4), ("extend", 3),
            ("meta", 32), ("deep", 6), ("big", 3), ("noncanon", 6), ("splice", 3), ("garbage", 4))

    def _frame(self, t, meta, data, fix, ops):
        """One mutation of the frame (t, meta, data), its op drawn by weight: (bytes, tag,
        equivalent), or None if the mutated value cannot be encoded."""
        r = self.rng
        tname = T(t).name if t in T._value2member_map_ else f"type{t}"
        choices = [o for o in self._OPS if ops is None or o[0] in ops]
        op = r.choices([o[0] for o in choices], [o[1] for o in choices])[0]
        base = frame(t, meta, data)
        if op in ("bitflip", "byte"):
            return self._flip(op, base, data, tname)
        if op == "header":
            return self._header(t, base, data, tname)
        if op == "truncate":
            return base[:r.randrange(len(base))], f"truncate@{tname}", False
        if op == "extend":
            return base + r.choice((r.randbytes(r.randint(1, 40)), base[:wire.HEADER_SIZE], base)), \
                f"extend@{tname}", False
        if op == "splice":
            other = r.choice(([], 0, None, "x", [meta], {"n": 0}, {"message": "x"}, {}))
            return frame(t, other, data), f"splice@{tname}", False
        if op == "garbage":
            return raw_frame(t, r.randbytes(r.randint(0, 64)), data), f"garbage@{tname}", False
        if op == "noncanon":
            m = meta
            if isinstance(m, dict):
                items = list(m.items())
                r.shuffle(items)
                m = dict(items)
            return raw_frame(t, pack_wide(m, r), data), f"noncanon@{tname}", True
        return self._value_op(op, t, meta, data, fix, tname)

    def _flip(self, op: str, base: bytes, data: bytes, tname: str) -> tuple[bytes, str, bool]:
        """bitflip: 1-3 bits flipped in one zone (header, meta or anywhere); byte: 1-3 bytes set
        to values msgpack reads specially."""
        r = self.rng
        b = bytearray(base)
        if op == "bitflip":
            zone = r.random()
            for _ in range(r.choice((1, 1, 2, 3))):
                if zone < 0.3 or len(b) <= wire.HEADER_SIZE:
                    i = r.randrange(min(len(b), wire.HEADER_SIZE))
                elif zone < 0.85 or len(b) == len(base) - len(data):
                    i = r.randrange(wire.HEADER_SIZE, len(b) - len(data)) if len(b) - len(data) > wire.HEADER_SIZE else r.randrange(len(b))
                else:
                    i = r.randrange(len(b))
                b[i] ^= 1 << r.randrange(8)
            return bytes(b), f"bitflip@{tname}", False
        for _ in range(r.choice((1, 2, 3))):
            b[r.randrange(len(b))] = r.choice((0, 0xFF, 0x7F, 0x80, 0xC0, 0xC1, 0xD9, 0xDC, 0xDD,
                                               0xDE, 0xDF, 0xC6, 0xCF, r.randrange(256)))
        return bytes(b), f"byte@{tname}", False

    def _header(self, t: int, base: bytes, data: bytes, tname: str) -> tuple[bytes, str, bool]:
        """One header field of the frame changed: magic, version, type, meta or data length."""
        r = self.rng
        mb = base[wire.HEADER_SIZE:len(base) - len(data)]
        field = r.choice(("magic", "version", "type", "type", "meta_len", "meta_len", "data_len"))
        kw: dict = {}
        tt = t
        if field == "magic":
            kw["magic"] = r.choice((b"GM", b"MG"[::-1], b"\x00\x00", b"mg", r.randbytes(2)))
        elif field == "version":
            kw["version"] = r.choice((0, 1, 2, wire.VERSION + 1, 255))
        elif field == "type":
            tt = r.choice([0, 16, 127, 128, 255] + [int(x) for x in T])
        elif field == "meta_len":
            kw["meta_len"] = r.choice((0, 1, len(mb) - 1, len(mb) + 1, 4095, 4096, 4097,
                                       (256 << 10) + 1, (1 << 20) + 1, (1 << 32) - 1))
            kw["meta_len"] = max(0, kw["meta_len"])
        else:
            kw["data_len"] = r.choice((0, 1, 4096, len(data) + 1, max(0, len(data) - 1),
                                       16 << 20, (16 << 20) + 1, (1 << 32) - 1))
        return raw_frame(tt, mb, data, **kw), f"header-{field}@{tname}", False

    def _value_op(self, op: str, t: int, meta: Any, data: bytes, fix, tname: str):
        """The value-level ops: one place of the meta changed (meta), made big (big) or deeply
        nested (deep); then fixed up by `fix` 70% of the time.  None if it cannot be encoded."""
        r = self.rng
        if op == "deep":
            new, path = self.walk(meta, lambda: _PLACEHOLDER)
        elif op == "big":
            new, path = self.walk(meta, self.big)
        else:
            new, path = self.walk(meta, self.value)
        path = re.sub(r"\[\](into)?", "[]", path)[:80]
        d = data
        if fix is not None and r.random() < 0.7:
            try:
                new, d = fix(new)
            except Exception:
                pass
        try:
            mb = _splice_raw(msgpack.packb(new, use_bin_type=True))
        except (ValueError, OverflowError, TypeError):
            return None
        if op == "deep":
            enc = msgpack.packb(_PLACEHOLDER, use_bin_type=True)
            depth = r.choice((50, 500, 900, 950, 980, 1000, 1010, 1020, 1024, 1100))
            deep = r.choice((b"\x91" * depth + b"\xc0", b"\x81\xa1a" * depth + b"\xc0"))
            mb = mb.replace(enc, deep, 1)
            # (quarantined by the top-level field it is in: one tag per parser location)
            path = (re.match(r"^\.[-+~]?[^.\[=:~]*", path) or re.match("", path)).group(0)
            path += f"~{'deep' if depth >= 900 else 'nest'}"
        return raw_frame(t, mb, d), f"{op}@{tname}{path}", False


def pack_wide(obj: Any, r: random.Random) -> bytes:
    """msgpack with random non-minimal encodings (what any decoder must read the same)."""
    if obj is None or isinstance(obj, (bool, float)):
        return msgpack.packb(obj)
    if isinstance(obj, int):
        opts = [msgpack.packb(obj)]
        if 0 <= obj:
            for code, n in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
                if obj < 1 << (8 * n):
                    opts.append(bytes([code]) + obj.to_bytes(n, "big"))
        if -(1 << 63) <= obj < (1 << 63):
            for code, n in ((0xD0, 1), (0xD1, 2), (0xD2, 4), (0xD3, 8)):
                if -(1 << (8 * n - 1)) <= obj < 1 << (8 * n - 1):
                    opts.append(bytes([code]) + obj.to_bytes(n, "big", signed=True))
        return r.choice(opts)
    if isinstance(obj, str):
        b = obj.encode("utf-8", "surrogatepass")
        opts = [msgpack.packb(obj)]
        for code, n in ((0xD9, 1), (0xDA, 2), (0xDB, 4)):
            if len(b) < 1 << (8 * n):
                opts.append(bytes([code]) + len(b).to_bytes(n, "big") + b)
        return r.choice(opts)
    if isinstance(obj, bytes):
        opts = [msgpack.packb(obj)]
        for code, n in ((0xC4, 1), (0xC5, 2), (0xC6, 4)):
            if len(obj) < 1 << (8 * n):
                opts.append(bytes([code]) + len(obj).to_bytes(n, "big") + obj)
        return r.choice(opts)
    if isinstance(obj, (list, tuple)):
        n = len(obj)
        head = r.choice(([bytes([0x90 | n])] if n < 16 else []) + [b"\xdc" + n.to_bytes(2, "big")] * (n < 65536)
                        + [b"\xdd" + n.to_bytes(4, "big")])
        return head + b"".join(pack_wide(x, r) for x in obj)
    if isinstance(obj, dict):
        n = len(obj)
        head = r.choice(([bytes([0x80 | n])] if n < 16 else []) + [b"\xde" + n.to_bytes(2, "big")] * (n < 65536)
                        + [b"\xdf" + n.to_bytes(4, "big")])
        return head + b"".join(pack_wide(k, r) + pack_wide(v, r) for k, v in obj.items())
    return msgpack.packb(obj, use_bin_type=True)


# --- the receiver's pages, modelled (an oracle for the END digests) ---------------------------


class Model:
    """Per page: the stamp 2*(round+1)+has_data and the XXH3-64 the receiver keeps (images.py,
    csrc/stream.c mg_apply_batch): a copy of round r lands if the page's stamp is from round r
    or older; data runs first, then zero runs."""

    def __init__(self, regions: list[RegionSpec], ps: int):
        self.ps = ps
        self.npages = [r.size // ps for r in regions]
        self.zh = zero_page_hash(ps)
        self.stamps = [[0] * n for n in self.npages]
        self.hashes = [[self.zh] * n for n in self.npages]
        self.announced = [0] * len(regions)
        # a mutated (or duplicated) PREPARE went out: its page count may differ from the base's
        # and its acceptance is not always known (another channel's failure): the receiver's
        # per-region announce cap can no longer be modelled, so no more "valid" PREPAREs
        self.prepare_uncertain = False
        self.valid = True

    def batch(self, r: int, n: int, dflat, zflat, hashes: bytes) -> None:
        limit = 2 * (n + 1) + 1
        st, hs = self.stamps[r], self.hashes[r]
        hv = array.array("Q")
        hv.frombytes(hashes)
        off = 0
        for i in range(0, len(dflat), 2):
            first, count = dflat[i], dflat[i + 1]
            for k in range(count):
                p = first + k
                if st[p] <= limit:
                    st[p] = limit
                    hs[p] = hv[off + k]
            off += count
        for first, count in set(zip(zflat[0::2], zflat[1::2])):     # (idempotent, unordered)
            for p in range(first, first + count):
                if st[p] <= limit:
                    st[p] = limit - 1
                    hs[p] = self.zh

    def digests(self) -> list[str]:
        # (the protocol's definition, written out here apart from digest.py: XXH3-128 over the
        # canonical XXH3-64 of each 256 pages' hashes)
        out = []
        for hs in self.hashes:
            b = array.array("Q", hs).tobytes()
            out.append(xxhash.xxh3_128(b"".join(xxhash.xxh3_64_digest(b[i:i + 2048])
                                                for i in range(0, len(b), 2048))).hexdigest())
        return out


# --- the client's side of one channel ---------------------------------------------------------


class Chan:
    """One connection after the handshake: sends (sealed with a key) whole frames as given and
    reads the receiver's answers."""

    def __init__(self, stream: trio.SocketStream, fs: FrameStream, seal):
        self.stream = stream
        self.fs = fs
        self.seal = seal
        self.broken = False

    async def send(self, frames: list[bytes]) -> bool:
        """False if the receiver closed the connection meanwhile."""
        if not frames or self.broken:
            return not self.broken
        if self.seal is None:
            buf = b"".join(frames)
        else:
            parts = []
            for f in frames:
                head, tag = self.seal.seal(f, ())
                parts += (head, tag)
            buf = b"".join(parts)
        try:
            await self.stream.send_all(buf)
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.broken = True
            return False

    async def send_eof(self) -> None:
        try:
            await self.stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.broken = True

    async def wait(self, marker: int | None, timeout: float) -> tuple:
        """Read answers until the marker's ROUND_ACK, or another verdict:
        ("ack",) ("error", message) ("eof",) ("lost", why) ("result", Result) ("closed",)
        ("timeout",) ("bad-answer", why) ("setup_ok", SetupOk)."""
        with trio.move_on_after(timeout):
            while True:
                try:
                    msg = await self.fs.receive()
                except PeerClosed:
                    return ("eof",)
                except TruncatedFrameError as e:
                    return ("lost", str(e))
                except ProtocolError as e:
                    return ("bad-answer", str(e))
                except PeerReportedError as e:
                    return ("error", e.reason)
                except TransportError as e:
                    return ("lost", str(e))
                if isinstance(msg, wire.RoundAck):
                    if marker is not None and msg.round_no == marker:
                        return ("ack",)
                    continue
                if isinstance(msg, wire.Result):
                    return ("result", msg)
                if isinstance(msg, wire.Closed):
                    return ("closed",)
                if isinstance(msg, wire.SetupOk):
                    return ("setup_ok", msg)
                if HAS_COMMIT and isinstance(msg, wire.Synced):
                    return ("synced",)
                if isinstance(msg, getattr(wire, "Committed", ())):
                    return ("committed",)
                return ("bad-answer", f"unexpected {type(msg).__name__.upper()}")
        return ("timeout",)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.fs.aclose()


class Refused(Exception):
    """The receiver answered the handshake with ERROR (or closed): str() is its reason."""


def reason_of(e: TransportError) -> str:
    """What the receiver said (ERROR's reason), or our own error's message."""
    return e.reason if isinstance(e, PeerReportedError) else str(e)


async def open_chan(port: int, key: bytes | None, session: bytes, channel: int,
                    setup: bytes | None, encrypt: bool, timeout: float) -> Chan:
    """Connect and authenticate one channel (channel 0 sends `setup`, a frame's bytes, right
    after its proof: the receiver reads it after WELCOME).  Refused if the receiver says no;
    trio.TooSlowError past the timeout."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    fs = FrameStream(stream, "receiver")
    ok = False
    try:
        with trio.fail_after(timeout):
            mode = None if key is None else ("aead" if encrypt else "mac")
            nonce_c = os.urandom(wire.NONCE_SIZE)
            await fs.send(wire.Hello(wire.VERSION, nonce_c, session, channel, key is not None, encrypt))
            try:
                ch = await fs.expect(wire.Challenge)
            except TransportError as e:
                raise Refused(reason_of(e)) from None
            seal = recv_seal = None
            if key is None:
                await fs.send(wire.Auth(None))
            else:
                want = proof(key, "server", nonce_c, ch.nonce, session, channel, mode)
                if ch.mac != want:
                    raise Refused("BAD SERVER PROOF")
                await fs.send(wire.Auth(proof(key, "client", nonce_c, ch.nonce, session, channel, mode)))
                seal, recv_seal = derive(key, transcript(nonce_c, ch.nonce, session, channel, mode),
                                         mode, server=False)
            chan = Chan(stream, fs, seal)
            if setup is not None:
                await chan.send([setup])
            try:
                await fs.expect(wire.Welcome)
            except TransportError as e:
                raise Refused(reason_of(e)) from None
            if recv_seal is not None:
                fs.arm(recv=recv_seal)
            ok = True
            return chan
    finally:
        if not ok:
            with trio.CancelScope(shield=True):
                await fs.aclose()


# --- sessions ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Sess:
    ps: int
    regions: list[RegionSpec]
    channels: int
    codec: int
    encrypt: bool
    model: Model
    setup: bytes
    mut_p: float
    prefix: int = 0            # valid frames per channel before any mutation
    dead: bool = False
    inflight: int = 0          # mutated frames awaiting their verdict (any channel)
    closed: set = dataclasses.field(default_factory=set)
    last: dict = dataclasses.field(default_factory=dict)   # channel -> last valid frame

    def owned(self, region: int, ch: int) -> tuple[int, int]:
        """Pages of a region that channel ch sends (each page on one channel only: the order
        of a page's copies is then that of one stream, and the model exact)."""
        n = self.model.npages[region]
        return n * ch // self.channels, n * (ch + 1) // self.channels


@dataclasses.dataclass
class _SemCase:
    """A semantic BATCH case being built (Gen.semantic): its meta's fields, the data's pages (None:
    as the runs say), a compressed payload replacing the data, and the verdict expected."""
    kind: str
    reg: int
    dflat: list[Any]
    zflat: list[Any] = dataclasses.field(default_factory=list)
    n: int = 0
    expect: str | None = "reject"
    data_pages: int | None = None
    c: int = 0
    comp: bytes | None = None


_SEM_OWN_PAGES = ("last", "runs", "zeros", "data-max")   # (cases that need pages this channel owns)


class Gen:
    """Inputs for one worker: pre-auth payloads, SETUPs, session frames."""

    def __init__(self, rng: random.Random, target: Target, quarantine: set[str]):
        self.rng = rng
        self.t = target
        self.mut = Mut(rng, quarantine)
        self._pools: dict[tuple[int, bool], list[bytes]] = {}

    # pieces

    def pages(self, ps: int, n: int, compressible: bool = False) -> bytes:
        key = (ps, compressible)
        pool = self._pools.get(key)
        if pool is None:
            k = 8 if ps <= 65536 else 2
            if compressible:
                pool = [bytes([i + 1]) * (ps // 2) + self.rng.randbytes(64) + bytes(ps // 2 - 64)
                        for i in range(k)]
            else:
                pool = [self.rng.randbytes(ps) for _ in range(k)] + [bytes(ps)]
            self._pools[key] = pool
        return b"".join(self.rng.choices(pool, k=n))

    def hello(self, channel: int | None = None, session: bytes | None = None) -> dict:
        r = self.rng
        return {"v": wire.VERSION, "nonce": r.randbytes(32), "session": session or r.randbytes(16),
                "channel": r.choice((0, 0, 1, 2, 15)) if channel is None else channel,
                "auth": self.t.keyed, "enc": self.t.keyed and r.random() < 0.3}

    def setup_msg(self) -> tuple[int, list[RegionSpec], int, int]:
        r = self.rng
        ps = r.choice((4096,) * 8 + (8192, 16384, 65536, 2 << 20))
        nreg = r.choice((1, 1, 1, 2, 2, 3, 4))
        names = r.sample(REGION_NAMES, nreg)
        regions = []
        for name in names:
            npages = r.choice((1, 2, 3, 8, 16, 64, 100, 256)) if ps < 65536 else r.choice((1, 2, 4))
            start = r.choice((0, 1 << 20, 1 << 32, (1 << 47) - (256 << 20))) // ps * ps
            regions.append(RegionSpec(name, start, start + npages * ps))
        channels = 1 if r.random() < 0.7 or MAX_CHANNELS[0] == 1 else r.randint(2, MAX_CHANNELS[0])
        codec = r.choice((0, 0) + CODECS) if CODECS else 0
        return ps, regions, channels, codec

    def setup_frame(self, ps, regions, channels, codec) -> bytes:
        if HAS_DELTA:       # (a delta batch is then checked against the image: sem-codec's 3)
            return wire.encode(wire.Setup(ps, channels, tuple(regions), codec, self.rng.random() < 0.5))
        if HAS_CODECS:
            return wire.encode(wire.Setup(ps, channels, tuple(regions), codec))
        return wire.encode(wire.Setup(ps, channels, tuple(regions)))

    def setup_semantic(self) -> tuple[bytes, str, str | None]:
        """A SETUP at or beyond a limit, or with one odd value in a field (a SETUP's meta as
        encoded, then one change): (frame, tag, expect "accept"/"reject"/None)."""
        r = self.rng
        ps, regions, channels, codec = self.setup_msg()
        _, meta, _ = self._split(self.setup_frame(ps, regions, channels, codec))
        meta = dict(meta)
        regs = [list(x) for x in meta["regions"]]
        meta["regions"] = regs
        i = r.randrange(len(regs))
        D = r.choice((500, 980, 990, 1000, 1010, 1020))
        kind = r.choice(("name", "name", "start", "end", "range", "ps", "channels", "codec", "dup",
                         "count", "total", "memory", "entry", "deep"))
        expect: str | None = "reject"
        if kind == "name":
            v = r.choice(("", "a" * 255, "a" * 256, "é" * 127, "é" * 128, "\x00", "ram\n", "\x7f",
                          "\u200b", "\u202e", "ram ", " ", "../x", "a/b", 7, None, b"ram", ["ram"],
                          deep(D), deep(D, "map")))
            if isinstance(v, str) and v in ("a" * 255, "é" * 127, "ram ", " ", "../x", "a/b"):
                expect = "accept"
            elif isinstance(v, str) and v in ("\u200b", "\u202e"):
                expect = None          # (format characters: not printable, refused)
            if isinstance(v, str) and v in [x[0] for x in regs]:
                expect = "reject"      # (a name twice)
            regs[i][0] = v
            kind += "=" + (repr(v)[:12] if not isinstance(v, _Raw) else "deep")
        elif kind in ("start", "end"):
            j = 1 if kind == "start" else 2
            v = r.choice((-1, 1, ps - 1, ps + 1, (1 << 64) - 1, (1 << 64) - ps, 1.0, True, None, "0",
                          deep(D), [0]))
            regs[i][j] = v
            if isinstance(v, _Raw):
                kind += "=deep"
        elif kind == "range":
            regs[i][2] = regs[i][1] if r.random() < 0.5 else regs[i][1] - ps
        elif kind == "ps":
            meta["page_size"] = r.choice((0, 2048, 3 << 12, 4097, 4 << 20, 1 << 32, True, 4096.0))
        elif kind == "channels":
            meta["channels"] = r.choice((0, 17, -1, True, 1 << 40))
        elif kind == "codec":
            meta["compress"] = r.choice((3, -1, True, 255, 1.0)) if "compress" in meta else 1
        elif kind == "dup":
            regs.append(list(regs[i]))
        elif kind == "count":
            n = r.choice((wire.MAX_REGIONS, wire.MAX_REGIONS + 1, 0))
            regs[:] = [[f"r{k}", k * ps, (k + 1) * ps] for k in range(n)]
            expect = "accept" if n == wire.MAX_REGIONS else "reject"
        elif kind == "total":     # beyond 1 TiB in all, or in one region
            regs[:] = [[f"r{k}", k << 41, (k << 41) + (1 << 40) + r.choice((0, ps))] for k in range(2)]
        elif kind == "memory":    # fine for the protocol, beyond the receiver's --max-memory
            meta["page_size"] = 4096
            pages = 2 * self.t.max_memory_bytes // 12          # (12 bytes of bookkeeping a page)
            regs[:] = [["big", 0, min(pages * 4096, 1 << 40)]]
            expect = "reject" if pages * 4096 <= (1 << 40) else None
        elif kind == "entry":
            regs[i] = r.choice(([], ["x", 0], ["x", 0, ps, 0], "x", None, {"name": "x"}, deep(D)))
        else:
            key = r.choice(("page_size", "channels", "regions"))
            meta[key] = deep(D, r.choice(("list", "map")))
            kind += f"={key}"
        return frame(T.SETUP, meta), f"setup-{kind}", expect

    # pre-auth inputs

    _PRE = (("random", 8), ("hello-mut", 34), ("header", 10), ("prefix", 5), ("pipeline", 16),
            ("wrong-first", 10), ("junk", 4), ("auth", 13))

    def preauth(self) -> dict:
        """A pre-auth input: {"kind": "conn", payload, style} or {"kind": "auth"} (driven live)."""
        r = self.rng
        sub = r.choices([p[0] for p in self._PRE], [p[1] for p in self._PRE])[0]
        tag = sub
        keyed = self.t.keyed
        if sub == "auth":
            return {"kind": "auth", "sub": r.choice(("flip", "reflect", "zero", "none", "short", "long",
                                                     "mode", "channel", "session", "frame", "frame",
                                                     "right")),
                    "channel": r.choice((0, 1, 3)) if keyed or r.random() < 0.1 else r.choice((1, 3, 15))}
        hello = self.hello()
        if sub == "random":
            payload = r.randbytes(r.choice((0, 1, 2, 3, 5, 8, 11, 12, 13, 16, 31, 64, 200, 1024, 4096)))
            if payload and r.random() < 0.5:
                payload = wire.MAGIC + payload       # (past the magic check)
        elif sub == "hello-mut":
            payload, tag, _ = self.mut.frame(T.HELLO, hello)
        elif sub == "header":
            t = r.choice([int(x) for x in T] + [0, 16, 200, 255])
            ml = r.choice((0, 1, 7, 100, 4095, 4096, 4097, (256 << 10), (256 << 10) + 1, 1 << 20,
                           (1 << 20) + 1, (1 << 32) - 1))
            dl = r.choice((0, 0, 0, 1, 4096, 16 << 20, (16 << 20) + 1, (1 << 32) - 1))
            payload = HEADER.pack(wire.MAGIC, r.choice((wire.VERSION,) * 5 + (0, 2, 255)), t, ml, dl)
            payload += r.randbytes(min(ml, r.choice((0, 1, 16, 300))))
            tag = f"header@type{t}"
        elif sub == "prefix":
            full = frame(T.HELLO, hello)
            payload = full[:r.randrange(len(full))]
        elif sub == "pipeline":
            # HELLO, AUTH, SETUP blind (no key: this may become a session); one of them mutated
            which = r.choice(("hello", "auth", "setup", "none"))
            hello["auth"] = hello["enc"] = False if not keyed else hello["auth"]
            if not keyed and r.random() < 0.75:
                hello["channel"] = r.choice((1, 2, 15))
            parts = [frame(T.HELLO, hello)]
            if which == "hello":
                parts[0], tag, _ = self.mut.frame(T.HELLO, hello)
            auth = {"mac": None if not keyed else r.randbytes(32)}
            if which == "auth":
                a, tag, _ = self.mut.frame(T.AUTH, auth)
            else:
                a = frame(T.AUTH, auth)
            parts.append(a)
            ps, regions, channels, codec = self.setup_msg()
            s = self.setup_frame(ps, regions, channels, codec)
            if which == "setup":
                mt, mm, _ = self._split(s)
                s, tag, _ = self.mut.frame(mt, mm)
                tag = "pipeline-" + tag
            if r.random() < 0.8:
                parts.append(s)
            payload = b"".join(parts)
        elif sub == "wrong-first":
            payload, tag = self.wrong_type(None, 0)
        else:
            payload = frame(T.HELLO, hello) + r.randbytes(r.randint(1, 100))
        return {"kind": "conn", "sub": sub, "tag": tag, "payload": payload,
                "style": "rst" if r.random() < 0.12 else "eof"}

    @staticmethod
    def _split(buf: bytes) -> tuple[int, Any, bytes]:
        _, _, t, ml, dl = HEADER.unpack_from(buf)
        meta = msgpack.unpackb(buf[wire.HEADER_SIZE:wire.HEADER_SIZE + ml], raw=False)
        return t, meta, buf[wire.HEADER_SIZE + ml:]

    def wrong_type(self, sess: Sess | None, ch: int) -> tuple[bytes, str]:
        """A well-formed frame of a type the receiver does not expect now (or a huge claim)."""
        r = self.rng
        ps = sess.ps if sess else PS
        pick = r.choice(("HELLO", "CHALLENGE", "AUTH", "WELCOME", "SETUP", "SETUP_OK", "ROUND_ACK",
                         "CLOSED", "RESULT", "ERROR", "BATCH", "PREPARE", "ROUND_END", "CLOSE", "END",
                         "claim") + (("SYNCED", "COMMIT") if HAS_COMMIT else ()))
        if pick == "HELLO":
            f = frame(T.HELLO, self.hello())
        elif pick == "CHALLENGE":
            f = wire.encode(wire.Challenge(r.randbytes(32), r.choice((None, r.randbytes(32)))))
        elif pick == "AUTH":
            f = wire.encode(wire.Auth(r.choice((None, r.randbytes(32)))))
        elif pick == "WELCOME":
            f = wire.encode(wire.Welcome())
        elif pick == "SETUP":
            f = self.setup_frame(*self.setup_msg())
        elif pick == "SETUP_OK":
            f = wire.encode(wire.SetupOk(("000-ram.img",)))
        elif pick == "ROUND_ACK":
            f = wire.encode(wire.RoundAck(r.randrange(5)))
        elif pick == "CLOSED":
            f = wire.encode(wire.Closed())
        elif pick == "RESULT":
            f = wire.encode(wire.Result(True, (True,), ("0" * 32,), ""))
        elif pick == "ERROR":
            f = wire.encode(wire.Error(r.choice(("x", "sender aborted: test", "é" * 999))))
        elif pick == "BATCH":
            data = self.pages(ps, 1)
            h = wire.batch_digest(0, 0, [0, 1], [], [data], ps)
            f = wire.encode_batch(0, 0, [0, 1], [], len(data), h) + data
        elif pick == "PREPARE":
            f = wire.encode(wire.Prepare(0, (0, 1)))
        elif pick == "ROUND_END":
            f = wire.encode(wire.RoundEnd(0))
        elif pick == "CLOSE":
            f = wire.encode(wire.Close())
        elif pick == "END":
            n = len(sess.regions) if sess else 1
            f = wire.encode(wire.End(tuple("0" * 32 for _ in range(r.choice((n, n + 1, max(0, n - 1)))))))
        elif pick == "SYNCED":
            f = wire.encode(wire.Synced())
        elif pick == "COMMIT":
            f = wire.encode(wire.Commit())
        else:   # a header claiming the most each type may carry, and nothing behind it
            t = r.choice([int(x) for x in T])
            lim = {T.SETUP: 1 << 20, T.BATCH: 256 << 10, T.PREPARE: 256 << 10, T.END: 1 << 20,
                   T.RESULT: 1 << 20, T.SETUP_OK: 1 << 20}.get(T(t), 4096)
            f = HEADER.pack(wire.MAGIC, wire.VERSION, t, lim, (16 << 20) if t == T.BATCH else 0)
            return f, f"claim@{T(t).name}"
        return f, f"wrong-type@{pick}"

    # session frames

    def new_session(self) -> Sess:
        r = self.rng
        ps, regions, channels, codec = self.setup_msg()
        return Sess(ps, regions, channels, codec, self.t.keyed and r.random() < 0.3,
                    Model(regions, ps), self.setup_frame(ps, regions, channels, codec),
                    r.choice((0.0, 0.0, 0.02, 0.05, 0.1, 0.2, 0.4)))

    def _runs(self, lo: int, hi: int, max_runs: int, max_pages: int) -> tuple[list[int], int]:
        r = self.rng
        flat: list[int] = []
        total = 0
        if hi <= lo or max_pages <= 0:
            return flat, 0
        shape = r.random()
        if shape < 0.5:
            n = 1
        elif shape < 0.95:
            n = r.randint(2, 8)
        else:       # many single-page runs (pages may repeat)
            n = min(r.choice((64, 512, max_runs)), max_runs, max_pages)
            flat = [x for f in r.choices(range(lo, hi), k=n) for x in (f, 1)]
            return flat, n
        for _ in range(min(n, max_runs)):
            first = r.randrange(lo, hi)
            count = r.randint(1, min(hi - first, r.choice((1, 2, 4, 16, 64, 1024))))
            if total + count > max_pages:
                break
            flat += (first, count)
            total += count
        return flat, total

    def valid_batch(self, s: Sess, ch: int) -> tuple[bytes, Callable[[], None]] | None:
        r = self.rng
        ps = s.ps
        owned = [i for i in range(len(s.regions)) if s.owned(i, ch)[0] < s.owned(i, ch)[1]]
        if not owned:
            return None
        reg = r.choice(owned)
        lo, hi = s.owned(reg, ch)
        n = r.randint(0, 3) if r.random() < 0.9 else r.choice((wire.MAX_ROUND, wire.MAX_ROUND - 1, 1000, 7))
        max_data = wire.MAX_DATA // ps
        big = r.random() < 0.002                      # up to 16 MiB of data; else 256 KiB at most
        small = max(1, (256 << 10) // ps)
        shape = r.random()
        dflat: list[int] = []
        zflat: list[int] = []
        dpages = 0
        if shape < 0.65:
            dflat, dpages = self._runs(lo, hi, wire.MAX_RUNS, max_data if big else min(max_data, small))
            if r.random() < 0.3:
                zflat, _ = self._runs(lo, hi, wire.MAX_RUNS, 4096)
        elif shape < 0.85:
            zflat, _ = self._runs(lo, hi, wire.MAX_RUNS, wire.MAX_ZERO_PAGES if big else 4096)
        else:   # many single-page runs, repeated pages allowed
            k = r.choice((2, 16, 300, wire.MAX_RUNS)) if big else r.choice((2, 16, 100))
            pages = r.choices(range(lo, hi), k=min(k, max_data if big else small))
            if r.random() < 0.5:
                dflat = [x for p in pages for x in (p, 1)]
                dpages = len(pages)
            else:
                zflat = [x for p in pages for x in (p, 1)]
        if not dflat and not zflat:
            zflat = [lo, 1]
        data = self.pages(ps, dpages, compressible=bool(s.codec) and r.random() < 0.7)
        hashes = page_hashes(data, ps) if data else b""
        h = wire.batch_digest(reg, n, dflat, zflat, (), ps, hashes)
        wire_data, c = data, 0
        if s.codec and data and r.random() < 0.6:
            comp = compress_data(s.codec, data)
            if len(comp) < len(data):
                wire_data, c = comp, s.codec
        head = (wire.encode_batch(reg, n, dflat, zflat, len(wire_data), h, c) if HAS_CODECS
                else wire.encode_batch(reg, n, dflat, zflat, len(wire_data), h))
        model = s.model
        return head + wire_data, lambda: model.batch(reg, n, dflat, zflat, hashes)

    def valid_prepare(self, s: Sess, ch: int) -> tuple[bytes, Callable[[], None]] | None:
        r = self.rng
        reg = r.randrange(len(s.regions))
        room = s.model.npages[reg] - s.model.announced[reg]
        if room <= 0 or s.model.prepare_uncertain:
            return None
        flat, total = self._runs(0, s.model.npages[reg], wire.MAX_RUNS, room)
        if not flat:
            return None
        s.model.announced[reg] += total     # (counted now: frames of other channels may follow)
        return wire.encode(wire.Prepare(reg, tuple(flat))), lambda: None

    def valid_frame(self, s: Sess, ch: int) -> tuple[bytes, Callable[[], None]]:
        r = self.rng
        k = r.random()
        out = None
        if k < 0.08:
            out = self.valid_prepare(s, ch)
        elif k < 0.18:
            out = wire.encode(wire.RoundEnd(r.choice((0, 1, 2, 5, wire.MAX_ROUND)))), lambda: None
        if out is None:
            out = self.valid_batch(s, ch)
        if out is None:
            out = wire.encode(wire.RoundEnd(0)), lambda: None
        return out

    def _batch_fix(self, s: Sess):
        """Re-fit a mutated BATCH meta: data of the length its runs announce, and its hash, so
        that the mutation reaches the checks behind the hash."""
        def fix(m: Any) -> tuple[Any, bytes]:
            if not isinstance(m, dict):
                raise ValueError
            d = m.get("d")
            data = b""
            if isinstance(d, list) and len(d) % 2 == 0 and all(type(x) is int for x in d):
                pages = sum(d[1::2])
                if 0 <= pages <= 64 and all(x > 0 for x in d[1::2]):
                    data = self.pages(s.ps, pages)
            if self.rng.random() < 0.9:
                m = dict(m)
                m["h"] = wire.batch_digest(m.get("r"), m.get("n"), d, m.get("z"), [data], s.ps)
            return m, data
        return fix

    def semantic(self, s: Sess, ch: int) -> tuple[bytes, str, str | None]:
        """A BATCH/PREPARE at or beyond a limit, well-formed (hash and data length right):
        (frame, tag, expect: "accept", "reject" or None)."""
        r = self.rng
        nreg = len(s.regions)
        reg = r.randrange(nreg)
        npages = s.model.npages[reg]
        lo, hi = s.owned(reg, ch)
        mine = lo < hi
        kind = r.choice(("beyond", "last", "huge-first", "count0", "neg", "region", "round",
                         "runs", "zeros", "data-max", "len", "empty", "hash", "odd", "codec",
                         "prepare-beyond", "prepare-over", "prepare-empty", "prepare-huge",
                         "prepare-region", "bomb", "codec-bigger", "deep-run", "prepare-deep"))
        if kind in _SEM_OWN_PAGES and not mine:
            return self.wrong_type(s, ch)[0], "wrong-type@x", None
        if kind.startswith("prepare"):
            return self._sem_prepare(kind, reg, npages, nreg)
        case = _SemCase(kind, reg, [lo, 1] if mine else [0, 1])
        if kind in ("codec", "bomb", "codec-bigger"):
            self._sem_codec(case, s, lo, mine)
        else:
            self._sem_runs(case, s, lo, hi, npages, nreg)
        return self._sem_frame(case, s)

    def _sem_runs(self, case: _SemCase, s: Sess, lo: int, hi: int, npages: int, nreg: int) -> None:
        """The cases on the runs, region, round and data length (pages lo..hi are this channel's)."""
        r, kind = self.rng, case.kind
        if kind == "beyond":
            case.dflat = [max(0, npages - 1), 2] if r.random() < 0.5 else []
            case.zflat = [] if case.dflat else [npages, 1]
        elif kind == "last":
            case.dflat, case.expect = [hi - 1, 1], "accept"
        elif kind == "huge-first":
            case.dflat = [r.choice(((1 << 64) - 1, (1 << 63), (1 << 32), (1 << 64) - 2)), 1]
        elif kind == "count0":
            case.dflat = [lo, 0]
        elif kind == "neg":
            case.dflat = [-1, 1]
        elif kind == "region":
            case.reg = r.choice((nreg, nreg + 1, wire.MAX_REGIONS - 1, wire.MAX_REGIONS, -1))
        elif kind == "round":
            case.n = r.choice((wire.MAX_ROUND + 1, -1, 1 << 32))
        elif kind == "runs":
            k = r.choice((wire.MAX_RUNS, wire.MAX_RUNS + 1))
            case.zflat = [lo, 1] * k
            case.dflat = []
            case.expect = "accept" if k == wire.MAX_RUNS else "reject"
        elif kind == "zeros":
            per = hi - lo
            k = -(-wire.MAX_ZERO_PAGES // per)
            if k > wire.MAX_RUNS or per * k != wire.MAX_ZERO_PAGES:
                case.zflat = [lo, 1] * wire.MAX_RUNS
                case.expect = "accept"
            else:
                case.zflat = [lo, per] * k + ([lo, 1] if r.random() < 0.5 else [])
                case.expect = "accept" if len(case.zflat) == 2 * k else "reject"
            case.dflat = []
        elif kind == "data-max":
            mx = wire.MAX_DATA // s.ps
            k = mx if r.random() < 0.5 else mx + 1
            if k > wire.MAX_RUNS:
                k = wire.MAX_RUNS + 1
            case.dflat = [lo, 1] * k
            case.expect = "accept" if k <= mx and k <= wire.MAX_RUNS else "reject"
        elif kind == "len":
            case.data_pages = r.choice((0, 2))
        elif kind == "empty":
            case.dflat = []
        elif kind == "deep-run":
            case.dflat = [deep(r.choice((500, 990, 1000, 1020))), 1]
        elif kind == "odd":
            case.dflat = [lo, 1, lo]

    def _sem_codec(self, case: _SemCase, s: Sess, lo: int, mine: bool) -> None:
        """The cases on compression: an unknown codec, a bomb, compressed data bigger than raw."""
        r, ps = self.rng, s.ps
        if case.kind == "codec":
            case.c = r.choice((1, 2, 3, 255, -1))
            if HAS_CODECS and case.c == s.codec:
                case.c = 3
        elif case.kind == "bomb":
            # zeros that decompress far beyond what the runs announce (at most 1 GiB: this
            # machine is shared); announced pages just above the compressed size, so that the
            # frame passes "compressed data must be smaller"
            case.c = s.codec or 1
            nbytes = r.choice((8 << 10, 256 << 10, 16 << 20, 16 << 20, 64 << 20, 256 << 20, 1 << 30))
            comp = bomb(case.c, nbytes)
            if r.random() < 0.2:
                comp = bytearray(comp)
                comp[r.randrange(len(comp))] ^= 1 << r.randrange(8)
                comp = bytes(comp)
            k = min(len(comp) // ps + 1, wire.MAX_DATA // ps, wire.MAX_RUNS)
            case.dflat = [lo if mine else 0, 1] * k
            case.data_pages = k
            case.comp = comp
        elif case.kind == "codec-bigger":
            case.c = s.codec or 1
            case.comp = self.rng.randbytes(ps + r.choice((0, 1, 100)))

    def _sem_prepare(self, kind: str, reg: int, npages: int, nreg: int) -> tuple[bytes, str, str | None]:
        """A PREPARE beyond its region, over it twice, empty, huge, deep or of a region not set up."""
        r = self.rng
        runs: list[Any] = [0, 1]
        if kind == "prepare-beyond":
            runs = [max(0, npages - 1), 2]
        elif kind == "prepare-over":
            runs = [0, npages] * 2
        elif kind == "prepare-empty":
            runs = []
        elif kind == "prepare-huge":
            runs = [(1 << 63), 1]
        elif kind == "prepare-deep":
            runs = [0, deep(r.choice((500, 990, 1000, 1020)))]
        else:
            reg = r.choice((nreg, wire.MAX_REGIONS))
        return frame(T.PREPARE, {"r": reg, "p": runs}), f"sem-{kind}", "reject"

    def _sem_frame(self, case: _SemCase, s: Sess) -> tuple[bytes, str, str | None]:
        """The case's BATCH: its data, its hash right (wrong for "hash"), its codec field."""
        ps, kind, dflat = s.ps, case.kind, case.dflat
        dp = sum(x for x in dflat[1::2] if type(x) is int and x > 0) if len(dflat) % 2 == 0 else 1
        data = self.pages(ps, dp if case.data_pages is None else case.data_pages)
        try:
            h = wire.batch_digest(case.reg, case.n, dflat, case.zflat, [data], ps)
        except Exception:
            h = 0
        if kind == "hash":
            h = (h + 1) % (1 << 64)
        meta = {"r": case.reg, "n": case.n, "d": dflat, "z": case.zflat, "h": h}
        if HAS_CODECS:
            meta["c"] = case.c
        if case.comp is not None:
            data = case.comp
        if not HAS_CODECS and kind in ("codec", "bomb", "codec-bigger"):
            meta["c"] = case.c    # (an unknown field before compression existed)
        return frame(T.BATCH, meta, data), f"sem-{kind}", case.expect

    def session_mutation(self, s: Sess, ch: int) -> tuple[bytes, str, str | None, bool]:
        """(frame, tag, expect, equivalent), never of a quarantined kind."""
        for _ in range(8):
            out = self._session_mutation(s, ch)
            if out[1] not in self.mut.quarantine:
                return out
        return wire.encode(wire.RoundEnd(0)), "none", "accept", True

    def _session_mutation(self, s: Sess, ch: int) -> tuple[bytes, str, str | None, bool]:
        r = self.rng
        k = r.random()
        if k < 0.22:
            f, tag, expect = self.semantic(s, ch)
            return f, tag, expect, False
        if k < 0.30:
            f, tag = self.wrong_type(s, ch)
            return f, tag, None, False
        if k < 0.34 and ch in s.last:
            last = s.last[ch]
            if last[3] == T.PREPARE:
                s.model.prepare_uncertain = True
            return last, "dup", None, last[3] != T.PREPARE
        # a valid frame of this state, mutated
        pick = r.random()
        fix = None
        if pick < 0.7:
            got = self.valid_batch(s, ch)
            if got is None:
                return self.wrong_type(s, ch)[0], "wrong-type@x", None, False
            base = got[0]
            fix = self._batch_fix(s)
        elif pick < 0.85:
            got = self.valid_prepare(s, ch)       # (every page announced already: a ROUND_END)
            base = got[0] if got else wire.encode(wire.RoundEnd(r.randrange(4)))
            if got:
                s.model.prepare_uncertain = True
        elif pick < 0.93:
            base = wire.encode(wire.RoundEnd(r.randrange(4)))
        elif ch == 0:
            base = wire.encode(wire.End(tuple(self.rng.choice(("0" * 32, "a" * 32)) for _ in s.regions)))
        else:
            base = wire.encode(wire.Close())
        t, meta, data = self._split(base)
        if len(data) > 64 * s.ps:
            data = data[:64 * s.ps]
        f, tag, equivalent = self.mut.frame(t, meta, data, fix=fix)
        # (an END is refused while other channels are open: even re-encoded, no expectation)
        return f, tag, None, equivalent and t != T.END


# --- the fuzzer -------------------------------------------------------------------------------


def auth_mac(r: random.Random, sub: str, key: bytes | None, right: bytes | None, ch: Any, nonce_c: bytes,
             session: bytes, channel: int, mode: str | None) -> Any:
    """The AUTH's proof for the case `sub`, given the right one and the CHALLENGE `ch`: with a key,
    one bit flipped, the receiver's own, zeros, none, cut short, one byte long, or made for the
    other mode, channel or session; without one, a random one ("frame" and "right": as is)."""
    mac: Any = right
    if key is not None:
        if sub == "flip":
            b = bytearray(right)
            b[r.randrange(32)] ^= 1 << r.randrange(8)
            mac = bytes(b)
        elif sub == "reflect":
            mac = ch.mac
        elif sub == "zero":
            mac = bytes(32)
        elif sub == "none":
            mac = None
        elif sub == "short":
            mac = right[:r.choice((0, 16, 31))]
        elif sub == "long":
            mac = right + b"\x00"
        elif sub == "mode":
            mac = proof(key, "client", nonce_c, ch.nonce, session, channel,
                        "mac" if mode == "aead" else "aead")
        elif sub == "channel":
            mac = proof(key, "client", nonce_c, ch.nonce, session, channel + 1, mode)
        elif sub == "session":
            mac = proof(key, "client", nonce_c, ch.nonce, bytes(16), channel, mode)
    elif sub not in ("frame", "right"):
        mac = r.choice((bytes(32), b"", None))
    return mac


class _Drive:
    """One channel of a fuzzed session (Fuzzer.drive): its valid frames pipelined, each mutated
    frame followed by a marker, and the channel's end (CLOSE, or on channel 0 END and RESULT)."""

    def __init__(self, fz: "Fuzzer", t: Target, g: Gen, s: Sess, ch: int, chan: Chan, rec: dict):
        self.fz, self.t, self.g, self.s, self.ch, self.chan, self.rec = fz, t, g, s, ch, chan, rec
        self.r = g.rng
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.marker = MARK_BASE + self.r.randrange(1 << 24) * 16

    def log(self, kind: str, f: bytes, tag: str = "") -> None:
        # (a session keeps its frames for the findings file, valid ones up to 1 MiB: past
        # that, their length only; mutated ones always)
        rec = self.rec
        if len(rec["frames"]) >= 2000:
            return
        if kind == "v" and rec.get("kept", 0) + len(f) > (1 << 20):
            rec["frames"].append([self.ch, "omitted", len(f), tag])
            return
        rec["kept"] = rec.get("kept", 0) + len(f)
        rec["frames"].append([self.ch, kind, f, tag])

    async def sync(self, extra: list[bytes]) -> tuple:
        """Send pending + extra + a marker; wait for the marker's verdict."""
        self.marker += 1
        mk = wire.encode(wire.RoundEnd(self.marker))
        await self.chan.send(self.pending + extra + [mk])
        n = len(self.pending)
        self.pending, self.pending_bytes = [], 0
        # (read even if the send failed: the receiver's ERROR may be waiting there)
        out = await self.chan.wait(self.marker, self.fz.timeout)
        if out[0] == "ack":
            self.fz.counted(self.t, "frames_valid", n)
        return out

    async def _send_mutated(self, f: bytes, tag: str, cons: bool) -> tuple:
        """A mutated frame sent after the pending ones: a consistent one followed by a marker, a
        truncating one by the end of the stream.  Returns the verdict."""
        fz, t, chan = self.fz, self.t, self.chan
        if cons:
            self.log("m", f, tag)
            n = len(self.pending)
            out = await self.sync([f])
            if out[0] == "ack":
                fz.counted(t, "frames_mutated")
            elif out[0] in ("error", "eof", "lost", "result", "closed"):
                fz.counted(t, "frames_valid", n)
                fz.counted(t, "frames_mutated")
        else:
            self.log("t", f, tag)
            n = len(self.pending)
            await chan.send(self.pending + [f])
            self.pending, self.pending_bytes = [], 0
            await chan.send_eof()
            out = await chan.wait(None, fz.timeout)
            fz.counted(t, "frames_valid", n)
            fz.counted(t, "frames_terminal")
        return out

    async def mutated(self) -> bool:
        """One mutated frame and its verdict checked against what the protocol expects.
        Returns True to go on with the channel."""
        fz, t, s, ch, rec = self.fz, self.t, self.s, self.ch, self.rec
        f, tag, expect, equivalent = self.g.session_mutation(s, ch)
        cons = consistent(f)
        s.inflight += 1
        try:
            out = await self._send_mutated(f, tag, cons)
        finally:
            s.inflight -= 1
        op = tag.split("@")[0]
        verdict = {"ack": "acc", "result": "acc", "closed": "acc"}.get(out[0], "rej")
        t.outcomes[f"{op}:{verdict}"] += 1
        if out[0] == "error":
            fz.note_error(t, out[1])
        if out[0] == "timeout":
            s.dead = True
            fz.stuck_(t, rec, f"no verdict on a mutated frame ({tag}) within "
                              f"{fz.timeout:.0f} s")
            return False
        if out[0] == "bad-answer":
            fz.unexpected_(t, f"malformed answer after {tag}: {out[1]}", rec)
        if verdict == "acc":
            if expect == "reject":
                fz.unexpected_(t, f"a frame the protocol forbids was accepted ({tag})", rec)
            fz.accepted(t, s, ch, f, tag, rec)
            if out[0] == "result":
                s.dead = True
                return False
            if out[0] == "closed":
                s.closed.add(ch)
                return False
            return True
        if out[0] in ("eof", "lost", "error") and not cons:
            s.dead = True
            return False
        # (in a multi-channel session, another channel's mutated frame may have failed
        # it meanwhile: then this refusal is not this frame's)
        if (expect == "accept" or equivalent) and not s.dead and not s.inflight:
            fz.unexpected_(t, f"a valid frame was refused ({tag}): {out[1:]}", rec)
        s.dead = True
        return False

    async def valid(self) -> bool:
        """One valid frame, pending; synced once 96 frames or 1 MiB are.  Returns True to go on."""
        s, ch = self.s, self.ch
        f, apply = self.g.valid_frame(s, ch)
        apply()
        s.last[ch] = f
        self.log("v", f)
        self.pending.append(f)
        self.pending_bytes += len(f)
        if len(self.pending) >= 96 or self.pending_bytes > (1 << 20):
            out = await self.sync([])
            if not self.fz.valid_verdict(self.t, s, out, self.rec):
                return False
        return True

    async def close_channel(self) -> None:
        """The end of a channel other than 0: CLOSE, answered by CLOSED."""
        close = wire.encode(wire.Close())
        self.log("v", close)
        out = await self.sync([close])
        if out[0] == "closed":
            self.fz.counted(self.t, "frames_valid", 1)
            self.s.closed.add(self.ch)
        else:
            self.fz.valid_verdict(self.t, self.s, out, self.rec)

    async def end_session(self, done: list[trio.Event]) -> None:
        """Channel 0's end, once the others have closed: END (its digests right or wrong, with
        a commit or not) or the sender gone; the RESULT checked; then the commit step."""
        fz, t, s, r, rec = self.fz, self.t, self.s, self.r, self.rec
        for e in done[1:]:
            await e.wait()
        if s.dead:
            return
        if self.pending:
            out = await self.sync([])
            if not fz.valid_verdict(t, s, out, rec):
                return
        if s.closed != set(range(1, s.channels)):
            return
        ending = r.random()
        if ending < 0.2:
            return                    # the sender goes away: the session fails
        digests = s.model.digests()
        wrong = ending < 0.3
        if wrong:
            i = r.randrange(len(digests))
            digests[i] = ("0" if digests[i][0] != "0" else "1") + digests[i][1:]
        commit = HAS_COMMIT and r.random() < 0.5
        end = wire.encode(wire.End(tuple(digests), commit) if commit else wire.End(tuple(digests)))
        self.log("v", end)
        await self.chan.send([end])
        out = await self.chan.wait(None, fz.timeout)
        if out[0] != "result":
            if not s.dead:
                fz.unexpected_(t, f"no RESULT after END: {out}", rec)
            return
        fz.counted(t, "frames_valid", 1)
        res = out[1]
        t.count["sessions_ended"] += 1
        if res.complete:
            t.count["sessions_complete"] += 1
        if wrong and res.complete:
            fz.unexpected_(t, "a wrong digest verified", rec)
        elif not wrong and s.model.valid and not res.complete:
            fz.unexpected_(t, f"a session did not verify: {res.message}", rec,
                           ours=digests, theirs=list(res.digests))
        if commit and res.complete:
            await fz.commit_step(t, self.g, self.chan, rec, self.log)


class Fuzzer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.seed = args.seed
        self.root = tempfile.mkdtemp(prefix="migrator-fuzz-", dir=args.out_dir)
        self.findings_dir = args.findings_dir or os.path.join(tempfile.gettempdir(), f"migrator-fuzz-findings-{self.seed}")
        os.makedirs(self.findings_dir, exist_ok=True)
        modes = {"mix": [("no-key", False), ("keyed", True)], "keyed": [("keyed", True)],
                 "no-key": [("no-key", False)]}[args.mode]
        self.targets = [Target(n, k, self.root, args.max_memory, malloc_env=args.malloc_env)
                        for n, k in modes]
        self.quarantine = Quarantine(x for x in (args.skip or "").split(",") if x)
        self.crashes: list[dict] = []
        self.hangs: list[dict] = []
        self.stuck: list[dict] = []
        self.unexpected: list[dict] = []
        self.leaks: list[dict] = []
        self.spikes: list[dict] = []
        self.signatures: collections.Counter = collections.Counter()    # crash signature -> times
        from ..units import parse_size
        self.peak_limit_kib = (parse_size(args.max_memory) >> 10) + int(args.peak_margin_mib * 1024)
        self.files: list[str] = []
        self.phase_no = 0
        self.t0 = 0.0
        self.timeout = args.io_timeout
        self.slow_max = 0.0
        self.interrupted = False

    # counting

    @property
    def total(self) -> int:
        return sum(t.count["inputs"] for t in self.targets)

    def counted(self, t: Target, what: str, n: int = 1) -> None:
        t.count[what] += n
        t.count["inputs"] += n

    def unexpected_(self, t: Target, what: str, rec: dict | None, **info) -> None:
        if len(self.unexpected) < 200:
            entry = {"target": t.name, "what": what, "at_inputs": self.total, **info}
            if rec is not None:
                entry["input"] = self.save(t, [rec], f"unexpected-{len(self.unexpected)}")
            self.unexpected.append(entry)
            print(f"  UNEXPECTED ({t.name}): {what} {json.dumps(info, default=str)[:300]}", flush=True)

    def note_error(self, t: Target, msg: str) -> None:
        if "receiver internal error" in msg:
            # (the receiver survives its own bugs and fails the session: still a finding)
            self.unexpected_(t, f"a receiver bug: {msg[:300]}", None)
        key = norm_error(msg)
        if key in t.errors or len(t.errors) < 400:
            t.errors[key] += 1
        else:
            t.errors["(other)"] += 1

    def save(self, t: Target, records, label: str) -> str:
        path = os.path.join(self.findings_dir, f"{t.name}-g{t.generation}-{label}.jsonl")
        with open(path, "w") as f:
            for rec in records:
                f.write(json.dumps(jsonable({**rec, "target": t.name, "keyed": t.keyed}),
                                   default=str) + "\n")
        self.files.append(path)
        return path

    # pre-auth connections

    async def conn_input(self, t: Target, src: str, rec: dict) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        resp = bytearray()
        try:
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            await sock.bind((src, 0))
            try:
                with trio.fail_after(self.timeout):
                    await sock.connect(("127.0.0.1", t.port))
            except trio.TooSlowError:
                self.stuck_(t, rec, f"connecting took over {self.timeout:.0f} s")
                return
            except OSError as e:
                t.count["connect_failed"] += 1
                if not t.alive:
                    return
                raise TransportError(f"connect: {e}") from None
            self.counted(t, "conns")
            view = memoryview(rec["payload"])
            try:
                while view:
                    n = await sock.send(view)
                    view = view[n:]
            except OSError:
                t.count["conn_send_refused"] += 1     # (the receiver gave up first: fine)
            if rec["style"] == "rst":
                return
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            with trio.move_on_after(self.timeout) as cs:
                await drain(sock.recv, resp, limit=1 << 20)
            if cs.cancelled_caught:
                self.stuck_(t, rec, f"the receiver neither answered nor closed a pre-auth "
                                    f"connection {self.timeout:.0f} s after its EOF")
            self.answer(t, rec, bytes(resp))
        finally:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            except OSError:
                pass
            sock.close()

    def answer(self, t: Target, rec: dict, resp: bytes) -> None:
        frames = parse_plain(resp)
        sig = ">".join(n for n, _ in frames) or "(closed, no answer)"
        t.answers[sig] += 1
        for name, m in frames:
            if name == "ERROR" and isinstance(m, dict) and isinstance(m.get("message"), str):
                self.note_error(t, m["message"])
            if name == "?" or (name not in ("CHALLENGE", "ERROR", "WELCOME", "SETUP_OK") and not t.keyed):
                self.unexpected_(t, f"malformed pre-auth answer {sig}", rec, answer=resp[:200].hex())
                return
        if t.keyed and any(n in ("WELCOME", "SETUP_OK") for n, _ in frames):
            self.unexpected_(t, "WELCOME for a blind (unauthenticated) connection", rec)

    def stuck_(self, t: Target, rec: dict | None, why: str) -> None:
        t.count["stuck"] += 1
        t.phase_stuck += 1         # (3 in a phase end it: the checkpoint's probe judges)
        if len(self.stuck) < 50:
            entry = {"target": t.name, "why": why, "at_inputs": self.total}
            if rec is not None:
                entry["input"] = self.save(t, [rec], f"stuck-{len(self.stuck)}")
            self.stuck.append(entry)
            print(f"  STUCK ({t.name}): {why}", flush=True)

    async def auth_input(self, t: Target, src: str, g: Gen, rec: dict) -> None:
        """A real HELLO/CHALLENGE, then a mutated AUTH; any WELCOME must be for the right proof."""
        r = g.rng
        with trio.move_on_after(self.timeout):
            stream = await trio.open_tcp_stream("127.0.0.1", t.port, local_address=src)
        if "stream" not in locals():
            self.stuck_(t, rec, f"connecting took over {self.timeout:.0f} s")
            return
        fs = FrameStream(stream, "receiver")
        try:
            self.counted(t, "auth_inputs")
            key = t.key
            enc = t.keyed and r.random() < 0.3
            mode = None if key is None else ("aead" if enc else "mac")
            session, channel = r.randbytes(16), rec["channel"]
            nonce_c = r.randbytes(32)
            hello = wire.encode(wire.Hello(wire.VERSION, nonce_c, session, channel, key is not None, enc))
            rec["hello"] = hello
            with trio.move_on_after(self.timeout) as cs:
                await stream.send_all(hello)
                try:
                    ch = await fs.expect(wire.Challenge)
                except PeerClosed:
                    return
                except TransportError as e:
                    self.note_error(t, reason_of(e))
                    return
                right = None
                if key is not None:
                    right = proof(key, "client", nonce_c, ch.nonce, session, channel, mode)
                    if ch.mac != proof(key, "server", nonce_c, ch.nonce, session, channel, mode):
                        self.unexpected_(t, "the receiver's proof is wrong", rec)
                sub = rec["sub"]
                mac = auth_mac(r, sub, key, right, ch, nonce_c, session, channel, mode)
                if sub == "frame":
                    auth, tag, _ = g.mut.frame(T.AUTH, {"mac": mac})
                else:
                    auth, tag = frame(T.AUTH, {"mac": mac}), f"auth-{sub}"
                rec["auth"], rec["tag"] = auth, tag
                await stream.send_all(auth)
                await stream.send_eof()
                await self._auth_verdict(t, rec, fs, auth, right, channel)
                # drain until the receiver closes (its session, if any, fails: no SETUP)
                await drain(stream.receive_some)
            if cs.cancelled_caught:
                self.stuck_(t, rec, "an AUTH exchange got no verdict")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await fs.aclose()

    async def _auth_verdict(self, t: Target, rec: dict, fs: FrameStream, auth: bytes, right: bytes | None,
                            channel: int) -> None:
        """WELCOME or a refusal for the AUTH sent: a WELCOME only for the right proof, the right
        proof never refused (but for a busy receiver)."""
        key, sub = t.key, rec["sub"]
        refusal = ""
        try:
            await fs.expect(wire.Welcome)
            welcomed = True
        except PeerClosed:
            welcomed = False
        except TransportError as e:
            welcomed = False
            refusal = reason_of(e)
            self.note_error(t, refusal)
        t.answers["auth:" + ("WELCOME" if welcomed else "refused")] += 1
        if welcomed and key is not None:
            sent = None
            try:      # (the receiver judges the first frame; bytes after it come later)
                _, _, _, ml, dl = HEADER.unpack_from(auth)
                sent = wire.decode_frames(auth[:wire.HEADER_SIZE + ml + dl])[0]
            except Exception:
                pass
            if not isinstance(sent, wire.Auth) or sent.mac != right:
                self.unexpected_(t, "AUTHENTICATION BYPASS: WELCOME for a wrong proof", rec)
        if (key is not None and sub == "right" and not welcomed and channel == 0
                and "busy" not in refusal):
            self.unexpected_(t, f"the right proof was refused: {refusal}", rec)

    async def slow_input(self, t: Target, src: str, g: Gen) -> None:
        """A prefix, then silence: the receiver must close within its handshake timeout."""
        r = g.rng
        hello = frame(T.HELLO, g.hello())
        payload = r.choice((b"", hello[:r.randrange(1, len(hello))], hello,
                            HEADER.pack(wire.MAGIC, wire.VERSION, T.HELLO, 4000, 0) + b"\x85"))
        rec = {"kind": "slow", "payload": payload, "state": "inflight", "t": time.time()}
        t.remember(rec)
        sock = trio.socket.socket()
        try:
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            await sock.bind((src, 0))
            with trio.move_on_after(self.timeout) as cs:
                await sock.connect(("127.0.0.1", t.port))
            if cs.cancelled_caught:
                return
            t0 = time.monotonic()
            if payload:
                await sock.send(payload)
            limit = HANDSHAKE_TIMEOUT + max(4.0, self.timeout - HANDSHAKE_TIMEOUT)
            with trio.move_on_after(limit) as cs:
                await drain(sock.recv)
            self.counted(t, "slow_inputs")
            if cs.cancelled_caught:
                self.stuck_(t, rec, f"a silent pre-auth connection was still open after {limit:.0f} s "
                                    f"(handshake timeout {HANDSHAKE_TIMEOUT:.0f} s)")
            else:
                self.slow_max = max(self.slow_max, time.monotonic() - t0)
        except OSError:
            pass
        finally:
            rec["state"], rec["t_end"] = "done", time.time()
            sock.close()

    async def preauth_worker(self, t: Target, src: str, rng: random.Random, budget: Budget) -> None:
        g = Gen(rng, t, self.quarantine)
        while t.alive and budget.take():
            rec = g.preauth()
            rec.update(state="inflight", t=time.time())
            t.remember(rec)
            try:
                if rec["kind"] == "auth":
                    await self.auth_input(t, src, g, rec)
                else:
                    await self.conn_input(t, src, rec)
            except (TransportError, OSError):
                if not t.alive:
                    return
                t.count["conn_errors"] += 1
            finally:
                rec["state"], rec["t_end"] = "done", time.time()

    async def slow_worker(self, t: Target, src: str, rng: random.Random) -> None:
        g = Gen(rng, t, self.quarantine)
        while t.alive:
            await self.slow_input(t, src, g)

    # sessions

    async def session_worker(self, t: Target, rng: random.Random, budget: Budget) -> None:
        g = Gen(rng, t, self.quarantine)
        while budget.left > 0 and t.alive:     # (a dead receiver's last inputs stay in the ring)
            if rng.random() < self.args.setup_share:
                budget.take()
                await self.setup_input(t, g)
            else:
                await self.session(t, g, budget)

    async def setup_input(self, t: Target, g: Gen) -> None:
        """A handshake, then a mutated SETUP (and nothing more)."""
        r = g.rng
        if r.random() < 0.5:
            for _ in range(8):
                f, tag, expect = g.setup_semantic()
                if tag not in self.quarantine:
                    break
        else:
            ps, regions, channels, codec = g.setup_msg()
            tt, meta, _ = g._split(g.setup_frame(ps, regions, channels, codec))
            if r.random() < 0.15:   # many regions (up to MAX_REGIONS), small
                meta = dict(meta)
                meta["regions"] = [[f"r{i}", i * ps, (i + 1) * ps] for i in range(r.choice((16, 1000, 1024, 1025)))]
            f, tag, equivalent = g.mut.frame(tt, meta)
            expect = "accept" if equivalent and len(meta["regions"]) <= wire.MAX_REGIONS else None
        enc = t.keyed and r.random() < 0.3
        rec = {"kind": "setup", "setup": f, "encrypt": enc, "tag": tag, "state": "inflight", "t": time.time()}
        t.remember(rec)
        try:
            try:
                chan = await open_chan(t.port, t.key, r.randbytes(16), 0, f, enc, self.timeout)
            except Refused as e:
                self.counted(t, "setup_inputs")
                self.note_error(t, str(e))
                if "busy" in str(e):      # (the receiver's reason: "receiver busy with ...")
                    t.count["busy"] += 1
                t.outcomes[f"{tag.split('@')[0]}@SETUP:rej"] += 1
                return
            except (TransportError, OSError, trio.TooSlowError) as e:
                if t.alive and isinstance(e, trio.TooSlowError):
                    self.stuck_(t, rec, "a SETUP handshake got no verdict")
                return
            try:
                self.counted(t, "setup_inputs")
                await chan.send_eof()
                out = await chan.wait(None, self.timeout)
                if out[0] == "error":
                    self.note_error(t, out[1])
                accepted = out[0] == "setup_ok"
                if expect == "accept" and out[0] == "error":
                    self.unexpected_(t, f"a valid SETUP was refused ({tag}): {out[1]}", rec)
                elif expect == "reject" and accepted:
                    self.unexpected_(t, f"a SETUP the protocol forbids was accepted ({tag})", rec)
                if accepted:       # then the sender's EOF fails the session
                    out = await chan.wait(None, self.timeout)
                if out[0] == "bad-answer":
                    self.unexpected_(t, f"malformed answer to a SETUP: {out[1]}", rec)
                t.outcomes[f"{tag.split('@')[0]}@SETUP:{'acc' if accepted else 'rej'}"] += 1
                if out[0] == "timeout":
                    self.stuck_(t, rec, "no answer to a SETUP within the timeout")
            finally:
                await chan.aclose()
        finally:
            rec["state"], rec["t_end"] = "done", time.time()

    async def session(self, t: Target, g: Gen, budget: Budget) -> None:
        r = g.rng
        s = g.new_session()
        sid = r.randbytes(16)
        rec = {"kind": "session", "encrypt": s.encrypt, "channels": s.channels, "setup": s.setup,
               "frames": [], "state": "inflight", "t": time.time()}
        t.remember(rec)
        chans: list[Chan] = []
        try:
            try:
                chans.append(await open_chan(t.port, t.key, sid, 0, s.setup, s.encrypt, self.timeout))
                out = await chans[0].wait(None, self.timeout)
                if out[0] != "setup_ok":
                    if out[0] == "error":
                        self.unexpected_(t, f"a valid SETUP was refused: {out[1]}", rec)
                    return
                for i in range(1, s.channels):
                    chans.append(await open_chan(t.port, t.key, sid, i, None, s.encrypt, self.timeout))
            except Refused as e:
                if "busy" in str(e):
                    t.count["busy"] += 1
                    await trio.sleep(0.01)
                    return
                await trio.sleep(0.5)      # (a receiver dying now is a crash, not a refusal)
                if t.alive:
                    self.unexpected_(t, f"a valid session was refused: {e}", rec)
                return
            except (TransportError, OSError, trio.TooSlowError) as e:
                if t.alive and isinstance(e, trio.TooSlowError):
                    self.stuck_(t, rec, "a session handshake got no answer")
                return
            t.count["sessions"] += 1
            # a prefix of valid frames (pipelined, cheap), then frames mutated with probability
            # mut_p: the first refused one ends the session
            s.prefix = r.choice((0, 0, 10, 50)) // s.channels
            steps = s.prefix * s.channels + r.choice((r.randint(1, 20), r.randint(20, 100), r.randint(100, 300)))
            done = [trio.Event() for _ in chans]
            async with trio.open_nursery() as nursery:
                for i, ch in enumerate(chans):
                    nursery.start_soon(self.drive, t, g, s, i, ch, max(1, steps // s.channels),
                                       budget, rec, done)
        finally:
            rec["state"], rec["t_end"] = "done", time.time()
            for ch in chans:
                await ch.aclose()

    async def drive(self, t: Target, g: Gen, s: Sess, ch: int, chan: Chan, steps: int,
                    budget: Budget, rec: dict, done: list[trio.Event]) -> None:
        """Frames on one channel (see _Drive): valid ones pipelined, each mutated one followed by a marker."""
        d = _Drive(self, t, g, s, ch, chan, rec)
        try:
            for step in range(steps):
                if s.dead:
                    return
                if not budget.take():
                    break
                if step >= s.prefix and d.r.random() < s.mut_p:
                    if not await d.mutated():
                        return
                    continue
                if not await d.valid():
                    return
            # the channel's end
            if s.dead:
                return
            if ch != 0:
                await d.close_channel()
                return
            await d.end_session(done)
        finally:
            done[ch].set()


    async def commit_step(self, t: Target, g: Gen, chan: Chan, rec: dict, log) -> None:
        """After a complete RESULT for END(commit): SYNCED must come; then a COMMIT (valid,
        mutated or another frame) or the sender goes away (the receiver waits 60 s for it)."""
        r = g.rng
        out = await chan.wait(None, self.timeout)
        if out[0] != "synced":
            if out[0] == "timeout":
                self.stuck_(t, rec, "no SYNCED after a complete RESULT")
            elif t.alive:
                self.unexpected_(t, f"no SYNCED after a complete RESULT: {out}", rec)
            return
        how = r.random()
        if how < 0.15:
            return                              # (gone without committing: the session fails)
        if how < 0.6:
            f, tag = wire.encode(wire.Commit()), "commit"
        elif how < 0.9:
            f, tag, _ = g.mut.frame(T.COMMIT, {})
        else:
            f, tag = g.wrong_type(None, 0)
        cons = consistent(f)
        log("m" if cons else "t", f, tag)
        await chan.send([f])
        if not cons:
            await chan.send_eof()
        out = await chan.wait(None, self.timeout)
        self.counted(t, "frames_mutated" if tag != "commit" else "frames_valid")
        t.outcomes[f"{tag.split('@')[0]}@COMMIT:{out[0]}"] += 1
        if out[0] == "error":
            self.note_error(t, out[1])
            if tag == "commit":
                self.unexpected_(t, f"a valid COMMIT was refused: {out[1]}", rec)
        elif out[0] == "timeout":
            # (a consistent frame that is not COMMIT nor refused: the receiver waits for more)
            if cons and tag == "commit":
                self.stuck_(t, rec, "no end of session after COMMIT")
        elif out[0] == "bad-answer":
            self.unexpected_(t, f"malformed answer after {tag}: {out[1]}", rec)

    def valid_verdict(self, t: Target, s: Sess, out: tuple, rec: dict) -> bool:
        """After a marker following valid frames only: True to go on."""
        if out[0] == "ack":
            return True
        if out[0] == "timeout":
            s.dead = True
            self.stuck_(t, rec, f"no ROUND_ACK for valid frames within {self.timeout:.0f} s")
            return False
        if s.dead or s.inflight:     # another channel's mutated frame failed the session
            s.dead = True
            return False
        s.dead = True
        if out[0] == "error" and not t.alive:
            return False
        self.unexpected_(t, f"valid frames got {out[0]}: {out[1:] if len(out) > 1 else ''}", rec)
        return False

    def accepted(self, t: Target, s: Sess, ch: int, f: bytes, tag: str, rec: dict) -> None:
        """A mutated frame the receiver accepted: decode it as the protocol says and keep the
        model in step (a frame the client's decoder refuses is a divergence)."""
        try:
            _, _, ft, ml, dl = HEADER.unpack_from(f)
            msg = wire.decode(T(ft), f[wire.HEADER_SIZE:wire.HEADER_SIZE + ml], dl, s.ps)
            if isinstance(msg, wire.Batch):
                wire.check_batch(msg, s.model.npages)
                data = f[wire.HEADER_SIZE + ml:]
                if getattr(msg, "compression", 0):
                    data = _compress.decompress(msg.compression, data, msg.pages_data * s.ps, "batch")
                hashes = wire.check_digest(msg, data, s.ps)
                s.model.batch(msg.region, msg.round_no, list(msg.data_flat), list(msg.zero_flat), hashes)
            elif isinstance(msg, wire.Prepare):
                wire.check_batch(msg, s.model.npages)
                s.model.announced[msg.region] += sum(msg.runs_flat[1::2])
            s.last[ch] = f
        except ProtocolError as e:
            s.model.valid = False
            self.unexpected_(t, f"the receiver accepted a frame the protocol refuses ({tag}): {e}", rec)
        except Exception:
            s.model.valid = False

    # checks

    async def probe(self, t: Target) -> tuple[bool, float, str]:
        return await probe(t, self.seed)

    async def checkpoint(self, final: bool = False) -> None:
        for t in self.targets:
            if not t.alive:
                continue
            ok, ms, why = await self.probe(t)
            if not ok:
                # (a receiver dying right now, still writing its traceback, is a crash:
                # handled with the crashes, not as a hang)
                if state_letter(t.pid) not in ("T", "t"):      # (a stopped one is not dying)
                    try:
                        await trio.to_thread.run_sync(t.proc.wait, 3.0)
                    except subprocess.TimeoutExpired:
                        pass
                if not t.alive:
                    continue
                path = self.save(t, t.recent(), f"hang-{len(self.hangs)}")
                entry = {"target": t.name, "generation": t.generation, "at_inputs": self.total,
                         "why": why, "inputs_file": path, "log_tail": list(t.log_tail)[-20:],
                         "stderr_tail": t.stderr_tail(2000)}
                self.hangs.append(entry)
                print(f"  HANG ({t.name}): {why}; recent inputs in {path}", flush=True)
                t.reported = t.generation
                t.kill()
                t.start()
                continue
            s = proc_sample(t.pid)
            reset_peak(t.pid)
            if s["peak_kib"] > self.peak_limit_kib:
                path = self.save(t, t.recent(), f"peak-{len(self.spikes)}")
                self.spikes.append({"target": t.name, "generation": t.generation, "at_inputs": self.total,
                                    "peak_kib": s["peak_kib"], "limit_kib": self.peak_limit_kib,
                                    "inputs_file": path})
                print(f"  MEMORY SPIKE ({t.name}): VmHWM {s['peak_kib'] >> 10} MiB in the last "
                      f"phase (limit {self.peak_limit_kib >> 10} MiB); recent inputs in {path}", flush=True)
            s.update(inputs=self.total, t_inputs=t.count["inputs"], probe_ms=round(ms, 1),
                     elapsed_s=round(time.monotonic() - self.t0, 1), generation=t.generation)
            t.checkpoints.append(s)
            if t.baseline is None:
                t.baseline = s         # after the warm-up (the first phase) of this generation
            t.clean_out()

    async def monitor(self, scope: trio.CancelScope, live: list[Target]) -> None:
        for t in live:
            t.phase_stuck = 0
        while True:
            for t in live:
                if not t.alive or t.phase_stuck >= 3:
                    scope.cancel()
                    return
            await trio.sleep(0.1)

    async def after_crash(self, t: Target) -> None:
        d = t.death()
        label = f"crash-{len(self.crashes)}"
        recent = t.recent()
        path = self.save(t, recent, label)
        entry = {"target": t.name, "generation": t.generation, "pid": t.pid, "at_inputs": self.total,
                 **d, "inputs_file": path}
        print(f"  CRASH ({t.name}, pid {t.pid}): {'signal ' + d['signal'] if d['signal'] else 'exit ' + str(d['returncode'])}: "
              f"{d['signature']}\n  recent inputs saved in {path}", flush=True)
        self.crashes.append(entry)
        self.signatures[d["signature"]] += 1
        if self.args.triage and self.signatures[d["signature"]] <= 3:
            # in flight first, then the most recently finished (a session the crash ended
            # finishes on its EOF before the monitor notices); silent connections wait out the
            # handshake timeout: not candidates
            # ... within 2 s of the death: sessions and SETUPs first (they reach the deeper
            # parsers), newest first, then AUTH exchanges, then raw connections
            last = max((r.get("t_end", 0) for r in recent), default=0)
            near = [r for r in recent if r.get("state") == "inflight" or r.get("t_end", 0) >= last - 2.0]
            order = {"session": 0, "setup": 0, "auth": 1, "conn": 2}
            cand = sorted((r for r in near if r["kind"] != "slow"),
                          key=lambda r: (order.get(r["kind"], 3), -r.get("t_end", 1e18)))[:MAX_TRIAGE]
            found = await triage(t, cand[:MAX_TRIAGE], self.root, self.timeout)
            if found is not None:
                rp = self.save(t, [found], f"{label}-repro")
                entry["repro_file"] = rp
                entry["repro_tag"] = record_tag(found)
                tag = record_tag(found)
                if tag and tag != "none":
                    self.quarantine.add(tag)
                    entry["quarantined"] = tag
                print(f"  reproduced alone by one input ({found['kind']}, {tag}): {rp}\n"
                      f"  replay: {sys.executable} -m migrator.bench fuzz --replay {rp}", flush=True)
            else:
                print("  no single input in flight reproduces it alone (see the recent inputs)", flush=True)
        if len(self.crashes) < self.args.max_crashes:
            t.start()

    # phases

    async def phase(self, quota: int) -> None:
        self.phase_no += 1
        live = [t for t in self.targets if t.alive]
        if not live:
            return
        per = max(1, quota // len(live))
        async with trio.open_nursery() as outer:
            outer.start_soon(self.monitor, outer.cancel_scope, live)
            slow_scopes = [trio.CancelScope() for _ in live]

            async def slow(t, i):
                with slow_scopes[i]:
                    await self.slow_worker(t, f"127.0.0.{200 + i}", self.rng(f"slow-{t.name}-{i}"))
            for i, t in enumerate(live):
                outer.start_soon(slow, t, i)
            async with trio.open_nursery() as workers:
                for t in live:
                    # one budget per receiver, drawn by both kinds of workers: the mix follows
                    # their rates (no worker idles while the other kind finishes its share)
                    pre = sess = Budget(per)
                    w = 0
                    for a in range(self.args.addresses):
                        for k in range(self.args.per_address):
                            workers.start_soon(self.preauth_worker, t, f"127.0.0.{2 + a}",
                                               self.rng(f"pre-{t.name}-{w}"), pre)
                            w += 1
                    workers.start_soon(self.session_worker, t, self.rng(f"sess-{t.name}"), sess)
            for sc in slow_scopes:
                sc.cancel()
            outer.cancel_scope.cancel()

    def rng(self, who: str) -> random.Random:
        return random.Random(f"{self.seed}/{self.phase_no}/{who}")

    async def progress(self) -> None:
        last_n, last_t = 0, time.monotonic()
        while True:
            await trio.sleep(self.args.progress)
            now = time.monotonic()
            n = self.total
            parts = []
            for t in self.targets:
                c = t.count
                parts.append(f"{t.name}: {c['conns'] + c['auth_inputs']} conns, "
                             f"{c['frames_valid'] + c['frames_mutated'] + c['frames_terminal']} frames, "
                             f"{c['sessions']} sessions")
            print(f"[{now - self.t0:6.0f} s] {n:>8} inputs ({(n - last_n) / (now - last_t):5.0f}/s now, "
                  f"{n / (now - self.t0):5.0f}/s overall) | {' | '.join(parts)} | crashes {len(self.crashes)} "
                  f"hangs {len(self.hangs)} stuck {len(self.stuck)} unexpected {len(self.unexpected)}",
                  flush=True)
            last_n, last_t = n, now

    async def main(self) -> None:
        self.t0 = time.monotonic()
        for t in self.targets:
            t.start()
        goal = self.args.inputs
        warm = min(self.args.warmup, max(100, goal // 10))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.progress)
            # SIGTERM or SIGINT: stop fuzzing, then check and report as at the end (a run in
            # the background, where SIGINT is ignored, is stopped with SIGTERM)
            stop = trio.CancelScope()
            nursery.start_soon(self._stop_on_signal, stop)
            with stop:
                await self._fuzz(goal, warm)
            if stop.cancelled_caught:
                self.interrupted = True
                print("fuzz: stopped by a signal: checking the receivers and reporting", flush=True)
                await self.reap()
                await self.checkpoint()
            nursery.cancel_scope.cancel()
        await self.settle()

    async def _stop_on_signal(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                scope.cancel()
                return

    async def _fuzz(self, goal: int, warm: int) -> None:
        """Phases of inputs, each followed by a checkpoint, until `goal` inputs."""
        first = True
        while self.total < goal:
            await self.reap()
            if not any(t.alive for t in self.targets):
                break
            quota = min(warm if first else self.args.checkpoint, goal - self.total)
            t1 = time.monotonic()
            await self.phase(max(quota, 50))
            t2 = time.monotonic()
            await self.reap()
            await self.checkpoint()
            await self.reap()
            if self.args.verbose:
                print(f"  phase {self.phase_no}: {t2 - t1:.1f} s, checkpoint {time.monotonic() - t2:.1f} s",
                      flush=True)
            first = False
        await self.reap()

    async def reap(self) -> None:
        """Report receivers that died (once per generation) and restart them."""
        for t in self.targets:
            if t.proc is not None and not t.alive and t.reported != t.generation:
                t.reported = t.generation
                await self.after_crash(t)

    async def settle(self) -> None:
        """Leak verdicts: RSS after the warm-up vs now; descriptors and (busy) threads then and
        now, waiting up to --settle s for what is still closing."""
        deadline = time.monotonic() + self.args.settle
        for t in self.targets:
            if not t.alive or t.baseline is None:
                continue
            b = t.baseline
            while True:
                s = proc_sample(t.pid)
                # (idle cached trio workers, "Trio thread N", exit by themselves after 10 s:
                # only busy threads count)
                if (s["fds"] <= b["fds"] and s["busy_threads"] <= b["busy_threads"]) \
                        or time.monotonic() > deadline:
                    break
                await trio.sleep(0.25)
            t.final = s
            # RSS: glibc keeps freed heap memory (arenas of the worker threads), so the RSS after
            # the warm-up floats up to an envelope set by the largest transient allocations; a
            # leak keeps growing past it.  Verdict: the end against the highest checkpoint of
            # the first half of the run (after the warm-up).
            mine = [c for c in t.checkpoints if c["generation"] == t.generation]
            half = [c["rss_kib"] for c in mine if c["t_inputs"] <= (mine[-1]["t_inputs"] + mine[0]["t_inputs"]) / 2]
            t.envelope = max(half or [b["rss_kib"]])
            growth = s["rss_kib"] - t.envelope
            if growth > self.args.rss_leak_mib * 1024:
                self.leaks.append({"target": t.name, "kind": "rss", "start_kib": b["rss_kib"],
                                   "first_half_max_kib": t.envelope, "end_kib": s["rss_kib"],
                                   "growth_over_first_half_kib": growth})
            if s["fds"] > b["fds"]:
                self.leaks.append({"target": t.name, "kind": "fds", "before": b["fds"], "after": s["fds"],
                                   "fd_list": _fd_list(t.pid)})
            if s["busy_threads"] > b["busy_threads"]:
                self.leaks.append({"target": t.name, "kind": "threads", "before": b["busy_threads"],
                                   "after": s["busy_threads"], "names": _thread_names(t.pid)})
            for leak in self.leaks:
                if leak["target"] == t.name and "inputs_file" not in leak:
                    leak["inputs_file"] = self.save(t, t.recent(), f"leak-{leak['kind']}")

    def report(self, seconds: float) -> dict:
        targets = {}
        for t in self.targets:
            b = t.baseline or {}
            f = getattr(t, "final", None) or (t.checkpoints[-1] if t.checkpoints else {})
            xs = [(c["t_inputs"], c["rss_kib"]) for c in t.checkpoints
                  if c["generation"] == t.generation][1:] or [(0, 0)]
            slope = 0.0
            if len(xs) >= 2:
                mx = sum(x for x, _ in xs) / len(xs)
                my = sum(y for _, y in xs) / len(xs)
                den = sum((x - mx) ** 2 for x, _ in xs)
                slope = sum((x - mx) * (y - my) for x, y in xs) / den * 100000 if den else 0.0
            targets[t.name] = {
                "keyed": t.keyed, "pid": t.pid, "generation": t.generation,
                "generations": t.generations,
                "inputs": t.count["inputs"], "counts": dict(t.count),
                "rss_kib": {"launch": (t.launch or {}).get("rss_kib"), "start": b.get("rss_kib"),
                            "first_half_max": getattr(t, "envelope", None),
                            "end": f.get("rss_kib"), "growth": (f.get("rss_kib", 0) - b.get("rss_kib", 0)) if b else None,
                            "slope_kib_per_100k_inputs": round(slope, 1)},
                "fds": {"launch": (t.launch or {}).get("fds"), "before": b.get("fds"), "after": f.get("fds")},
                "threads": {"launch": (t.launch or {}).get("threads"), "before": b.get("threads"),
                            "after": f.get("threads"), "busy_before": b.get("busy_threads"),
                            "busy_after": f.get("busy_threads")},
                "checkpoints": t.checkpoints,
                "answers_top": t.answers.most_common(25),
                "errors_top": t.errors.most_common(60),
                "distinct_errors": len(t.errors),
                "mutation_outcomes": dict(sorted(t.outcomes.items())),
                "receiver_log_lines": t.log_lines,
            }
        crashes = [{k: v for k, v in c.items()} for c in self.crashes]
        return {
            "inputs": self.total, "seconds": round(seconds, 1), "rate": round(self.total / seconds, 1) if seconds else 0,
            "seed": self.seed, "mode": self.args.mode, "malloc_env": self.args.malloc_env,
            "code": getattr(self, "code", {}), "compression_fuzzed": bool(CODECS),
            "crashes": crashes, "crash_signatures": self.signatures.most_common(), "hangs": self.hangs, "stuck_connections": self.stuck,
            "leaks": self.leaks, "memory_spikes": self.spikes, "unexpected": self.unexpected,
            "quarantined": sorted(set(self.quarantine)),
            "slow_connection_max_s": round(self.slow_max, 2),
            "skipped": list(self.quarantine.skip), "max_channels": MAX_CHANNELS[0],
            "targets": targets, "files": self.files,
            "peak_limit_kib": self.peak_limit_kib,
            "ok": not (self.crashes or self.hangs or self.stuck or self.leaks or self.spikes
                       or self.unexpected),
        }


async def probe(t: Target, seed: int) -> tuple[bool, float, str]:
    """A fresh small migration must complete within PROBE_TIMEOUT (retried while the receiver
    is still closing a fuzz session: "busy").  (ok, milliseconds, why not)."""
    region = RegionSpec("probe", 0, 16 * PS)
    mem = random.Random(seed).randbytes(8 * PS) + bytes(8 * PS)

    class Reader(BufferReader):
        def read(self, name, first, n):
            return memoryview(mem)[first * PS:(first + n) * PS]
    from ..transport.digest import digest_bytes
    want = digest_bytes(mem)
    t0 = trio.current_time()
    why = ""
    while True:
        left = PROBE_TIMEOUT - (trio.current_time() - t0)
        if left <= 0:
            return False, PROBE_TIMEOUT * 1000, why or f"no answer within {PROBE_TIMEOUT:.0f} s"
        try:
            with trio.fail_after(left):
                async with connect_sender("127.0.0.1", t.port, key=t.key, regions=[region]) as snd:
                    await snd.send_pages({"probe": [(0, 16)]}, Reader(), 0)
                    res = await snd.finish({"probe": want})
            ms = (trio.current_time() - t0) * 1000
            if res.complete:
                return True, ms, ""
            return False, ms, f"the probe migration did not verify: {res}"
        except trio.TooSlowError:
            return False, PROBE_TIMEOUT * 1000, (why + "; " if why else "") + \
                f"no answer within {PROBE_TIMEOUT:.0f} s"
        except (MigratorError, OSError) as e:
            why = str(e)
            if not t.alive:
                return False, 0, "receiver dead"
            if "busy" in why:
                await trio.sleep(0.02)
                continue
            return False, (trio.current_time() - t0) * 1000, why


def _fd_list(pid: int) -> list[str]:
    out = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            out.append(f"{fd} -> {os.readlink(f'/proc/{pid}/fd/{fd}')}")
        except OSError:
            pass
    return out


def _thread_names(pid: int) -> list[str]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                out.append(f.read().strip())
        except OSError:
            pass
    return sorted(out)


def record_tag(rec: dict) -> str:
    """The mutation a recorded input carries (what gets quarantined)."""
    if rec.get("kind") == "session":
        tags = [f[3] for f in rec.get("frames", []) if f[1] in ("m", "t")]
        return tags[-1] if tags else "none"
    return rec.get("tag") or rec.get("sub") or "none"


# --- replay (triage after a crash, and --replay) ------------------------------------------------


async def replay_record(t: Target, rec: dict, timeout: float) -> str:
    """Send one recorded input to t as it was sent; returns what the receiver answered."""
    kind = rec["kind"]
    if kind in ("conn", "slow"):
        return await _replay_conn(t, rec, timeout)
    if kind == "auth":
        return await _replay_auth(t, rec, timeout)
    if kind == "setup":
        try:
            chan = await open_chan(t.port, t.key, os.urandom(16), 0, rec["setup"], rec.get("encrypt", False), timeout)
        except Refused as e:
            return f"refused: {e}"
        try:
            await chan.send_eof()
            return str(await chan.wait(None, timeout))[:200]
        finally:
            await chan.aclose()
    return await _replay_session(t, rec, timeout)


async def _replay_conn(t: Target, rec: dict, timeout: float) -> str:
    """A pre-auth connection's payload, then EOF (conn), a reset (style rst) or silence (slow)."""
    kind = rec["kind"]
    sock = trio.socket.socket()
    try:
        await sock.connect(("127.0.0.1", t.port))
        try:
            await sock.send(rec["payload"])
        except OSError:
            pass
        if rec.get("style") == "rst":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            return "reset"
        if kind == "conn":
            sock.shutdown(socket.SHUT_WR)
        resp = bytearray()
        with trio.move_on_after(timeout if kind == "conn" else HANDSHAKE_TIMEOUT + 4):
            await drain(sock.recv, resp)
        return ">".join(n for n, _ in parse_plain(bytes(resp))) or "closed"
    finally:
        sock.close()


async def _replay_auth(t: Target, rec: dict, timeout: float) -> str:
    """The recorded HELLO, then the recorded AUTH (its proof was for another CHALLENGE)."""
    if "hello" not in rec:
        return "(never sent)"
    stream = await trio.open_tcp_stream("127.0.0.1", t.port)
    try:
        await stream.send_all(rec["hello"])
        await trio.sleep(0.05)
        if rec.get("auth"):
            try:
                await stream.send_all(rec["auth"])
            except (trio.BrokenResourceError, OSError):
                pass
        await stream.send_eof()
        resp = bytearray()
        with trio.move_on_after(timeout):
            await drain(stream.receive_some, resp)
        return ">".join(n for n, _ in parse_plain(bytes(resp))) or "closed"
    finally:
        await stream.aclose()


async def _replay_session(t: Target, rec: dict, timeout: float) -> str:
    """A session: its channels, then its frames in the order they were sent."""
    sid = os.urandom(16)
    chans: list[Chan] = []
    try:
        try:
            chans.append(await open_chan(t.port, t.key, sid, 0, rec["setup"], rec.get("encrypt", False), timeout))
            await chans[0].wait(None, timeout)
            for i in range(1, rec.get("channels", 1)):
                chans.append(await open_chan(t.port, t.key, sid, i, None, rec.get("encrypt", False), timeout))
        except Refused as e:
            return f"refused: {e}"
        marker = MARK_BASE + 12345
        last = ""
        for ch, kind_, f, _tag in rec["frames"]:
            c = chans[ch]
            if kind_ == "omitted":
                continue
            if kind_ == "m":
                marker += 1
                await c.send([f, wire.encode(wire.RoundEnd(marker))])
                out = await c.wait(marker, timeout)
                last = str(out)[:200]
                if out[0] != "ack":
                    return last
            elif kind_ == "t":
                await c.send([f])
                await c.send_eof()
                return str(await c.wait(None, timeout))[:200]
            else:
                if not await c.send([f]):
                    return "connection closed"
        return last or "sent"
    finally:
        for c in chans:
            await c.aclose()


async def triage(t: Target, candidates: list[dict], root: str, timeout: float) -> dict | None:
    """Replay the candidates one by one against a fresh receiver; when it dies, confirm which
    of the last two did it by replaying each alone against another fresh one."""
    if not candidates:
        return None

    async def kills(recs: list[dict], settle: float) -> int | None:
        """Index of the input after which a fresh receiver was found dead, or None."""
        scratch = Target(f"{t.name}-triage", t.keyed, root, t.max_memory, quiet=True)
        scratch.start()
        try:
            t0 = time.monotonic()
            for i, rec in enumerate(recs):
                if time.monotonic() - t0 > 40:
                    return None
                try:
                    with trio.move_on_after(4.0):
                        await replay_record(scratch, rec, 2.0)
                except (MigratorError, OSError, trio.BrokenResourceError, Refused, KeyError, IndexError):
                    pass
                await trio.sleep(settle)
                if not scratch.alive:
                    return i
            return None
        finally:
            scratch.kill()
    i = await kills(candidates, 0.05)
    if i is None:
        return None
    # (a receiver takes a moment to die, writing its traceback: the culprit may be a few back)
    for j in range(i, max(-1, i - 9), -1):
        if await kills([candidates[j]], 0.6) == 0:
            return candidates[j]
    return None


async def replay_file(args: argparse.Namespace) -> int:
    with open(args.replay) as f:
        records = [unjson(json.loads(line)) for line in f if line.strip()]
    if args.replay_index is not None:
        records = [records[args.replay_index]]
    if not records:
        print("nothing to replay")
        return 2
    keyed = records[0].get("keyed", False)
    root = tempfile.mkdtemp(prefix="migrator-fuzz-replay-", dir=args.out_dir)
    snapshot_code(root)
    t = Target("replay", keyed, root, args.max_memory)
    t.start()
    try:
        for i, rec in enumerate(records):
            try:
                with trio.move_on_after(args.io_timeout + HANDSHAKE_TIMEOUT + 5):
                    what = await replay_record(t, rec, args.io_timeout)
            except (MigratorError, OSError, trio.BrokenResourceError, Refused) as e:
                what = f"{type(e).__name__}: {e}"
            for _ in range(10):
                if not t.alive:
                    break
                await trio.sleep(0.03)
            print(f"input {i} ({rec['kind']}, {record_tag(rec)}): {what}", flush=True)
            if not t.alive:
                d = t.death()
                print(f"RECEIVER DIED after input {i}: {'signal ' + d['signal'] if d['signal'] else 'exit ' + str(d['returncode'])}\n"
                      f"{d['stderr_tail']}", flush=True)
                return 1
        ok, ms, why = await probe(t, args.seed)
        print(f"after {len(records)} input(s): receiver alive, probe migration "
              f"{'completed in %.0f ms' % ms if ok else 'FAILED: ' + why}", flush=True)
        return 0 if ok else 1
    finally:
        t.stop()
        shutil.rmtree(root, ignore_errors=True)


# --- command line ---------------------------------------------------------------------------


def register(sub) -> None:
    p = sub.add_parser("fuzz", help="fuzz a live `migrator receive` process (crashes, hangs, leaks)",
                       description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--inputs", type=int, default=1_000_000, help="inputs to run (default 1000000)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--mode", choices=("mix", "keyed", "no-key"), default="mix",
                   help="receivers to fuzz: one with a key (frames sealed: mutations go behind "
                        "the tag) and one without (raw bytes to the parser), or one of them "
                        "(default mix: both, inputs split evenly)")
    g.add_argument("--keyed", dest="mode", action="store_const", const="keyed", help="= --mode keyed")
    g.add_argument("--no-key", dest="mode", action="store_const", const="no-key", help="= --mode no-key")
    p.add_argument("--progress", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--warmup", type=int, default=20_000,
                   help="inputs before the RSS/fd/thread baseline is taken (default 20000, "
                        "at most a tenth of --inputs)")
    p.add_argument("--checkpoint", type=int, default=50_000,
                   help="inputs between checkpoints (probe migration, RSS/fds/threads; default 50000)")
    p.add_argument("--io-timeout", type=float, default=10.0,
                   help="seconds the receiver may take to answer or close (a stuck connection beyond)")
    p.add_argument("--rss-leak-mib", type=float, default=128.0,
                   help="VmRSS at the end above the highest checkpoint of the run's first half "
                        "(after the warm-up) counted as a leak (default 128: failed sessions' "
                        "buffers wait for the cyclic garbage collector, so RSS floats)")
    p.add_argument("--peak-margin-mib", type=float, default=512.0,
                   help="a receiver's peak RSS in a phase above --max-memory plus this is a memory "
                        "spike (default 512)")
    p.add_argument("--malloc-env", action="store_true",
                   help="start the receivers with MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ at "
                        "128 KiB (VmRSS then follows the memory held more closely than glibc's cache)")
    p.add_argument("--settle", type=float, default=15.0,
                   help="seconds to wait at the end for descriptors/threads still closing")
    p.add_argument("--max-memory", default="256M",
                   help="the receivers' --max-memory (default 256M: bounds what one fuzzed SETUP "
                        "may make a receiver allocate)")
    p.add_argument("--setup-share", type=float, default=0.5,
                   help="share of a session worker's turns that send one mutated SETUP (default 0.5; "
                        "the others run a whole session of frames)")
    p.add_argument("--addresses", type=int, default=2, help="source addresses 127.0.0.2.. for pre-auth")
    p.add_argument("--per-address", type=int, default=5,
                   help="concurrent pre-auth connections per source address (receiver cap: 8)")
    p.add_argument("--max-channels", type=int, default=3,
                   help="channels of a fuzz session at most (default 3; 30%% of sessions use 2..N)")
    p.add_argument("--skip", metavar="SUBSTR,...",
                   help="do not generate mutations whose tag contains one of these (e.g. a crash "
                        "already reported and not yet fixed: deep)")
    p.add_argument("--max-crashes", type=int, default=100, help="stop restarting a receiver after this many crashes")
    p.add_argument("--no-triage", dest="triage", action="store_false",
                   help="do not replay inputs alone after a crash to find the one that causes it")
    p.add_argument("--findings-dir", help="where inputs of findings go (default $TMPDIR/migrator-fuzz-findings-SEED)")
    p.add_argument("--out-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                   help="where the receivers write their images (default /dev/shm)")
    p.add_argument("--verbose", action="store_true", help="time each phase and checkpoint")
    p.add_argument("--replay", metavar="FILE", help="replay saved inputs (JSON lines) against a fresh receiver, in order")
    p.add_argument("--replay-index", type=int, help="with --replay: only this input (0-based)")
    p.set_defaults(handler=run)


def snapshot_code(root: str) -> dict:
    """Copy the migrator package this process imported into root/code, for the receivers: the
    tree may be edited while a long run goes on, and a receiver restarted after a crash must
    speak the protocol of the fuzzer (and of its probe).  Returns what was copied (with the git
    HEAD and whether the package had local changes, read-only)."""
    import migrator
    src = os.path.dirname(os.path.abspath(migrator.__file__))
    dst = os.path.join(root, "code")
    shutil.copytree(src, os.path.join(dst, "migrator"), ignore=shutil.ignore_patterns("__pycache__"))
    CODE[0] = dst
    info = {"package": src, "snapshot": dst}
    repo = os.path.dirname(src)
    try:
        info["git_head"] = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True,
                                          text=True, timeout=10).stdout.strip()
        changes = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--", "migrator"],
                                 capture_output=True, text=True, timeout=10).stdout.split("\n")
        info["local_changes"] = [x.strip() for x in changes if x.strip()]
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def run(args: argparse.Namespace) -> int:
    MAX_CHANNELS[0] = max(1, min(args.max_channels, wire.MAX_CHANNELS))
    if args.replay:
        return trio.run(replay_file, args)
    fz = Fuzzer(args)
    fz.code = snapshot_code(fz.root)
    print(f"fuzz: code {fz.code['package']} (git {fz.code.get('git_head', '?')[:12]}"
          f"{', with local changes' if fz.code.get('local_changes') else ''}), copied for the receivers",
          flush=True)
    print(f"fuzz: {args.inputs} inputs, seed {args.seed}, mode {args.mode}, checkpoints every "
          f"{args.checkpoint} inputs (probe migration within {PROBE_TIMEOUT:.0f} s), "
          f"compression {'fuzzed' if CODECS else 'absent'}; findings to {fz.findings_dir}", flush=True)
    t0 = time.monotonic()
    interrupted = False
    try:
        trio.run(fz.main)
        interrupted = fz.interrupted
    except KeyboardInterrupt:
        interrupted = True
        print("fuzz: interrupted", flush=True)
    finally:
        seconds = time.monotonic() - t0
        for t in fz.targets:
            t.stop()
        shutil.rmtree(fz.root, ignore_errors=True)
    res = fz.report(seconds)
    res["interrupted"] = interrupted
    print_summary(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=str)
    return 0 if res["ok"] and not interrupted else 1


def print_summary(res: dict) -> None:
    print(f"\nfuzz summary: {res['inputs']} inputs in {res['seconds']:.0f} s ({res['rate']:.0f}/s), "
          f"seed {res['seed']}, mode {res['mode']}")
    for name, t in res["targets"].items():
        c = t["counts"]
        print(f"  {name} receiver (pid {t['pid']}, generation {t['generation']}): {t['inputs']} inputs = "
              f"{c.get('conns', 0)} pre-auth connections + {c.get('auth_inputs', 0)} AUTH exchanges + "
              f"{c.get('slow_inputs', 0)} silent + {c.get('setup_inputs', 0)} SETUPs + "
              f"{c.get('frames_valid', 0)} valid + {c.get('frames_mutated', 0)} mutated + "
              f"{c.get('frames_terminal', 0)} truncating frames in {c.get('sessions', 0)} sessions "
              f"({c.get('sessions_complete', 0)} completed and verified)")
        r, fd, th = t["rss_kib"], t["fds"], t["threads"]
        print(f"    VmRSS {r['launch']} KiB at launch, {r['start']} KiB after the warm-up, {r['end']} KiB at "
              f"the end (growth {r['growth']} KiB; first half's highest {r['first_half_max']} KiB; trend "
              f"{r['slope_kib_per_100k_inputs']} KiB/100k inputs); "
              f"fds {fd['before']} -> {fd['after']}; threads {th['before']} -> {th['after']} "
              f"(busy {th['busy_before']} -> {th['busy_after']}); {t['distinct_errors']} distinct refusals")
    print(f"  crashes {len(res['crashes'])}, hangs {len(res['hangs'])}, stuck connections "
          f"{len(res['stuck_connections'])}, leaks {len(res['leaks'])}, memory spikes "
          f"{len(res['memory_spikes'])}, unexpected {len(res['unexpected'])}")
    for m in res["memory_spikes"]:
        print(f"  MEMORY SPIKE {m['target']} at ~{m['at_inputs']} inputs: VmHWM {m['peak_kib'] >> 10} MiB "
              f"(limit {m['limit_kib'] >> 10} MiB)\n    inputs: {m['inputs_file']}")
    for c in res["crashes"]:
        print(f"  CRASH {c['target']} at ~{c['at_inputs']} inputs: {c['signature']}\n"
              f"    inputs: {c['inputs_file']}" + (f"\n    reproducer: {c['repro_file']} ({c.get('repro_tag')})"
                                                  if c.get("repro_file") else ""))
    for h in res["hangs"]:
        print(f"  HANG {h['target']} at ~{h['at_inputs']} inputs: {h['why']}\n    inputs: {h['inputs_file']}")
    for s in res["stuck_connections"][:10]:
        print(f"  STUCK {s['target']}: {s['why']} ({s.get('input')})")
    for leak in res["leaks"]:
        print(f"  LEAK {leak['target']} {leak['kind']}: {json.dumps({k: v for k, v in leak.items() if k not in ('fd_list', 'names')})}")
    for u in res["unexpected"][:20]:
        print(f"  UNEXPECTED {u['target']}: {u['what']} ({u.get('input')})")
    print("  verdict: " + ("OK" if res["ok"] else "FINDINGS (exit status 1)"), flush=True)
