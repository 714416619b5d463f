"""TLS with certificate verification (certificates made with the openssl command)."""

import shutil
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
