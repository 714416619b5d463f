"""The guardian: a small process that resumes the source if `migrate` dies while it may be stopped.

`migrate` stops the source for the switch-over (SIGSTOP, a freezer cgroup, QMP `stop`) and in
duty cycles for auto-converge.  Its own clean-up resumes it on any failure, SIGINT, SIGTERM and
SIGHUP included; but a SIGKILL, an OOM kill or a crash of Python runs no clean-up, and the guest
would stay stopped until someone noticed.  So before anything is stopped, `migrate` starts this
process, in a session of its own (signals sent to migrate's terminal or process group do not reach
it), with the read end of a pipe as its standard input; only `migrate` holds the write end.
Commands on that pipe, one byte each:

    A   armed: the source may be stopped from now on; if the pipe ends, resume it
    D   disarmed: the destination has (or may have) taken over: never resume the source
    X   `migrate` settled the source itself: exit without acting

End of file (`migrate` died: the kernel closed its end) while armed: resume the source, say so on
standard error, exit.  The guardian never resumes a disarmed source, whatever follows.

Resuming: SIGCONT to each process through a pidfd opened at start (a recycled pid is never
signalled), the freezer cgroup thawed, and for a QEMU source `migrate_cancel` (QEMU refuses
`cont` while its own migration has not ended) then `cont` over QMP (migrate's connection is gone
with it, so the socket is free).

The process is started as a script (python FILE), standard library only, so that it starts in
tens of ms and needs nothing of migrator's installation:

    python .../migrator/guardian.py [--pid PID ...] [--freezer DIR] [--qmp SOCKET]

Guardian (below) is migrate's end of it.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

READY = b"ready\n"
ARM, DISARM, EXIT = b"A", b"D", b"X"


def _say(text: str) -> None:
    try:
        print(f"migrator guardian: {text}", file=sys.stderr, flush=True)
    except (OSError, ValueError):   # (migrate's terminal or pipe may be gone with it)
        pass


def _qmp_cont(path: str, wait_s: float = 5.0) -> str:
    """`migrate_cancel` then `cont` on a QMP socket; returns what happened, in words."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            sock.connect(path)
            break
        except OSError as e:
            sock.close()
            if time.monotonic() >= deadline:
                return f"QMP {path}: cannot connect ({e.strerror or e})"
            time.sleep(0.01)
    buf = b""

    def reply() -> dict:
        nonlocal buf
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if "return" in msg or "error" in msg or "QMP" in msg:
                    return msg
            chunk = sock.recv(65536)
            if not chunk:
                raise OSError("QMP connection closed")
            buf += chunk

    def execute(cmd: str) -> dict:
        sock.sendall(json.dumps({"execute": cmd}).encode() + b"\n")
        return reply()

    try:
        with sock:
            reply()                                     # the greeting
            execute("qmp_capabilities")
            execute("migrate_cancel")
            while True:
                r = execute("cont")
                if "error" not in r:
                    return "QEMU resumed (cont)"
                desc = r["error"].get("desc", "")
                # the cancel takes effect asynchronously: QEMU refuses cont until it has
                # ("Migration is not finalized yet", or "... not finished" on older versions)
                busy = "not finished" in desc or "not finalized" in desc
                if not busy or time.monotonic() >= deadline:
                    return f"QEMU refused cont: {desc}"
                time.sleep(0.005)
    except (OSError, ValueError) as e:
        return f"QMP {path}: {e}"


def resume(pidfds: dict[int, int], freezer: str | None, qmp: str | None) -> list[str]:
    """Let the source run again, every way it may have been stopped; what was done, in words."""
    done = []
    if freezer is not None:
        try:
            with open(os.path.join(freezer, "freezer.state"), "w") as f:
                f.write("THAWED")
            done.append(f"cgroup {freezer} thawed")
        except OSError as e:
            done.append(f"cgroup {freezer}: {e.strerror}")
    for pid, fd in pidfds.items():
        try:
            signal.pidfd_send_signal(fd, signal.SIGCONT)
            done.append(f"process {pid} continued")
        except ProcessLookupError:
            done.append(f"process {pid} gone")
        except OSError as e:
            done.append(f"process {pid}: {e.strerror}")
    if qmp is not None:
        done.append(_qmp_cont(qmp))
    return done


@dataclass(frozen=True)
class ResumeSpec:
    """Every way the source may be stopped, hence resumed: processes (SIGSTOP, auto-converge's
    duty cycles), a freezer cgroup's folder, a QEMU's QMP socket."""
    pids: tuple[int, ...] = ()
    freezer: str | None = None
    qmp: str | None = None

    def args(self) -> list[str]:
        out = [a for pid in dict.fromkeys(self.pids) for a in ("--pid", str(pid))]
        if self.freezer is not None:
            out += ["--freezer", self.freezer]
        if self.qmp is not None:
            out += ["--qmp", self.qmp]
        return out


@dataclass
class Guardian:
    """migrate's end of the guardian.  start() before anything is stopped, then arm(); disarm()
    before the destination may take over; close() at the end, once the source is settled.

    Best effort by design: it must never be the reason a migration fails.  A guardian that cannot
    start or dies is recorded in `problem` (the report says so) and the migration goes on."""

    spec: ResumeSpec
    problem: str | None = None
    armed: bool = False
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, timeout_s: float = 5.0) -> None:
        """Start the process and wait until it watches the source (its pidfds are open)."""
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", os.path.abspath(__file__), *self.spec.args()],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
            assert self._proc.stdout is not None
            ready, _, _ = select.select([self._proc.stdout], [], [], timeout_s)
            line = self._proc.stdout.readline() if ready else b""
            self._proc.stdout.close()
            if line != READY:
                raise OSError(f"it did not start within {timeout_s:.0f} s" if not ready
                              else f"it exited with status {self._proc.wait()}")
        except OSError as e:
            self.problem = f"no guardian ({e.strerror or e}): a kill -9 of migrate during the pause would leave the source stopped"
            self._kill()

    def arm(self) -> None:
        """From now on the source may be stopped: resume it if migrate dies."""
        self.armed = True
        self._send(ARM)

    def disarm(self) -> None:
        """The destination has (or may have) taken over: never resume the source."""
        self._send(DISARM)

    def close(self) -> None:
        """migrate settled the source itself: the guardian exits without acting."""
        if self._proc is None:
            return
        self._send(EXIT)
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._kill()
        self._proc = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _send(self, cmd: bytes) -> None:
        if self._proc is None or self._proc.stdin is None:
            return
        try:
            self._proc.stdin.write(cmd)
            self._proc.stdin.flush()
        except (OSError, ValueError) as e:
            self.problem = f"the guardian went away ({getattr(e, 'strerror', None) or e})"

    def _kill(self) -> None:
        if self._proc is not None:
            try:
                self._proc.kill()
                self._proc.wait()
            except OSError:
                pass
            for f in (self._proc.stdin, self._proc.stdout):
                try:
                    if f is not None:
                        f.close()
                except OSError:
                    pass
            self._proc = None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m migrator.guardian")
    p.add_argument("--pid", type=int, action="append", default=[])
    p.add_argument("--freezer")
    p.add_argument("--qmp")
    args = p.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)          # (only the pipe's end makes it act)
    pidfds = {}
    for pid in args.pid:
        try:
            pidfds[pid] = os.pidfd_open(pid)
        except OSError as e:
            _say(f"process {pid}: {e.strerror} (not watched)")
    try:
        os.write(1, READY)
    except OSError:
        return 1
    armed = disarmed = False
    while True:
        try:
            cmd = os.read(0, 1)
        except InterruptedError:
            continue
        except OSError:
            cmd = b""
        if cmd == ARM and not disarmed:
            armed = True
        elif cmd == DISARM:
            armed, disarmed = False, True       # (for good: no command re-arms it)
        elif cmd == EXIT:
            return 0
        elif not cmd:
            break
    if armed:
        done = resume(pidfds, args.freezer, args.qmp)
        _say("migrate ended while the source may have been stopped: " + "; ".join(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
