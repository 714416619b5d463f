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
