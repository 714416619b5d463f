"""`migrator receive` in a process of its own, for scenarios, benchmarks and tests: started on
port 0, its port read from its --port-file (never scraped from its log)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

from .errors import MigratorError

START_WAIT = 60.0      # seconds until it listens (a TCG guest of the kernel matrix under load: >20 s seen)


def wait_port_file(path: str, proc: subprocess.Popen, timeout_s: float = START_WAIT,
                   log: Callable[[], str] = lambda: "") -> int:
    """The port a `migrator receive --port-file path` started as proc listens on, once it
    does.  MigratorError if it exits first or takes over timeout_s (with log()'s tail)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with open(path) as f:
                return int(f.read())
        except (FileNotFoundError, ValueError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            why = "exited" if proc.poll() is not None else f"did not listen within {timeout_s:g} s"
            raise MigratorError(f"the receiver {why}: {log().strip()[-300:] or 'no output'}")
        time.sleep(0.01)


class ReceiverProcess:
    """`migrator receive --listen 127.0.0.1:0` in its own process; .port once it listens
    (from its --port-file, not its log)."""

    def __init__(self, out_dir: str, log_path: str, key_file: str | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.out_dir, self.log_path = out_dir, log_path
        self._log = open(log_path, "w")
        extra = (["--key-file", key_file] if key_file else []) + list(extra)
        port_file = log_path + ".port"
        try:
            os.unlink(port_file)        # a previous run's (same log path): its port is stale
        except FileNotFoundError:
            pass
        self.proc = subprocess.Popen([sys.executable, "-m", "migrator", "receive", "--listen", "127.0.0.1:0",
                                      "--out", out_dir, "--port-file", port_file, *extra],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self.port = wait_port_file(port_file, self.proc, START_WAIT, self.text)
        except MigratorError:
            self.stop()
            raise

    def text(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


__all__ = ["ReceiverProcess", "wait_port_file", "START_WAIT"]
