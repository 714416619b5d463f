"""Drive tests/writer_child.py: a real process that maps memory and writes on command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from migrator.kernel.maps import Region, read_maps, select_regions

HERE = os.path.dirname(os.path.abspath(__file__))


class Child:
    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "writer_child.py"), *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("writer child died at start")
        self.info = json.loads(line)
        self.pid: int = self.info["pid"]

    def cmd(self, op: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        if "error" in reply:
            raise RuntimeError(f"child {op}: {reply['error']}")
        return reply

    def write(self, region: str, pages: list[int]) -> None:
        self.cmd("write", region=region, pages=pages)

    def span(self, region: str) -> tuple[int, int]:
        r = self.info["regions"][region]
        return r["start"], r["end"]

    def region(self, name: str) -> Region:
        """The tracked Region for one of the child's mappings (shm, anon, thp)."""
        a, b = self.span(name)
        (r,) = select_regions(read_maps(self.pid), [f"{a:x}-{b:x}"])
        return Region(**{**r.__dict__, "name": name})

    def exit(self) -> None:
        if self.proc.poll() is None:
            try:
                self.cmd("exit")
            except (BrokenPipeError, ValueError, json.JSONDecodeError):
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
