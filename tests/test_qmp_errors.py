"""QMP errors are told apart by type, not by matching their text: a `cont` refused while a failed
migration's end is still under way (either wording QEMU uses) is retried by the pauser's
resume; any other refusal is not.  Against a QMP peer on a real unix socket that answers as
QEMU does."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from migrator.qemu.qmp import QMP, MigrationUnfinishedError, QmpCommandError
from migrator.qemu.source import QmpPauser


def _fake_qemu(path: str, answers: list[dict]) -> tuple[threading.Thread, list[str]]:
    """A QMP server for one client: greeting, qmp_capabilities, then `answers` in order (one a
    command).  Returns its thread and the commands it got."""
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)
    got: list[str] = []

    def serve() -> None:
        conn, _ = lsock.accept()
        with conn, lsock, conn.makefile("rwb") as f:
            f.write(b'{"QMP": {"version": {"qemu": {"major": 9}}, "capabilities": []}}\n')
            f.flush()
            for answer in [{"return": {}}] + answers:
                line = f.readline()
                if not line:
                    return
                got.append(json.loads(line)["execute"])
                f.write(json.dumps(answer).encode() + b"\n")
                f.flush()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t, got


def _refusal(desc: str) -> dict:
    return {"error": {"class": "GenericError", "desc": desc}}


@pytest.mark.parametrize("desc", ["Migration is not finalized yet", "Migration is not finished yet"])
def test_cont_refused_while_a_migration_ends_is_its_own_type(tmp_path, desc):
    path = str(tmp_path / "qmp")
    t, got = _fake_qemu(path, [_refusal(desc)])
    with QMP(path, reply_wait_s=5) as q:
        with pytest.raises(MigrationUnfinishedError) as ei:
            q.execute("cont")
    t.join(5)
    assert got == ["qmp_capabilities", "cont"]
    assert str(ei.value) == f"QEMU refused cont: {desc}"
    assert (ei.value.command, ei.value.error_class, ei.value.desc) == ("cont", "GenericError", desc)


def test_other_refusals_are_command_errors(tmp_path):
    path = str(tmp_path / "qmp")
    t, _ = _fake_qemu(path, [_refusal("Expecting 'cont' in state 'inmigrate'")])
    with QMP(path, reply_wait_s=5) as q:
        with pytest.raises(QmpCommandError) as ei:
            q.execute("cont")
    t.join(5)
    assert type(ei.value) is QmpCommandError
    assert str(ei.value) == "QEMU refused cont: Expecting 'cont' in state 'inmigrate'"


def test_resume_retries_cont_until_the_migration_has_ended(tmp_path):
    path = str(tmp_path / "qmp")
    t, got = _fake_qemu(path, [_refusal("Migration is not finalized yet"),
                               _refusal("Migration is not finished yet"), {"return": {}}])
    with QMP(path, reply_wait_s=5) as q:
        pauser = QmpPauser(q)
        pauser.paused = True
        pauser.resume()
        assert not pauser.paused
    t.join(5)
    assert got == ["qmp_capabilities", "cont", "cont", "cont"]


def test_resume_does_not_retry_another_refusal(tmp_path):
    path = str(tmp_path / "qmp")
    t, got = _fake_qemu(path, [_refusal("Device 'x' has not been activated"), {"return": {}}])
    with QMP(path, reply_wait_s=5) as q:
        pauser = QmpPauser(q)
        pauser.paused = True
        with pytest.raises(QmpCommandError, match="^QEMU refused cont: Device 'x' has not been activated$"):
            pauser.resume()
        assert pauser.paused
    t.join(5)
    assert got == ["qmp_capabilities", "cont"]
