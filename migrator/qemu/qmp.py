"""A small synchronous QMP client (QEMU Machine Protocol) over a unix socket.

QMP is line-delimited JSON: a greeting, then `qmp_capabilities`, then commands answered by
`{"return": ...}` or `{"error": {"class", "desc"}}`, with asynchronous events (`{"event": ...,
"timestamp": {"seconds", "microseconds"}}`) interleaved.  Events are kept in arrival order for
wait_event().  Blocking calls: trio code runs them with trio.to_thread.run_sync.  One lock
serialises commands, so a pauser thread and the main thread can share a client.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..errors import MigratorError


GREETING_WAIT_S = 2.0


class QmpError(MigratorError):
    """QMP failed: no socket, no greeting, or a command answered with an error."""


class QmpCommandError(QmpError):
    """QEMU answered a command with an error (QMP's `error`: class and description)."""

    def __init__(self, command: str, error: Any):
        desc = error.get("desc", error) if isinstance(error, dict) else error
        super().__init__(f"QEMU refused {command}: {desc}")
        self.command = command
        self.error_class = error.get("class", "") if isinstance(error, dict) else ""
        self.desc = str(desc)


class MigrationUnfinishedError(QmpCommandError):
    """QEMU refused a command (`cont`) because the end of a failed or cancelled migration is
    still under way (finish-migrate -> postmigrate): worth retrying in a moment."""

    # QEMU says so only in words: "Migration is not finalized yet" (current), "... not finished"
    # (older versions); the guardian (standard library only) knows the same two
    WORDING = ("not finished", "not finalized")

    @classmethod
    def matches(cls, error: Any) -> bool:
        desc = error.get("desc", "") if isinstance(error, dict) else str(error)
        return any(w in desc for w in cls.WORDING)


@dataclass(frozen=True)
class QmpEvent:
    name: str
    data: dict
    timestamp: float     # wall clock (time.time()) that QEMU stamped the event with

    @classmethod
    def from_json(cls, msg: dict) -> "QmpEvent":
        ts = msg.get("timestamp") or {}
        return cls(msg["event"], msg.get("data") or {},
                   ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6)


class QMP:
    """A connected QMP session.

    Args:
        path: the unix socket of `-qmp unix:PATH,server=on,wait=off`.
        connect_wait_s: keep retrying the connection this long (a QEMU just started).
        reply_wait_s: how long any single reply may take.

    Raises:
        QmpError: cannot connect, or the peer does not speak QMP.
    """

    def __init__(self, path: str, *, connect_wait_s: float = 0.0, reply_wait_s: float = 30.0):
        self.path = path
        self.reply_wait_s = reply_wait_s
        self.events: list[QmpEvent] = []
        self._buf = b""
        self._lock = threading.RLock()
        deadline = time.monotonic() + connect_wait_s
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
                break
            except OSError as e:
                sock.close()
                if time.monotonic() >= deadline:
                    raise QmpError(f"cannot connect to QMP socket {path}: {e.strerror or e}") from None
                time.sleep(0.005)
        self._sock = sock
        try:
            greeting = self._read_message(deadline=time.monotonic() + min(reply_wait_s, GREETING_WAIT_S))
        except QmpError:
            self.close()
            raise QmpError(f"no QMP greeting on {path} within {min(reply_wait_s, GREETING_WAIT_S)} s: "
                           "QEMU serves one QMP client at a time; is another one connected?") from None
        if "QMP" not in greeting:
            self.close()
            raise QmpError(f"{path} is not a QMP socket (greeting {str(greeting)[:80]!r})")
        self.version = greeting["QMP"].get("version", {}).get("qemu", {})
        self.execute("qmp_capabilities")

    # -- wire ---------------------------------------------------------------------------------

    def _read_message(self, deadline: float) -> dict:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError(f"QMP {self.path}: no reply within {self.reply_wait_s} s")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                raise QmpError(f"QMP {self.path}: {e.strerror or e}") from None
            if not chunk:
                raise QmpError(f"QMP {self.path}: QEMU closed the connection (did it exit?)")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError:
            raise QmpError(f"QMP {self.path}: not JSON: {line[:80]!r}") from None
        if not isinstance(msg, dict):
            raise QmpError(f"QMP {self.path}: unexpected message {line[:80]!r}")
        return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run one command; returns its `return` value.

        Raises:
            QmpError: QEMU answered with an error (its class and description are in the message).
        """
        return self._execute(command, arguments, None)

    def execute_many(self, *commands: str | tuple[str, dict]) -> list[Any]:
        """Several commands (names, or (name, arguments)) sent at once and answered in order: one
        round trip.  Returns their `return` values.

        Raises:
            QmpError: QEMU refused one of them (the first refusal; every answer is read first).
        """
        reqs = [{"execute": c} if isinstance(c, str) else {"execute": c[0], "arguments": c[1]}
                for c in commands]
        with self._lock:
            try:
                self._sock.sendall(b"".join(json.dumps(r).encode() + b"\n" for r in reqs))
            except OSError as e:
                raise QmpError(f"QMP {self.path}: {e.strerror or e}") from None
            deadline = time.monotonic() + self.reply_wait_s
            out: list[Any] = []
            refused: QmpError | None = None
            for req in reqs:
                value, err = self._reply(deadline)
                if err is not None:
                    refused = refused or QmpError(f"QEMU refused {req['execute']}: {err.get('desc', err)}")
                out.append(value)
            if refused is not None:
                raise refused
            return out

    def execute_with_fd(self, command: str, fd: int, **arguments: Any) -> Any:
        """Run a command that takes a file descriptor (e.g. getfd), passed with SCM_RIGHTS."""
        return self._execute(command, arguments, fd)

    def _execute(self, command: str, arguments: dict, fd: int | None) -> Any:
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        with self._lock:
            try:
                data = json.dumps(req).encode() + b"\n"
                if fd is None:
                    self._sock.sendall(data)
                else:
                    socket.send_fds(self._sock, [data], [fd])
            except OSError as e:
                raise QmpError(f"QMP {self.path}: {command}: {e.strerror or e}") from None
            value, err = self._reply(time.monotonic() + self.reply_wait_s)
            if err is not None:
                kind = MigrationUnfinishedError if MigrationUnfinishedError.matches(err) else QmpCommandError
                raise kind(command, err)
            return value

    def _reply(self, deadline: float) -> tuple[Any, Any]:
        """The next command reply, events before it kept: (return value, None) or (None, error)."""
        while True:
            msg = self._read_message(deadline)
            if "event" in msg:
                self.events.append(QmpEvent.from_json(msg))
            elif "error" in msg:
                return None, msg["error"]
            elif "return" in msg:
                return msg["return"], None

    def wait_event(self, name: str, wait_s: float, *, since: int = 0) -> QmpEvent:
        """The first event called `name` at index >= since in self.events, waiting up to wait_s."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            while True:
                for ev in self.events[since:]:
                    if ev.name == name:
                        return ev
                try:
                    msg = self._read_message(deadline)
                except QmpError:
                    if time.monotonic() >= deadline:
                        raise QmpError(f"QMP {self.path}: no {name} event within {wait_s} s") from None
                    raise
                if "event" in msg:
                    self.events.append(QmpEvent.from_json(msg))

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> "QMP":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
