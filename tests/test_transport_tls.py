"""TLS with certificate verification (certificates made with the openssl command)."""

import shutil
import ssl
import subprocess

import pytest

from conftest import require
from migrator.errors import TransportError
from migrator.transport import RegionSpec, client_ssl_context, connect_sender, digest_bytes, server_ssl_context

from transport_helpers import KEY, MemReader, random_memory, start_receiver


def _cert(d, name):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.pem")],
                   check=True, capture_output=True)
    return str(d / f"{name}.pem"), str(d / f"{name}.key")


async def test_tls_verified_and_wrong_ca_refused(nursery, tmp_path):
    require(shutil.which("openssl") is not None, "needs the openssl command to make certificates")
    cert, key = _cert(tmp_path, "rx")
    other, _ = _cert(tmp_path, "other")
    rx, port, logs = await start_receiver(nursery, tmp_path / "out", ssl_context=server_ssl_context(cert, key))
    mem = {"ram": random_memory(32, 11)}
    regions = [RegionSpec("ram", 0, 32 * 4096)]
    async with connect_sender("127.0.0.1", port, key=KEY, regions=regions, channels=2,
                              ssl_context=client_ssl_context(cert)) as s:
        await s.send_pages({"ram": [(0, 32)]}, MemReader(mem), 0)
        assert (await s.finish({"ram": digest_bytes(mem["ram"])})).complete
    with pytest.raises(TransportError, match="TLS handshake"):
        async with connect_sender("127.0.0.1", port, key=KEY, regions=regions,
                                  ssl_context=client_ssl_context(other)):
            pass


def test_sender_trusts_only_the_given_ca(tmp_path):
    """--tls-ca: the sender's context holds that CA alone, not the system's authorities (a
    receiver with any publicly trusted certificate would pass otherwise)."""
    require(shutil.which("openssl") is not None, "needs the openssl command to make certificates")
    cert, _ = _cert(tmp_path, "rx")
    ctx = client_ssl_context(cert)
    assert ctx.cert_store_stats()["x509_ca"] == 1
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "127.0.0.1"),),)]
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
async def test_send_ended_early_drops_what_was_not_sent(nursery, tmp_path, tls):
    """send_pages(until=...): once set (here by the third packed batch), nothing more is packed
    or sent; packed batches not sent (which, depends on timing) are listed in
    SendStats.dropped.  Sent + dropped pages are exactly those packed (on_packed), each once;
    sending everything again completes the session."""
    import threading
    ssl_rx = ssl_tx = None
    if tls:
        require(shutil.which("openssl") is not None, "needs the openssl command to make certificates")
        cert, key = _cert(tmp_path, "rx")
        ssl_rx, ssl_tx = server_ssl_context(cert, key), client_ssl_context(cert)
    rx, port, logs = await start_receiver(nursery, tmp_path / "out", ssl_context=ssl_rx)
    n = 512
    mem = {"ram": random_memory(n, 12, zero_fraction=0.0)}
    regions = [RegionSpec("ram", 0, n * 4096)]
    until = threading.Event()
    packed: list[tuple[int, int]] = []

    def on_packed(name, data_flat, zero_flat, hashes):
        packed.extend(zip(data_flat[0::2], data_flat[1::2]))
        if sum(c for _, c in packed) >= 3 * 16:
            until.set()
    async with connect_sender("127.0.0.1", port, key=KEY, regions=regions, batch_pages=16,
                              ssl_context=ssl_tx) as s:
        st = await s.send_pages({"ram": [(0, n)]}, MemReader(mem), 0, on_packed, until=until)
        pages = lambda runs: {p for first, count in runs for p in range(first, first + count)}  # noqa: E731
        dropped = pages(r for _, d, _z in st.dropped for r in zip(d[0::2], d[1::2]))
        assert st.pages_zero == 0 and 3 * 16 <= len(pages(packed)) < n
        assert st.pages_normal + len(dropped) == len(pages(packed)) == sum(c for _, c in packed)
        assert st.batches * 16 == st.pages_normal
        await s.send_pages({"ram": [(0, n)]}, MemReader(mem), 1)     # (everything, to finish)
        assert (await s.finish({"ram": digest_bytes(mem["ram"])})).complete


async def test_receiver_stopping_ends_tls_channels_mid_session(tmp_path):
    """TLS channels run the same batch pipeline as plain TCP ones, in a worker thread reading
    through the event loop (trio.from_thread): a receiver stopped mid-session (both channels
    waiting for the next frame there) ends them at once; the session fails saying so, the
    manifest too, and the pages received before were written."""
    import time

    import trio

    from migration_helpers import manifest
    from migrator.transport import Receiver
    from transport_helpers import Logs, read_image
    require(shutil.which("openssl") is not None, "needs the openssl command to make certificates")
    cert, key = _cert(tmp_path, "rx")
    out = tmp_path / "out"
    logs = Logs()
    rx = Receiver(str(out), key=KEY, ssl_context=server_ssl_context(cert, key), log=logs)
    n = 64
    mem = {"ram": random_memory(n, 13, zero_fraction=0.0)}
    async with trio.open_nursery() as outer:
        rx_scope = trio.CancelScope()

        async def serve(task_status=trio.TASK_STATUS_IGNORED):
            with rx_scope:
                await rx.serve("127.0.0.1", 0, task_status=task_status)
        port = await outer.start(serve)
        async with connect_sender("127.0.0.1", port, key=KEY, regions=[RegionSpec("ram", 0, n * 4096)],
                                  channels=2, ssl_context=client_ssl_context(cert)) as s:
            await s.send_pages({"ram": [(0, n)]}, MemReader(mem), 0)
            await s.end_round(0)             # (acknowledged: every page written)
            t0 = time.monotonic()
            rx_scope.cancel()
            (o,) = await rx.wait_sessions(1)
            stopped_in = time.monotonic() - t0
            with pytest.raises(TransportError):     # (the sender learns it at its next step)
                await s.finish({"ram": digest_bytes(mem["ram"])})
    assert stopped_in < 1.0, stopped_in
    assert not o.complete and o.error == "receiver shutting down" and o.channels == 2
    assert o.bytes_received == n * 4096
    m = manifest(str(out))
    assert m["complete"] is False and m["error"] == "receiver shutting down"
    assert read_image(str(out), m, "ram") == bytes(mem["ram"])
