"""The pytest plugin (entry point `pytest11`: loaded by pytest wherever migrator is installed).

It provides the `migration` fixture: a keyed receiver on loopback (`migrator receive`, in its own
process, started on first use) and a runner that live-migrates a process of the test to it and
hands back the MigrationReport to assert on:

    def test_my_server_migrates(migration, my_server):
        rep = migration.run(pid=my_server.pid, regions=["kind:anon"], downtime_limit_ms=100)
        assert rep.status == "completed" and rep.downtime_ms < 100

    async def test_async(migration, my_server):          # under pytest-trio
        rep = await migration.run_async(pid=my_server.pid, regions=["kind:anon"])

By default the destination is proven identical to the paused source byte for byte
(`verify="memory"`), and the source is resumed after the migration (a completed migration leaves
it stopped, for the destination to take over; a test's process usually has to go on).  Where the
kernel or the privileges cannot track memory, the fixture skips the test with the reason, or
fails it when the CI environment variable is "true".  See docs/ci.md.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import fields
from typing import Any

import pytest


def _unavailable(reason: str) -> None:
    """Skip, or fail under CI=true (a CI machine must be able to run what it claims to test)."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"migrator cannot migrate here (CI=true, so this fails instead of skipping): {reason}",
                    pytrace=False)
    pytest.skip(f"migrator cannot migrate here: {reason}")


class Migration:
    """The `migration` fixture's value: run() / run_async() migrate a process to this test's
    receiver; .receiver_dir holds the images and manifest.json of the last run; .reports every
    report so far."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.receiver_dir = os.path.join(workdir, "destination")
        self.reports: list[Any] = []
        self._receiver: Any = None
        self._key_file = os.path.join(workdir, "migration.key")
        self._key: bytes | None = None
        self._checked = False

    # -- set-up ----------------------------------------------------------------------------
    def _ready(self) -> None:
        """Check that this machine can track (once), start the receiver (once)."""
        if not self._checked:
            from .api import probe
            problem = probe().tracking_problem()
            self._checked = True
            if problem:
                _unavailable(problem)
        if self._receiver is None:
            from .receiver_process import ReceiverProcess
            from .transport.auth import generate_key_file
            os.makedirs(self.workdir, mode=0o700, exist_ok=True)
            self._key = generate_key_file(self._key_file)
            self._receiver = ReceiverProcess(self.receiver_dir, os.path.join(self.workdir, "receiver.log"),
                                             key_file=self._key_file)

    def _policy(self, policy: Any, verify: str, overrides: dict[str, Any]) -> Any:
        from .precopy.controller import MigrationPolicy
        known = {f.name for f in fields(MigrationPolicy)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise TypeError(f"unknown policy field(s) {', '.join(bad)}: MigrationPolicy has "
                            f"{', '.join(sorted(known))}")
        base = policy if policy is not None else MigrationPolicy()
        from dataclasses import replace
        return replace(base, verify=verify, **overrides)

    def _check_access(self, pid: int) -> None:
        try:
            fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        except FileNotFoundError:
            raise ValueError(f"process {pid} does not exist") from None
        except PermissionError as e:
            _unavailable(f"no access to process {pid}'s memory ({e.strerror}: migrator needs "
                         "root, or the same user and ptrace rights)")
        else:
            os.close(fd)

    # -- runs ------------------------------------------------------------------------------
    async def run_async(self, *, pid: int | None = None, regions: Sequence[str] | None = None,
                        guest: Any = None, writers: Sequence[int] = (), policy: Any = None,
                        verify: str = "memory", resume: bool = True, **policy_fields: Any) -> Any:
        """Migrate pid's regions (or a migrator Guest's memory) to this test's receiver, from a
        trio test; returns the MigrationReport.  policy_fields set MigrationPolicy fields
        (downtime_limit_ms=100, max_bandwidth=50e6, ...) over `policy`; verify="memory" (the
        default) proves the destination identical to the paused source byte for byte,
        "hashes" only that it holds every page as sent.  resume: SIGCONT the source (and
        writers) after a completed migration, which leaves it stopped."""
        from .api import migrate
        if guest is not None:
            pid = guest.pid if pid is None else pid
            regions = guest.selectors() if regions is None else regions
            writers = list(writers) or list(guest.writer_pids.values())
        if pid is None or not regions:
            raise TypeError("migration.run needs pid= and regions=, or guest=")
        pol = self._policy(policy, verify, policy_fields)
        self._ready()
        self._check_access(pid)
        rep = await migrate(pid=pid, regions=list(regions), to=("127.0.0.1", self._receiver.port),
                            key=self._key, policy=pol, writers=list(writers))
        self.reports.append(rep)
        if resume and rep.status == "completed":
            for p in [pid, *writers]:
                try:
                    os.kill(p, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        return rep

    def run(self, **kw: Any) -> Any:
        """run_async() for a plain (synchronous) test."""
        import trio
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            return trio.run(lambda: self.run_async(**kw))
        raise RuntimeError("migration.run() called inside a trio test: use `await migration.run_async(...)`")

    def manifest(self) -> dict:
        """The receiver's manifest.json (the last run's)."""
        import json
        with open(os.path.join(self.receiver_dir, "manifest.json")) as f:
            return json.load(f)

    def receiver_log(self) -> str:
        return self._receiver.text() if self._receiver is not None else ""

    def close(self) -> None:
        if self._receiver is not None:
            self._receiver.stop()
            self._receiver = None


@pytest.fixture
def migration(tmp_path: Any) -> Iterator[Migration]:
    """Live-migrate a process of your test to a keyed receiver on loopback and get its
    MigrationReport: `migration.run(pid=..., regions=[...], downtime_limit_ms=...)` (see
    migrator.pytest_plugin)."""
    m = Migration(str(tmp_path / "migrator"))
    try:
        yield m
    finally:
        m.close()


def pytest_report_header(config: Any) -> str | None:
    from . import __version__
    return f"migrator {__version__}: `migration` fixture (docs/ci.md)"
