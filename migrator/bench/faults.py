"""Fault-injection soak: real migrations, run with the CLI as users run them, each with one fault
injected at a random moment; checks that every failure is clean.

Per run: a fresh guest (`migrator guest`: memfd RAM + private RAM written at random, a vhost-like
and a pwrite side writer, the pager pushing pages out when swap is on), one long-running receiver
(`migrator receive`, not --once, kept across runs; restarted only after the fault killed it)
writing to a tmpfs of its own, and `migrator migrate --json` through a small TCP proxy of the
bench's own.  The first run has no fault (the reference: bytes each way, and the receiver's
descriptor and thread counts after its first session); each later run draws ONE fault:

  none           the migration must complete, the destination verified byte for byte
  receiver-kill  SIGKILL of the receiver (then it is restarted for the next run)
  rst            the proxy resets one channel (SO_LINGER 0 close: an RST to both ends)
  stall          the proxy stops forwarding (hold: stops reading; blackhole: reads and drops):
                 the migration must fail within its own timeouts (a run over --cap is a hang)
  guest-kill     SIGKILL of the source guest (alone, with its side writers, or only the vhost
                 writer, after which the guest exits by itself)
  corrupt        the proxy flips one byte of the stream (either way): every frame is authenticated
                 with the key, so the session must fail
  disk-full      the receiver's tmpfs shrunk below the guest's RAM before the run (small), or
                 filled by a ballast file at the fault's moment (fill)
  migrate-kill   SIGTERM, SIGHUP or SIGKILL of `migrate` itself (its guardian resumes the source
                 after a SIGKILL); the moment is often in or after the pause.  The destination's
                 manifest decides: complete (the commit had gone out) means the source must stay
                 paused; otherwise it must run

The moment: a byte offset of the stream (uniform over the reference run's bytes each way), or a
delay after the source was seen paused (the stop-and-copy).  Checked per run: migrate's exit
status and report, the receiver's manifest.json, that the receiver is alive unless killed by
the fault, that the source (guest and writers) is not left stopped after a failed migration,
the receiver's fd and thread counts after the session against those after its first session
(leaks), its VmRSS, and hangs (migrate over --cap, or a receiver session that never ends).
Exit status 0 only if there were no receiver crashes, no complete manifest for a failed
migration, every no-fault run completed and verified, no source left paused, no fd or thread
leak and no hang.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from ..errors import MigratorError
from ..guest.launcher import Guest, _read_line
from ..guest.workloads import WORKLOADS
from ..kernel.viewholder import HOLDER_TAG
from ..receiver_process import ReceiverProcess
from ..scenarios.destination import compare_with_source
from ..units import format_bytes, parse_size
from ._procs import state_letter, thread_counts

FAULTS = ("none", "receiver-kill", "rst", "stall", "guest-kill", "corrupt", "disk-full", "migrate-kill")
DEFAULT_WEIGHTS = {"none": 2, "receiver-kill": 2, "rst": 2, "stall": 1, "guest-kill": 2,
                   "corrupt": 3, "disk-full": 2, "migrate-kill": 3}
C2S, S2C = "c2s", "s2c"
GUEST_START_WAIT = 60.0
GUEST_TRIES, GUEST_RETRY_S = 6, 10.0
SESSION_END_WAIT = 30.0      # after migrate exited and the proxy closed: the receiver's session ends
PAUSE_POLL_S = 0.0005
KEY_BYTES = 32


# --- options ---------------------------------------------------------------------------------

def register(sub) -> None:
    p = sub.add_parser("faults", help="fault-injection soak: real migrations, one fault each",
                       description=(__doc__ or "").split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(handler=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=50, help="migrations (default 50; the first has no fault)")
    p.add_argument("--seed", type=int, help="random seed (default: drawn and printed)")
    p.add_argument("--faults", default=",".join(f"{k}={w}" for k, w in DEFAULT_WEIGHTS.items()),
                   help="the faults drawn, KIND or KIND=WEIGHT, comma-separated, of "
                        f"{', '.join(FAULTS)} (default: {','.join(f'{k}={w}' for k, w in DEFAULT_WEIGHTS.items())}); "
                        "drawn from a shuffled bag, so each appears in proportion")
    p.add_argument("--cap", type=float, default=90.0,
                   help="seconds a migration may take before it counts as a hang and is killed "
                        "(default 90: the transport gives up on a stalled link after 60 s)")
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds the receiver gets to come back to its fd and thread counts after a "
                        "session before a leak is counted (default 5; trio's idle cached worker "
                        "threads are not counted)")
    p.add_argument("--shared-ram", default="64M", help="the guest's memfd RAM (default 64M)")
    p.add_argument("--anon-ram", default="16M", help="the guest's private RAM (default 16M)")
    p.add_argument("--rate", default="5MB/s", help="the guest's writes (default 5MB/s)")
    p.add_argument("--workload", default="random", choices=sorted(WORKLOADS),
                   help="the guest's workload (default random; counter: rounds and the pause send "
                        "deltas, with --rate max)")
    p.add_argument("--side-rate", default="1MB/s",
                   help="the vhost-like and pwrite side writers' rate (default 1MB/s; 0: none)")
    p.add_argument("--pager", choices=("auto", "on", "off"), default="auto",
                   help="the pager pushing the guest's pages out every 0.5 s (auto: when swap is on)")
    p.add_argument("--downtime-limit", default="100", metavar="MS", help="migrate --downtime-limit (default 100)")
    p.add_argument("--channels", default="1,2", help="channel counts drawn from per run (default 1,2)")
    p.add_argument("--work-dir", default=tempfile.gettempdir(),
                   help="where the bench's folder goes (its tmpfs is mounted inside; default /tmp)")
    p.add_argument("--json", metavar="FILE", help="write every run and the summary as JSON")


def _parse_faults(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in (x.strip() for x in text.split(",")):
        if not part:
            continue
        name, _, w = part.partition("=")
        if name not in FAULTS:
            raise MigratorError(f"unknown fault {name!r}: choose from {', '.join(FAULTS)}")
        try:
            out[name] = int(w) if w else 1
        except ValueError:
            raise MigratorError(f"bad weight in {part!r}: an integer") from None
        if out[name] < 0:
            raise MigratorError(f"bad weight in {part!r}: at least 0")
    if not any(out.values()):
        raise MigratorError("no fault to draw (--faults)")
    return out


# --- /proc ------------------------------------------------------------------------------------

def task_states(pid: int) -> list[str] | None:
    """The state letter of every thread of pid (None if it is gone)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return None
    out = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                out.append(f.read().rsplit(")", 1)[1].split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out or None


def is_stopped(pid: int) -> bool:
    """pid exists and a thread of it is stopped (SIGSTOP 'T', or held by a tracer 't')."""
    states = task_states(pid)
    return bool(states) and any(s in ("T", "t") for s in states)


def guardians_of(pid: int, wait_s: float = 5.0) -> list[int]:
    """migrate's guardian processes watching pid still alive wait_s after migrate ended."""
    return _helpers(lambda cmd: "migrator/guardian.py" in cmd and f" --pid {pid} " in cmd, wait_s)


def view_holders_of(pid: int, wait_s: float = 5.0) -> list[int]:
    """The sweep gate's view holders (kernel/viewholder.py: HOLDER_TAG, then the parent's pid,
    end their command line) of migrate process pid still alive
    wait_s after it ended (one ends when its input does: with migrate, however it ended)."""
    return _helpers(lambda cmd: f" {HOLDER_TAG} {pid} " in cmd + " ", wait_s)


def _helpers(match, wait_s: float) -> list[int]:
    """The processes whose command line (spaces for NULs, a space before) matches, once none
    is left or wait_s passed."""
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    cmd = " " + f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if match(cmd):
                found.append(int(name))
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def left_stopped(pids: list[int], recheck_s: float = 0.3) -> list[int]:
    """The pids stopped now and still stopped recheck_s later (a SIGCONT on its way is not a
    source left paused)."""
    first = [p for p in pids if is_stopped(p)]
    if not first:
        return []
    time.sleep(recheck_s)
    return [p for p in first if is_stopped(p)]


@dataclass
class Counts:
    """A process's descriptors, threads and resident memory.  `threads` leaves out trio's idle
    cached worker threads (OS name "Trio thread N": a worker carries its job's name while it
    runs one), which exit after 10 s idle and are reused by the next session: bounded, not a
    leak; `idle_workers` counts them."""

    fds: int
    threads: int
    idle_workers: int
    rss_kib: int
    rss_anon_kib: int = 0
    rss_file_kib: int = 0
    rss_shmem_kib: int = 0

    def to_json(self) -> dict:
        return {"fds": self.fds, "threads": self.threads, "idle_workers": self.idle_workers,
                "rss_mib": round(self.rss_kib / 1024, 1), "rss_anon_mib": round(self.rss_anon_kib / 1024, 1),
                "rss_file_mib": round(self.rss_file_kib / 1024, 1),
                "rss_shmem_mib": round(self.rss_shmem_kib / 1024, 1)}


def process_counts(pid: int) -> Counts | None:
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        threads, idle = thread_counts(pid)
        mem = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    mem[k] = int(v.split()[0])
        return Counts(fds, threads - idle, idle, mem.get("VmRSS", 0), mem.get("RssAnon", 0),
                      mem.get("RssFile", 0), mem.get("RssShmem", 0))
    except (FileNotFoundError, ProcessLookupError):
        return None


def swap_on() -> bool:
    with open("/proc/swaps") as f:
        return len(f.read().strip().splitlines()) > 1


# --- the proxy --------------------------------------------------------------------------------

@dataclass
class Trigger:
    """When the fault fires: at byte `offset` of direction `where` (c2s/s2c), or `delay_s` after
    the source was seen paused (where == "pause")."""

    where: str
    offset: int = 0
    delay_s: float = 0.0

    def describe(self, ref: dict[str, int]) -> str:
        if self.where == "pause":
            return f"pause+{self.delay_s * 1000:.0f}ms"
        total = ref.get(self.where) or 0
        pct = f" ({100 * self.offset / total:.1f}%)" if total else ""
        return f"{self.where} byte {self.offset}{pct}"


class _Link:
    """One proxied connection: a thread moves bytes both ways (poll, non-blocking sockets) and
    applies the run's faults; every operation on its two sockets happens in that thread."""

    MAX_PENDING = 4 << 20

    def __init__(self, proxy: "FaultProxy", client: socket.socket, server: socket.socket, index: int):
        self.proxy, self.index = proxy, index
        client.setblocking(False)
        server.setblocking(False)
        self.socks = {C2S: (client, server), S2C: (server, client)}
        self.pending = {C2S: bytearray(), S2C: bytearray()}
        self.eof = {C2S: False, S2C: False}
        self.shut = {C2S: False, S2C: False}
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.stop = False
        self.reset_now = False
        self.closed = False
        self.thread = threading.Thread(target=self._run, name=f"faults-proxy-{index}", daemon=True)
        self.thread.start()

    def wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    def _reset(self) -> None:
        """Abort both connections: close with SO_LINGER 0 sends an RST to each end."""
        for s in (self.socks[C2S][0], self.socks[C2S][1]):
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            s.close()
        self.closed = True

    def _close(self) -> None:
        if not self.closed:
            for s in (self.socks[C2S][0], self.socks[C2S][1]):
                s.close()
            self.closed = True
        for fd in (self.wake_r, self.wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._close()

    def _loop(self) -> None:
        proxy = self.proxy
        while not self.stop:
            if self.reset_now:
                self._reset()
                return
            mode = proxy.mode
            poller = select.poll()
            poller.register(self.wake_r, select.POLLIN)
            want: dict[int, int] = {}
            fd_of = {}
            for d in (C2S, S2C):
                src, dst = self.socks[d]
                fd_of[src.fileno()] = src
                fd_of[dst.fileno()] = dst
                if mode == "hold":
                    continue                     # the link moves nothing, both ways
                if not self.eof[d] and len(self.pending[d]) < self.MAX_PENDING:
                    want[src.fileno()] = want.get(src.fileno(), 0) | select.POLLIN
                if mode == "pass" and self.pending[d]:
                    want[dst.fileno()] = want.get(dst.fileno(), 0) | select.POLLOUT
            for fd, ev in want.items():
                poller.register(fd, ev)
            if mode == "pass" and all(self.eof.values()) and not any(self.pending.values()):
                return                           # both ends finished
            events = poller.poll(500)
            ready = {fd: ev for fd, ev in events}
            if self.wake_r in ready:
                try:
                    os.read(self.wake_r, 4096)
                except OSError:
                    pass
                continue
            for d in (C2S, S2C):
                src, dst = self.socks[d]
                ev = ready.get(src.fileno(), 0)
                if ev & (select.POLLIN | select.POLLHUP | select.POLLERR) and not self.eof[d] \
                        and want.get(src.fileno(), 0) & select.POLLIN:
                    try:
                        data = src.recv(256 << 10)
                    except BlockingIOError:
                        data = None
                    except OSError:              # the end reset its connection: pass it on
                        self._reset()
                        return
                    if data is not None:
                        if not data:
                            self.eof[d] = True
                        elif proxy.mode == "blackhole":
                            pass                 # read and dropped
                        else:
                            out, action = proxy.on_data(self, d, data)
                            self.pending[d] += out
                            if action == "reset":
                                self._reset()
                                return
                if proxy.mode != "pass":
                    continue
                if self.pending[d] and ready.get(dst.fileno(), 0) & select.POLLOUT:
                    try:
                        n = dst.send(self.pending[d])
                        del self.pending[d][:n]
                    except BlockingIOError:
                        pass
                    except OSError:
                        self._reset()
                        return
                if self.eof[d] and not self.pending[d] and not self.shut[d]:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    self.shut[d] = True


class FaultProxy:
    """Listens on 127.0.0.1 (port picked by the kernel) and forwards each connection to the
    receiver (target_port, changed when it restarts).  Per run (begin/end): counts the bytes each
    way over all channels and applies the run's fault once its trigger is reached."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.target_port = 0
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self.mode = "pass"
        self.count = {C2S: 0, S2C: 0}
        self.connections = 0
        self._plan: dict | None = None
        self.fired_at: float | None = None
        self.fired_detail = ""
        self._corrupt_next = False
        self._closing = False
        threading.Thread(target=self._accept, name="faults-proxy-accept", daemon=True).start()

    def _accept(self) -> None:
        n = 0
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:                      # the receiver is gone: refuse as it would
                try:
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
                client.close()
                continue
            n += 1
            with self._lock:
                self.connections += 1
                self._links.append(_Link(self, client, server, n))

    def begin(self, plan: dict) -> None:
        """plan: {"fault": kind, "trigger": Trigger | None, "action": callable or None,
        "proxy": "rst" | "stall-hold" | "stall-blackhole" | "corrupt" | None, "xor": int}."""
        with self._lock:
            self.mode = "pass"
            self.count = {C2S: 0, S2C: 0}
            self.connections = 0
            self._plan = plan
            self.fired_at = None
            self.fired_detail = ""
            self._corrupt_next = False

    def end(self) -> None:
        """Close every connection of the run (the receiver sees them go) and forget the plan."""
        with self._lock:
            links, self._links = self._links, []
            self._plan = None
        for link in links:
            link.stop = True
            link.wake()
        for link in links:
            link.thread.join(10)
        self.mode = "pass"

    def close(self) -> None:
        self._closing = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self.end()

    @property
    def fired(self) -> bool:
        return self.fired_at is not None

    def _mark(self, detail: str) -> None:
        self.fired_at = time.time()
        self.fired_detail = detail

    def on_data(self, link: _Link, d: str, data: bytes) -> tuple[bytes, str | None]:
        """Called by a link for each chunk read: (what to forward, "reset" or None)."""
        with self._lock:
            start = self.count[d]
            self.count[d] += len(data)
            plan = self._plan
            if plan is None or self.fired:
                return data, None
            cut = None
            if self._corrupt_next and d == C2S:
                cut = plan["rng"].randrange(len(data))
            trig = plan["trigger"]
            if cut is None and trig is not None and trig.where == d and start <= trig.offset < start + len(data):
                cut = trig.offset - start
            if cut is None:
                return data, None
            self._mark(f"channel {link.index} {d} byte {start + cut}")
            kind = plan["proxy"]
            if kind == "corrupt":
                out = bytearray(data)
                out[cut] ^= plan["xor"]
                return bytes(out), None
            if kind == "rst":
                return data[:cut], "reset"
            if kind in ("stall-hold", "stall-blackhole"):
                self.mode = "hold" if kind == "stall-hold" else "blackhole"
                for other in self._links:
                    other.wake()
                return data[:cut], None
            action = plan["action"]
        if action is not None:                  # (outside the lock: a kill, a fill)
            action()
        return data, None

    def fire_now(self) -> None:
        """The pause trigger: apply the run's fault at once (a corruption goes into the next
        chunk sent to the receiver)."""
        with self._lock:
            plan = self._plan
            if plan is None or self.fired:
                return
            kind = plan["proxy"]
            if kind == "corrupt":
                self._corrupt_next = True
                return
            self._mark("at pause")
            if kind == "rst":
                if self._links:
                    link = self._links[0]
                    link.reset_now = True
                    link.wake()
                return
            if kind in ("stall-hold", "stall-blackhole"):
                self.mode = "hold" if kind == "stall-hold" else "blackhole"
                for link in self._links:
                    link.wake()
                return
            action = plan["action"]
        if action is not None:
            action()


# --- the receiver's tmpfs ---------------------------------------------------------------------

class Tmpfs:
    """A tmpfs of the bench's own (mode 0700: the receiver refuses a folder others can write),
    resized for disk-full runs; unmounted by close(), also after an error."""

    def __init__(self, path: str, size: int) -> None:
        self.path, self.size = path, size
        os.makedirs(path, exist_ok=True)
        _run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "migrator-bench-faults", path])
        self.mounted = True

    def resize(self, size: int) -> None:
        _run(["mount", "-o", f"remount,size={size}", self.path])

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, name: str = "ballast") -> int:
        """Take every free byte with a file (tmpfs allocates on fallocate). Returns bytes taken."""
        fd = os.open(os.path.join(self.path, name), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        taken = 0
        try:
            step = max(self.free(), 4096)
            while step >= 4096:
                try:
                    os.posix_fallocate(fd, taken, step)
                    taken += step
                except OSError:
                    step //= 2
        finally:
            os.close(fd)
        return taken

    def close(self) -> None:
        if not self.mounted:
            return
        for args in (["umount", self.path], ["umount", "-l", self.path]):
            if subprocess.run(args, capture_output=True).returncode == 0:
                self.mounted = False
                return
            time.sleep(0.5)


def _run(cmd: list[str]) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise MigratorError(f"{' '.join(cmd)}: {p.stderr.strip() or f'status {p.returncode}'}")


# --- the guest --------------------------------------------------------------------------------

_prctl = ctypes.CDLL(None, use_errno=True).prctl     # (loaded before any fork)


def _die_with_parent() -> None:
    """(preexec) SIGKILL when the bench dies, so a killed bench leaves no guest running."""
    _prctl(1, signal.SIGKILL, 0, 0, 0)      # PR_SET_PDEATHSIG


def start_cli_guest(args: argparse.Namespace, seed: int, pager: bool, log) -> tuple[Guest, subprocess.Popen]:
    """`migrator guest ...` as a user starts it; returns once its JSON line came."""
    cmd = [sys.executable, "-m", "migrator", "guest", "--shared-ram", args.shared_ram,
           "--anon-ram", args.anon_ram, "--workload", args.workload, "--rate", args.rate, "--seed", str(seed)]
    if args.side_rate not in ("0", "0/s"):
        cmd += ["--vhost-rate", args.side_rate, "--pwrite-rate", args.side_rate]
    if pager:
        cmd += ["--pager-interval", "0.5"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                            preexec_fn=_die_with_parent)
    line = _read_line(proc, GUEST_START_WAIT)
    if not line:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        raise MigratorError(f"the guest did not start (status {proc.returncode}; see {log.name})")
    return Guest(json.loads(line), proc), proc


def stop_guest(g: Guest, proc: subprocess.Popen) -> None:
    try:
        g.stop()
    except Exception:
        pass
    try:
        os.killpg(g.pgid, signal.SIGKILL)        # side writers left behind by a killed guest
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


# --- one run ----------------------------------------------------------------------------------

@dataclass
class Bench:
    args: argparse.Namespace
    base: str
    tmpfs: Tmpfs
    out_dir: str
    key_file: str
    proxy: FaultProxy
    pager: bool
    guest_bytes: int
    big: int
    receiver: ReceiverProcess | None = None
    receiver_no: int = 0
    baseline: Counts | None = None
    log_mark: int = 0
    ref: dict = field(default_factory=dict)

    def start_receiver(self) -> None:
        if self.receiver is not None:
            self.receiver.stop()                # (killed: its log closed)
        self.receiver_no += 1
        log = os.path.join(self.base, "logs", f"receiver-{self.receiver_no}.log")
        self.receiver = ReceiverProcess(self.out_dir, log, key_file=self.key_file)
        self.proxy.target_port = self.receiver.port
        self.baseline = None
        self.log_mark = 0

    def stop_receiver(self) -> None:
        if self.receiver is not None:
            self.receiver.stop()


SETUP_RE = re.compile(r"session (\w+) from \S+: \d+ region\(s\)")
END_RE = re.compile(r"session (\w+) from \S+: (complete|FAILED)")


def _sessions(text: str) -> tuple[list[str], dict[str, str]]:
    started = SETUP_RE.findall(text)
    ended = {m.group(1): m.group(2) for m in END_RE.finditer(text)}
    return started, ended


def wait_session_end(b: Bench, cap: float) -> tuple[str, list[str]]:
    """Wait until every session the receiver set up during this run has ended (log lines).
    Returns (state, the sessions' verdicts): state "ended", "none" (no session set up), "dead"
    (the receiver exited) or "stuck"."""
    r = b.receiver
    assert r is not None
    deadline = time.monotonic() + cap
    grace = time.monotonic() + 0.5           # a set-up under way when the proxy closed is logged late
    while True:
        text = r.text()[b.log_mark:]
        started, ended = _sessions(text)
        verdicts = [ended[s] for s in started if s in ended]
        if started and all(s in ended for s in started):
            return "ended", verdicts
        if r.proc.poll() is not None:
            return "dead", verdicts
        if not started and time.monotonic() > grace:
            return "none", verdicts
        if time.monotonic() > deadline:
            return "stuck", verdicts
        time.sleep(0.05)


def settle_counts(pid: int, base: Counts, settle_s: float) -> tuple[Counts | None, float]:
    """The receiver's counts once at or below the baseline, or after settle_s (then a leak).
    Returns (counts, seconds waited)."""
    t0 = time.monotonic()
    c = process_counts(pid)
    while c is not None and (c.fds > base.fds or c.threads > base.threads) \
            and time.monotonic() - t0 < settle_s:
        time.sleep(0.25)
        c = process_counts(pid)
    return c, time.monotonic() - t0


def _phase(timeline: dict, at: float | None) -> str:
    """The migration step the fault hit: the last timeline mark before it."""
    if at is None or not timeline:
        return ""
    marks = sorted(timeline.items(), key=lambda kv: kv[1])
    if at < marks[0][1]:
        return "before start"
    last = ""
    for name, t in marks:
        if t <= at:
            last = name
    return "after end" if last == "end" else f"after {last}"


def choose(fault: str, rng: random.Random, b: Bench) -> dict:
    """The run's fault: its variant and trigger."""
    ref_c2s = b.ref.get(C2S) or b.guest_bytes
    ref_s2c = b.ref.get(S2C) or 256

    def trigger(s2c_share: float = 0.0, pause_share: float = 0.25, pause_s: float = 0.02) -> Trigger:
        x = rng.random()
        if x < pause_share:
            return Trigger("pause", delay_s=rng.uniform(0, pause_s))
        if x < 0.25 + s2c_share:
            return Trigger(S2C, offset=rng.randrange(max(ref_s2c, 1)))
        return Trigger(C2S, offset=rng.randrange(max(int(ref_c2s * 0.97), 1)))

    plan: dict = {"fault": fault, "variant": "", "trigger": None, "proxy": None, "action": None,
                  "xor": rng.randrange(1, 256), "rng": random.Random(rng.random())}
    if fault == "none":
        return plan
    if fault == "disk-full":
        plan["variant"] = rng.choice(["small", "fill"])
        if plan["variant"] == "small":
            lo, hi = 4 << 20, max(b.guest_bytes - (8 << 20), 8 << 20)
            plan["tmpfs_size"] = rng.randrange(lo, hi) & ~0xFFFFF
        else:
            plan["trigger"] = trigger()
        return plan
    if fault == "migrate-kill":
        # (half of them from the pause on, up to 0.4 s after it: the verdict, the commit)
        plan["variant"] = rng.choices(["term", "hup", "kill"], [3, 1, 4])[0]
        plan["trigger"] = trigger(pause_share=0.5, pause_s=0.4)
        return plan
    plan["trigger"] = trigger(0.2 if fault == "corrupt" else 0.0)
    if fault == "stall":
        plan["variant"] = rng.choice(["hold", "blackhole"])
        plan["proxy"] = f"stall-{plan['variant']}"
    elif fault in ("rst", "corrupt"):
        plan["proxy"] = fault
    elif fault == "guest-kill":
        plan["variant"] = rng.choices(["guest", "group", "writer"], [4, 3, 3])[0]
    return plan


class _Run:
    """One run of the soak, each step a method: its guest started, its fault armed (the fault
    actions below), migrate run through the proxy, then what the run left behind checked (the
    receiver, the source and the destination, leaks).  The record `rec` is filled in that order."""

    def __init__(self, b: Bench, no: int, fault: str, rng: random.Random) -> None:
        self.b, self.no, self.fault = b, no, fault
        self.t_run = time.monotonic()
        self.plan = choose(fault, rng, b)
        self.channels = rng.choice(b.args.channel_choices)
        self.rec: dict = {"run": no, "fault": fault, "variant": self.plan["variant"], "channels": self.channels,
                          "when": "", "fired": False, "phase": "",
                          "tree": _tree_state()["diff_sha1"]}     # (others may edit the tree meanwhile)
        self.logs = os.path.join(b.base, "logs")
        self.killed_receiver = threading.Event()
        self.stop_watch = threading.Event()
        self.mproc: subprocess.Popen | None = None

    def _path(self, suffix: str) -> str:
        return os.path.join(self.logs, f"run-{self.no:03d}-{suffix}")

    # --- set-up

    def start(self, rng: random.Random) -> None:
        """The receiver idle and alive, the tmpfs shrunk for a disk-full 'small', a fresh guest."""
        b, plan = self.b, self.plan
        # the receiver is idle: its folder emptied (no manifest of an earlier run can be mistaken
        # for this one's; the space is free again)
        for name in os.listdir(b.out_dir):
            os.unlink(os.path.join(b.out_dir, name))
        if b.receiver is None or b.receiver.proc.poll() is not None:
            b.start_receiver()
        assert b.receiver is not None
        self.r = b.receiver
        b.log_mark = len(self.r.text())
        if plan.get("tmpfs_size"):
            b.tmpfs.resize(plan["tmpfs_size"])
            self.rec["when"] = f"tmpfs {format_bytes(plan['tmpfs_size'])} < guest {format_bytes(b.guest_bytes)}"
        self.guest_log = open(self._path("guest.log"), "wb")
        guest_seed = rng.randrange(1 << 30)
        for attempt in range(GUEST_TRIES):
            try:
                self.g, self.gproc = start_cli_guest(b.args, seed=guest_seed, pager=b.pager, log=self.guest_log)
                break
            except MigratorError:
                # (not a migration fault: e.g. the tree being rebuilt under the soak) tried again
                if attempt == GUEST_TRIES - 1:
                    raise
                print(f"  run {self.no}: the guest did not start, trying again in {GUEST_RETRY_S:.0f} s",
                      flush=True)
                time.sleep(GUEST_RETRY_S)
        self.writers = list(self.g.writer_pids.values())
        self.source_pids = [self.g.pid, *self.writers]

    # --- the fault actions (called by the proxy at the fault's moment)

    def kill_receiver(self) -> None:
        try:
            os.kill(self.r.proc.pid, signal.SIGKILL)
            self.killed_receiver.set()
        except ProcessLookupError:
            pass

    def kill_guest(self) -> None:
        g = self.g
        try:
            if self.plan["variant"] == "group":
                os.killpg(g.pgid, signal.SIGKILL)
            elif self.plan["variant"] == "writer":
                os.kill(g.writer_pids.get("vhost", g.pid), signal.SIGKILL)
            else:
                os.kill(g.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.plan["variant"] != "writer":
            self.gproc.wait()                    # reaped at once, as a supervisor would

    def fill_disk(self) -> None:
        self.rec["ballast"] = self.b.tmpfs.fill()

    def kill_migrate(self) -> None:
        sig = {"term": signal.SIGTERM, "hup": signal.SIGHUP, "kill": signal.SIGKILL}[self.plan["variant"]]
        mproc = self.mproc
        if mproc is not None and mproc.poll() is None:
            os.kill(mproc.pid, sig)              # (our child, not reaped yet: its own pid)

    def arm(self) -> None:
        """The fault's action and trigger handed to the proxy."""
        plan = self.plan
        plan["action"] = {"receiver-kill": self.kill_receiver, "guest-kill": self.kill_guest,
                          "disk-full": self.fill_disk, "migrate-kill": self.kill_migrate}.get(self.fault)
        if plan["trigger"] is not None:
            self.rec["when"] = plan["trigger"].describe(self.b.ref)
        self.b.proxy.begin(plan)

    def watch_pause(self) -> None:
        """Fires the fault once the source is seen paused (a 'pause' trigger), after its delay."""
        trig = self.plan["trigger"]
        while not self.stop_watch.is_set():
            if state_letter(self.g.pid) == "T":   # (not 't': the userfaultfd injection by ptrace)
                if trig.delay_s:
                    time.sleep(trig.delay_s)
                self.b.proxy.fire_now()
                return
            time.sleep(PAUSE_POLL_S)

    # --- the measured step: migrate, through the proxy

    def _command(self) -> list[str]:
        b, a = self.b, self.g.regions["anon"]
        cmd = [sys.executable, "-m", "migrator", "migrate", "--pid", str(self.g.pid),
               "--region", "guest-ram", "--region", f"{a.start:x}-{a.end:x}",
               "--to", f"127.0.0.1:{b.proxy.port}", "--key-file", b.key_file,
               "--downtime-limit", str(b.args.downtime_limit), "--channels", str(self.channels),
               "--json", self._path("report.json")]
        if self.writers:
            cmd += ["--writers", ",".join(map(str, self.writers))]
        return cmd

    def migrate(self) -> None:
        """migrate run to its end (or killed at --cap: a hang), the proxy's counts taken."""
        b, rec, plan = self.b, self.rec, self.plan
        cmd = self._command()
        with open(self._path("migrate.log"), "wb") as mlog:
            t0 = time.time()
            self.mproc = mproc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=mlog,
                                                  stderr=subprocess.STDOUT)
            watcher = None
            if plan["trigger"] is not None and plan["trigger"].where == "pause":
                watcher = threading.Thread(target=self.watch_pause, name="faults-pause-watch", daemon=True)
                watcher.start()
            hang = False
            try:
                rc = mproc.wait(b.args.cap)
            except subprocess.TimeoutExpired:
                hang = True
                rec["hang_source_stopped"] = [p for p in self.source_pids if is_stopped(p)]
                mproc.kill()                     # (our child, by its pid)
                rc = mproc.wait()
            t_end = time.time()
            self.stop_watch.set()
            if watcher is not None:
                watcher.join(5)
        self.fired_at = fired_at = b.proxy.fired_at
        rec["fired"] = b.proxy.fired or bool(plan.get("tmpfs_size"))
        if b.proxy.fired_detail and b.proxy.fired_detail != "at pause":
            rec["fired_detail"] = b.proxy.fired_detail
        rec["fired_ms"] = round((fired_at - t0) * 1000) if fired_at else None
        self.bytes_moved = dict(b.proxy.count)
        b.proxy.end()
        rec.update({"migrate_rc": rc, "migrate_s": round(t_end - t0, 2), "hang": hang,
                    "bytes": self.bytes_moved})
        self.rc, self.hang = rc, hang

    # --- the checks

    def read_outcome(self) -> None:
        """migrate's report and log: its status, reason and the phase the fault hit."""
        rec = self.rec
        report = None
        try:
            with open(self._path("report.json")) as f:
                report = json.load(f)
        except (OSError, ValueError):
            pass
        with open(self._path("migrate.log"), errors="replace") as f:
            mtext = f.read()
        rec["migrate_traceback"] = "Traceback (most recent call last)" in mtext
        rec["status"] = report["status"] if report else "no report"
        rec["reason"] = (report or {}).get("reason") or (mtext.strip().splitlines()[-1][:300] if mtext.strip() else "")
        rec["source_state"] = (report or {}).get("source_state", "")
        rec["phase"] = _phase((report or {}).get("timeline", {}), self.fired_at)
        if report and report.get("status") == "completed" and self.no == 1:
            self.b.ref = self.bytes_moved

    def check_receiver(self) -> tuple[str, bool, dict | None]:
        """The receiver: its session over, alive, its manifest.  Returns (session state, alive, manifest)."""
        b, r, rec = self.b, self.r, self.rec
        state, verdicts = wait_session_end(b, SESSION_END_WAIT)
        rec["receiver_session"] = state
        rec["receiver_verdicts"] = verdicts
        alive = r.proc.poll() is None
        rec["receiver_alive"] = alive
        rec["receiver_killed"] = self.killed_receiver.is_set()
        rec["receiver_crash"] = not alive and not self.killed_receiver.is_set()
        if rec["receiver_crash"]:
            rec["receiver_exit"] = r.proc.returncode
            rec["receiver_log_tail"] = r.text()[b.log_mark:][-3000:]
        rec["receiver_hang"] = state == "stuck"
        manifest = None
        try:
            with open(os.path.join(b.out_dir, "manifest.json")) as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            pass
        rec["manifest"] = None if manifest is None else {
            "complete": manifest.get("complete"), "error": manifest.get("error"),
            "status": [x.get("status") for x in manifest.get("regions", [])]}
        return state, alive, manifest

    def check_source(self, manifest: dict | None) -> None:
        """Completed or not against the manifest; the source resumed or left paused as it must be;
        the destination byte for byte; guardians left; then the guest stopped."""
        rec, g, hang = self.rec, self.g, self.hang
        completed = self.rc == 0 and rec["status"] == "completed"
        rec["completed"] = completed
        dest_complete = bool(manifest and manifest.get("complete"))
        # migrate killed: the destination says whether the migration took place (the commit went
        # out); a migrate stopped after its commit fails, keeping its source paused, rightly
        migrate_killed = self.fault == "migrate-kill" and rec["fired"]
        rec["manifest_complete_on_failure"] = (not completed) and dest_complete and not migrate_killed
        rec["completed_manifest_incomplete"] = completed and not dest_complete
        # the source: a failed migration must resume it (a hang's kill of migrate is not counted here)
        rec["source_left_paused"] = []
        rec["source_resumed_after_completion"] = []
        if (completed or (migrate_killed and dest_complete)) and not hang:
            rec["source_resumed_after_completion"] = [p for p in self.source_pids
                                                      if state_letter(p) not in ("", "T", "t", "Z", "X")]
        elif not completed and not hang:
            rec["source_left_paused"] = left_stopped(self.source_pids)
        # the destination of a completed migration, byte for byte against the paused source
        rec["destination"] = "not checked"
        if completed and not (manifest and manifest.get("complete")):
            rec["destination"] = "not checked: the manifest is not complete"
        elif completed and self.gproc.poll() is None and is_stopped(g.pid):
            try:
                chk = compare_with_source(g.pid, self.b.out_dir)
                rec["destination"] = "identical" if chk.identical else chk.detail
            except (MigratorError, OSError) as e:
                rec["destination"] = f"not checked: {e}"
        rec["verified"] = completed and bool(manifest and manifest.get("complete")) and \
            all(s == "verified" for s in rec["manifest"]["status"]) and rec["destination"] in ("identical", "not checked")
        # the guardian (python .../guardian.py --pid GUEST ...) ends with migrate, or once it has
        # resumed the source: none may be left
        rec["guardians_left"] = guardians_of(g.pid)
        rec["view_holders_left"] = view_holders_of(self.mproc.pid) if self.mproc is not None else []
        stop_guest(g, self.gproc)
        self.guest_log.close()

    def check_leaks(self, state: str, alive: bool) -> None:
        """Leaks in the long-running receiver, against its counts after its first session; a
        receiver stuck in a session killed (it would refuse the next one)."""
        b, r, rec = self.b, self.r, self.rec
        rec["receiver_counts"] = None
        rec["fd_leak"] = rec["thread_leak"] = False
        if alive and state in ("ended", "none"):
            if b.baseline is None:
                if state == "ended":
                    b.baseline = process_counts(r.proc.pid)
                    rec["baseline"] = b.baseline.to_json() if b.baseline else None
            else:
                c, waited = settle_counts(r.proc.pid, b.baseline, b.args.settle)
                if c is not None:
                    rec["receiver_counts"] = c.to_json()
                    rec["settle_s"] = round(waited, 2)
                    rec["fd_leak"] = c.fds > b.baseline.fds
                    rec["thread_leak"] = c.threads > b.baseline.threads
            if rec["receiver_counts"] is None:
                c = process_counts(r.proc.pid)
                rec["receiver_counts"] = c.to_json() if c else None
        elif state == "stuck" and alive:
            c = process_counts(r.proc.pid)
            rec["receiver_counts"] = c.to_json() if c else None
            # a receiver stuck in a session would refuse the next one ("busy"): replaced
            rec["receiver_log_tail"] = r.text()[b.log_mark:][-3000:]
            os.kill(r.proc.pid, signal.SIGKILL)
            r.proc.wait()
        if alive and (rec["receiver_counts"] or rec.get("baseline")):
            rec["receiver_pid"] = r.proc.pid

    def finish(self) -> dict:
        """The tmpfs back to its size, the run's problems and duration; its logs kept only if it
        went wrong.  Returns the record."""
        rec = self.rec
        # disk-full: the tmpfs back to its size, the ballast gone
        try:
            os.unlink(os.path.join(self.b.tmpfs.path, "ballast"))
        except FileNotFoundError:
            pass
        if self.plan.get("tmpfs_size"):
            self.b.tmpfs.resize(self.b.big)
        rec["problems"] = problems(rec)
        rec["run_s"] = round(time.monotonic() - self.t_run, 2)
        if not rec["problems"]:                  # only the logs of runs that went wrong are kept
            for suffix in ("guest.log", "report.json", "migrate.log"):
                try:
                    os.unlink(self._path(suffix))
                except FileNotFoundError:
                    pass
        return rec


def one_run(b: Bench, no: int, fault: str, rng: random.Random) -> dict:
    """One run with one fault (see _Run); returns its record."""
    run = _Run(b, no, fault, rng)
    run.start(rng)
    run.arm()
    run.migrate()
    run.read_outcome()
    state, alive, manifest = run.check_receiver()
    run.check_source(manifest)
    run.check_leaks(state, alive)
    return run.finish()


def problems(rec: dict) -> list[str]:
    """What this run got wrong (the checks that gate the exit status)."""
    out = []
    if rec["receiver_crash"]:
        out.append(f"receiver crashed (exit {rec.get('receiver_exit')})")
    if rec["manifest_complete_on_failure"]:
        out.append("manifest complete:true for a failed migration")
    if (rec["fault"] == "none" or not rec["fired"]) and not rec["verified"]:
        what = "no-fault run" if rec["fault"] == "none" else "fault not reached, yet run"
        out.append(f"{what} not completed and verified ({rec['status']}: {rec['reason'][:120]}; "
                   f"destination {rec['destination']})")
    if rec["source_left_paused"]:
        out.append(f"source left paused: pids {rec['source_left_paused']}")
    if rec.get("guardians_left"):
        out.append(f"guardian process(es) left behind: {rec['guardians_left']}")
    if rec.get("view_holders_left"):
        out.append(f"view holder process(es) left behind: {rec['view_holders_left']}")
    if rec.get("source_resumed_after_completion"):
        out.append(f"source resumed after the destination took over: pids {rec['source_resumed_after_completion']}")
    if rec["fd_leak"]:
        out.append("receiver fd leak")
    if rec["thread_leak"]:
        out.append("receiver thread leak")
    if rec["hang"]:
        out.append(f"migrate hung (killed after {rec['migrate_s']:.0f} s)")
    if rec["receiver_hang"]:
        out.append("receiver session never ended")
    return out


def _line(rec: dict, total: int) -> str:
    fault = rec["fault"] + (f":{rec['variant']}" if rec["variant"] else "")
    when = rec["when"] + (f" @{rec['fired_ms']}ms" if rec.get("fired_ms") is not None else "")
    if rec["fault"] != "none" and not rec["fired"]:
        when += " (not reached)"
    if rec["phase"]:
        when += f" [{rec['phase']}]"
    m = rec["manifest"]
    man = "none" if m is None else ("complete" if m["complete"] else "incomplete")
    c = rec.get("receiver_counts") or rec.get("baseline")
    rcv = ("killed" if rec["receiver_killed"] else "CRASHED" if rec["receiver_crash"] else "alive")
    if c:
        rcv += f" fd {c['fds']} thr {c['threads']}+{c['idle_workers']} rss {c['rss_mib']:.0f}M"
    verdict = "ok" if not rec["problems"] else "PROBLEM: " + "; ".join(rec["problems"])
    return (f"[{rec['run']:>3}/{total}] {fault:<22} ch{rec['channels']} {when:<52} -> migrate "
            f"{rec['migrate_rc']} {rec['status']:<13} {rec['migrate_s']:5.1f}s manifest {man:<10} "
            f"receiver {rcv:<34} {verdict} ({rec['run_s']:.1f}s)")


# --- summary ----------------------------------------------------------------------------------

COLUMNS = ("runs", "fired", "completed", "failed", "crashes", "complete_on_failure", "paused_sources",
           "resumed_after_completion", "fd_leaks", "thread_leaks", "hangs", "migrate_tracebacks")


def summarize(runs: list[dict]) -> dict:
    by: dict[str, dict] = {}
    for rec in runs:
        for key in (rec["fault"], "all"):
            s = by.setdefault(key, {c: 0 for c in COLUMNS} | {"run_s": []})
            s["runs"] += 1
            s["fired"] += bool(rec["fired"]) if rec["fault"] != "none" else 0
            s["completed"] += bool(rec["completed"])
            s["failed"] += not rec["completed"]
            s["crashes"] += bool(rec["receiver_crash"])
            s["complete_on_failure"] += bool(rec["manifest_complete_on_failure"])
            s["paused_sources"] += bool(rec["source_left_paused"])
            s["resumed_after_completion"] += bool(rec.get("source_resumed_after_completion"))
            s["fd_leaks"] += bool(rec["fd_leak"])
            s["thread_leaks"] += bool(rec["thread_leak"])
            s["hangs"] += bool(rec["hang"]) + bool(rec["receiver_hang"])
            s["migrate_tracebacks"] += bool(rec["migrate_traceback"])
            s["run_s"].append(rec["run_s"])
    for s in by.values():
        s["median_run_s"] = round(statistics.median(s.pop("run_s")), 1)
    return by


def checks(runs: list[dict]) -> dict:
    none = [r for r in runs if r["fault"] == "none"]
    return {
        "receiver_crashes": sum(r["receiver_crash"] for r in runs),
        "complete_manifests_for_failed_sessions": sum(r["manifest_complete_on_failure"] for r in runs),
        "no_fault_runs_not_verified": sum(not r["verified"] for r in none),
        "unfired_fault_runs_not_verified": sum(not r["verified"] for r in runs
                                               if r["fault"] != "none" and not r["fired"]),
        "sources_left_paused": sum(bool(r["source_left_paused"]) for r in runs),
        "sources_resumed_after_completion": sum(bool(r.get("source_resumed_after_completion")) for r in runs),
        "guardians_left": sum(bool(r.get("guardians_left")) for r in runs),
        "view_holders_left": sum(bool(r.get("view_holders_left")) for r in runs),
        "fd_leaks": sum(r["fd_leak"] for r in runs),
        "thread_leaks": sum(r["thread_leak"] for r in runs),
        "hangs": sum(r["hang"] + r["receiver_hang"] for r in runs),
    }


def receiver_memory(runs: list[dict]) -> dict:
    """Per receiver process (a new one after each kill): its VmRSS after each session, first,
    max and last (informational: growth over many sessions is worth a look)."""
    out: dict = {}
    for r in runs:
        c = r.get("receiver_counts") or r.get("baseline")
        if not c or not r.get("receiver_pid"):
            continue
        g = out.setdefault(r["receiver_pid"], {"sessions": 0, "first": c["rss_mib"], "max": 0.0,
                                               "series": []})
        g["sessions"] += 1
        g["max"] = max(g["max"], c["rss_mib"])
        g["last"], g["last_anon"] = c["rss_mib"], c.get("rss_anon_mib", 0.0)
        g["series"].append(c["rss_mib"])
    return out


def _table(summary: dict) -> str:
    order = [k for k in FAULTS if k in summary] + ["all"]
    head = f"{'fault':<14}" + "".join(f"{c.replace('_', ' '):>{max(len(c), 6) + 2}}" for c in COLUMNS) \
        + f"{'median s':>10}"
    lines = [head]
    for k in order:
        s = summary[k]
        lines.append(f"{k:<14}" + "".join(f"{s[c]:>{max(len(c), 6) + 2}}" for c in COLUMNS)
                     + f"{s['median_run_s']:>10}")
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------

def _tree_state() -> dict:
    """The source tree the soak ran (others may edit it meanwhile): HEAD and a hash of the diff."""
    import hashlib
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def git(*a: str) -> str:
        p = subprocess.run(["git", "-C", root, *a], capture_output=True)
        return p.stdout.decode(errors="replace") if p.returncode == 0 else ""
    return {"head": git("rev-parse", "HEAD").strip(),
            "diff_sha1": hashlib.sha1(git("diff", "HEAD").encode()).hexdigest()[:12],
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


class _Interrupted(Exception):
    pass


@dataclass
class _Setup:
    """The soak's settings, checked: fault weights, sizes, seed, pager, and its work dir with the key."""
    weights: dict[str, int]
    seed: int
    guest_bytes: int
    big: int
    pager: bool
    base: str
    key_file: str


def _setup(args: argparse.Namespace) -> _Setup | int:
    """The options checked (an exit status 2, printed, if not), the work dir and key made."""
    try:
        weights = _parse_faults(args.faults)
        args.channel_choices = [int(x) for x in args.channels.split(",") if x.strip()]
        shared, anon = parse_size(args.shared_ram), parse_size(args.anon_ram)
    except (MigratorError, ValueError) as e:
        print(f"migrator bench faults: {e}")
        return 2
    if args.runs < 1 or not args.channel_choices:
        print("migrator bench faults: --runs and --channels need at least one")
        return 2
    if os.geteuid() != 0:
        print("migrator bench faults: needs root (a tmpfs is mounted for the receiver; migrate "
              "injects a userfaultfd by ptrace)")
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    guest_bytes = shared + anon
    big = 2 * guest_bytes + (32 << 20)
    pager = args.pager == "on" or (args.pager == "auto" and swap_on())
    base = tempfile.mkdtemp(prefix="migrator-bench-faults-", dir=args.work_dir)
    os.makedirs(os.path.join(base, "logs"))
    key_file = os.path.join(base, "key")
    with open(key_file, "wb") as f:
        f.write(os.urandom(KEY_BYTES))
    os.chmod(key_file, 0o600)
    return _Setup(weights, seed, guest_bytes, big, pager, base, key_file)


def _fault_bag(weights: dict[str, int], rng: random.Random):
    """draw(): the next fault from a shuffled bag, each in proportion to its weight."""
    bag: list[str] = []

    def draw() -> str:
        if not bag:
            bag.extend(k for k, w in weights.items() for _ in range(w))
            rng.shuffle(bag)
        return bag.pop()
    return draw


def _print_start(args: argparse.Namespace, s: _Setup) -> None:
    print(f"migrator bench faults: {args.runs} runs, seed {s.seed}; guest {args.shared_ram} shared + "
          f"{args.anon_ram} anon, random writes at {args.rate}"
          + (f", vhost and pwrite writers at {args.side_rate}" if args.side_rate not in ("0", "0/s") else "")
          + (", pager (swap on)" if s.pager else ", no pager") +
          f"; downtime limit {args.downtime_limit} ms; channels {args.channels}; cap {args.cap:.0f} s; "
          f"faults {','.join(f'{k}={w}' for k, w in s.weights.items())}; work dir {s.base}", flush=True)


def _soak(args: argparse.Namespace, s: _Setup, rng: random.Random, runs: list[dict]) -> tuple[str, Tmpfs | None]:
    """The runs, appended to `runs` as they end (SIGTERM/SIGHUP stop them); the receiver, proxy
    and tmpfs closed.  Returns (why it was interrupted or "", the tmpfs)."""
    draw = _fault_bag(s.weights, rng)

    def on_signal(signum, frame):
        raise _Interrupted(f"signal {signum}")

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    tmpfs = proxy = None
    bench = None
    interrupted = ""
    try:
        tmpfs = Tmpfs(os.path.join(s.base, "mnt"), s.big)
        out_dir = os.path.join(tmpfs.path, "out")
        os.mkdir(out_dir, 0o700)
        proxy = FaultProxy()
        bench = Bench(args, s.base, tmpfs, out_dir, s.key_file, proxy, s.pager, s.guest_bytes, s.big)
        bench.start_receiver()
        for no in range(1, args.runs + 1):
            fault = "none" if no == 1 else draw()
            rec = one_run(bench, no, fault, rng)
            runs.append(rec)
            print(_line(rec, args.runs), flush=True)
    except (_Interrupted, KeyboardInterrupt) as e:
        interrupted = str(e) or "interrupted"
        print(f"migrator bench faults: {interrupted}: stopping", flush=True)
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        if bench is not None:
            bench.stop_receiver()
        if proxy is not None:
            proxy.close()
        if tmpfs is not None:
            tmpfs.close()
    return interrupted, tmpfs


def _print_report(runs: list[dict], summary: dict, verdict: dict, memory: dict) -> None:
    """The table, the checks, the notes, the receivers' memory and the runs that went wrong."""
    if runs:
        print()
        print(_table(summary))
    print("\nchecks (all must be 0): " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in verdict.items()))
    split = [r["run"] for r in runs if r["completed_manifest_incomplete"]]
    if split:
        print(f"note: migrate completed (the source stays paused) but the manifest is not complete in "
              f"run(s) {split}")
    tb = sum(r["migrate_traceback"] for r in runs)
    if tb:
        print(f"note: migrate printed a traceback in {tb} run(s) (logs kept)")
    for no, g in memory.items():
        print(f"receiver pid {no}: VmRSS after {g['sessions']} session(s): first {g['first']:.0f} MiB, "
              f"max {g['max']:.0f} MiB, last {g['last']:.0f} MiB (anon {g['last_anon']:.0f} MiB)")
    bad = [r for r in runs if r["problems"]]
    for r in bad:
        print(f"  run {r['run']} ({r['fault']}{':' + r['variant'] if r['variant'] else ''}, {r['when']}): "
              f"{'; '.join(r['problems'])}")


def run(args: argparse.Namespace) -> int:
    s = _setup(args)
    if isinstance(s, int):
        return s
    rng = random.Random(s.seed)
    tree = _tree_state()
    _print_start(args, s)
    runs: list[dict] = []
    t_start = time.monotonic()
    interrupted, tmpfs = _soak(args, s, rng, runs)
    duration = time.monotonic() - t_start
    summary = summarize(runs) if runs else {}
    verdict = checks(runs)
    memory = receiver_memory(runs)
    ok = bool(runs) and not interrupted and not any(verdict.values())
    _print_report(runs, summary, verdict, memory)
    print(f"{len(runs)} runs in {duration / 60:.1f} min, seed {s.seed}: {'OK' if ok else 'FAILED'}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seed": s.seed, "duration_s": round(duration, 1), "ok": ok, "interrupted": interrupted,
                       "config": {k: v for k, v in vars(args).items() if k != "handler"},
                       "tree": {"start": tree, "end": _tree_state()},
                       "checks": verdict, "summary": summary, "receiver_memory": memory, "runs": runs},
                      f, indent=2, default=str)
    logs = os.path.join(s.base, "logs")
    if ok:
        shutil.rmtree(s.base, ignore_errors=True)
    else:
        mnt = os.path.join(s.base, "mnt")
        if tmpfs is None or not tmpfs.mounted:
            shutil.rmtree(mnt, ignore_errors=True)
        print(f"logs of the runs that went wrong (and the receivers' logs): {logs}")
    return 0 if ok else 1
