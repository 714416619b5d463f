"""`migrator receive` as its own process: a migration with --once, one-line errors, Ctrl-C."""

import json
import os
import signal
import subprocess
import sys

import pytest
import trio

from migrator.transport import RegionSpec, connect_sender, digest_bytes, generate_key_file, load_key

from transport_helpers import MemReader, random_memory

def _cmd(*args):
    return [sys.executable, "-m", "migrator", "receive", *args]


@pytest.mark.slow
def test_user_errors_are_one_line(tmp_path):
    for args, text in [(["--listen", "0.0.0.0:0", "--out", str(tmp_path)], "without a key"),
                       (["--listen", "127.0.0.1:0", "--out", str(tmp_path), "--key-file", "/nonexistent"], "No such file"),
                       (["--listen", "127.0.0.1", "--out", str(tmp_path)], "bad address"),
                       (["--listen", "127.0.0.1:0", "--out", str(tmp_path), "--port-file",
                         str(tmp_path / "no" / "such" / "dir")], "--port-file")]:
        p = subprocess.run(_cmd(*args), capture_output=True, text=True, timeout=30)
        assert p.returncode == 2
        assert p.stderr.count("\n") == 1 and text in p.stderr and "Traceback" not in p.stderr


async def test_once_migration_and_interrupt(tmp_path):
    key_file = tmp_path / "key"
    generate_key_file(key_file)
    out = tmp_path / "out"
    proc = await trio.lowlevel.open_process(
        _cmd("--listen", "127.0.0.1:0", "--out", str(out), "--key-file", str(key_file), "--once"),
        stdout=subprocess.PIPE)
    line = b""
    while not line.endswith(b"\n"):
        line += await proc.stdout.receive_some(1)
    port = int(line.split(b"listening on ")[1].split(b",")[0].rsplit(b":", 1)[1])
    mem = {"ram": random_memory(64, 9)}
    async with connect_sender("127.0.0.1", port, key=load_key(key_file),
                              regions=[RegionSpec("ram", 0, 64 * 4096)], channels=2) as s:
        await s.send_pages({"ram": [(0, 64)]}, MemReader(mem), 0)
        assert (await s.finish({"ram": digest_bytes(mem["ram"])})).complete
    assert await proc.wait() == 0
    rest = b""
    while chunk := await proc.stdout.receive_some(4096):
        rest += chunk
    assert b"complete" in rest
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] is True
    assert (out / m["regions"][0]["image"]).read_bytes() == bytes(mem["ram"])
    # a server without --once stops cleanly on Ctrl-C
    proc = await trio.lowlevel.open_process(
        _cmd("--listen", "127.0.0.1:0", "--out", str(out)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = b""
    while not line.endswith(b"\n"):
        line += await proc.stdout.receive_some(1)
    proc.send_signal(signal.SIGINT)
    try:
        with trio.fail_after(30):
            assert await proc.wait() == 130
    except trio.TooSlowError:
        proc.kill()
        raise AssertionError("migrate receive did not stop within 30 s of SIGINT") from None
    err = b""
    while chunk := await proc.stderr.receive_some(4096):
        err += chunk
    assert b"Traceback" not in err and b"interrupted" in err
    assert os.path.exists(out / "manifest.json")


def test_receiver_process_ignores_a_stale_port_file(tmp_path):
    """A rerun with the same log path (a scenario's --report folder, reused) must not read the
    previous run's port: ReceiverProcess removes the file before its receiver starts."""
    import socket

    from migrator.receiver_process import ReceiverProcess

    log = tmp_path / "receiver.log"
    listener = socket.socket()                  # a port nothing will accept on once closed
    listener.bind(("127.0.0.1", 0))
    stale = listener.getsockname()[1]
    listener.close()
    (tmp_path / "receiver.log.port").write_text(f"{stale}\n")
    r = ReceiverProcess(str(tmp_path / "out"), str(log))
    try:
        assert r.port != stale
        assert f"listening on 127.0.0.1:{r.port}," in r.text()
        socket.create_connection(("127.0.0.1", r.port), timeout=10).close()
    finally:
        r.stop()


def test_port_file_names_the_port_it_listens_on(tmp_path):
    """--port-file: the port, whole, written before the "listening on" line: the port that line
    gives, and one that accepts connections."""
    import socket

    port_file = tmp_path / "port"
    proc = subprocess.Popen(_cmd("--listen", "127.0.0.1:0", "--out", str(tmp_path / "out"),
                                 "--port-file", str(port_file)), stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        logged = int(line.split("listening on ")[1].split(",")[0].rsplit(":", 1)[1])
        assert port_file.read_text() == f"{logged}\n"
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []   # (renamed)
        socket.create_connection(("127.0.0.1", logged), timeout=10).close()
    finally:
        proc.terminate()
        proc.wait(10)
