"""Who may talk to whom: the pre-shared key file, the mutual HMAC challenge-response, TLS
contexts, and the rule that a listener without a key stays on loopback.

Handshake (per connection, before anything else):

    C -> S  HELLO      version, nonce_c (32 random bytes), session id, channel index, auth?, encrypt?
    S -> C  CHALLENGE  nonce_s (32 random bytes), mac_s = HMAC(key, "migrator/3 server" | T)
    C -> S  AUTH       mac_c = HMAC(key, "migrator/3 client" | T)
    S -> C  WELCOME    (or ERROR: refused)

with T = nonce_c | nonce_s | session id | channel index | mode ("mac", "aead" or "none").
Each side checks the other's proof over a nonce it chose itself, fresh for this connection, so a
recorded handshake replays nowhere, and the mode is bound into both proofs (no downgrade).
With a key, every frame after AUTH (sender to receiver) and after WELCOME (receiver to sender)
is sealed with keys derived from the key and T (seal.py).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
import ssl
from dataclasses import dataclass

from ..errors import AuthError, MigratorError, ProtocolError, UsageError
from . import wire
from .framing import FrameStream
from .seal import FrameSeal, derive, transcript

MIN_KEY_BYTES = 16


def load_key(path: str | os.PathLike) -> bytes:
    """The key in a key file (its bytes, surrounding white space removed)."""
    try:
        with open(path, "rb") as f:
            key = f.read(1 << 16).strip()
    except OSError as e:
        raise UsageError(f"key file {os.fspath(path)!r}: {e.strerror}") from None
    if len(key) < MIN_KEY_BYTES:
        raise UsageError(f"key file {os.fspath(path)!r} holds {len(key)} bytes; "
                         f"at least {MIN_KEY_BYTES} are needed (e.g. 64 hex digits)")
    return key


def generate_key_file(path: str | os.PathLike) -> bytes:
    """Write a new random key (64 hex digits) readable by the owner only; return it."""
    key = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key + b"\n")
    return key


def proof(key: bytes, role: str, nonce_c: bytes, nonce_s: bytes, session: bytes, channel: int,
          mode: str | None = "mac") -> bytes:
    """role's HMAC over the handshake transcript (mode: "mac", "aead", or None without a key)."""
    label = b"migrator/3 " + role.encode() + b"\0"
    return hmac.new(key, label + transcript(nonce_c, nonce_s, session, channel, mode),
                    hashlib.sha256).digest()


def is_loopback(host: str) -> bool:
    """True if every address `host` names is a loopback address."""
    if host in ("", "*"):
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def check_listen_policy(host: str, key: bytes | None) -> None:
    if key is None and not is_loopback(host):
        raise UsageError(f"refusing to listen on {host or 'all addresses'!s} without a key: "
                         f"pass --key-file (only loopback addresses may go without one)")


def server_ssl_context(certfile: str, keyfile: str, cafile: str | None = None) -> ssl.SSLContext:
    """TLS for a receiver; with cafile, senders must present a certificate signed by it."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(certfile, keyfile)
        if cafile:
            ctx.load_verify_locations(cafile)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"TLS set-up: {e}") from None
    return ctx


def client_ssl_context(cafile: str, certfile: str | None = None, keyfile: str | None = None) -> ssl.SSLContext:
    """TLS for a sender: the receiver's certificate must verify against cafile, and only
    against it (the system's certificate authorities are not trusted)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)     # (verifies, checks host names, no CAs)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile)
        if certfile:
            ctx.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"TLS set-up: {e}") from None
    return ctx


@dataclass(frozen=True)
class Peer:
    """What the server learned about an authenticated connection.  send_seal: arm it on the
    connection (FrameStream.arm) right after WELCOME; None without a key."""

    session: bytes
    channel: int
    mode: str | None = None
    send_seal: FrameSeal | None = None


async def client_handshake(fs: FrameStream, key: bytes | None, session: bytes, channel: int,
                           then: wire.Message | None = None, encrypt: bool = False) -> None:
    """Authenticate to the receiver on this connection, then seal every frame (with a key).
    then: a message sent right after our proof, before the receiver's WELCOME (the session's
    SETUP: one round trip less; a receiver that refuses us never reads it).  encrypt: ask for
    encrypted frames (needs a key)."""
    if encrypt and key is None:
        raise UsageError("encryption needs a key: pass a key file")
    mode = None if key is None else ("aead" if encrypt else "mac")
    nonce_c = secrets.token_bytes(wire.NONCE_SIZE)
    await fs.send(wire.Hello(wire.VERSION, nonce_c, session, channel, key is not None, encrypt))
    ch = await fs.expect(wire.Challenge)
    if key is None:
        if ch.mac is not None:
            raise AuthError(f"{fs.peer} requires a key: pass a key file")
        await fs.send(wire.Auth(None))
    else:
        if ch.mac is None:
            raise AuthError(f"{fs.peer} does not use a key but we have one: refusing to send pages "
                            f"to an unauthenticated receiver")
        if not hmac.compare_digest(ch.mac, proof(key, "server", nonce_c, ch.nonce, session, channel, mode)):
            raise AuthError(f"{fs.peer} failed to prove it holds our key (wrong key?)")
        await fs.send(wire.Auth(proof(key, "client", nonce_c, ch.nonce, session, channel, mode)))
        send_seal, recv_seal = derive(key, transcript(nonce_c, ch.nonce, session, channel, mode),
                                      mode, server=False)
        fs.arm(send=send_seal)
    if then is not None:
        await fs.send(then)
    await fs.expect(wire.Welcome)
    if key is not None:
        fs.arm(recv=recv_seal)


async def server_handshake(fs: FrameStream, key: bytes | None, require_encryption: bool = False) -> Peer:
    """Authenticate the sender on this connection; AuthError/ProtocolError if it cannot.
    From here on, what the sender sends is sealed (with a key); the caller arms the returned
    Peer's send_seal after its WELCOME."""
    try:
        hello = await fs.expect(wire.Hello)
    except ProtocolError as e:
        raise ProtocolError(f"bad handshake: {e}") from None
    if hello.version != wire.VERSION:
        raise ProtocolError(f"sender speaks protocol {hello.version}, this receiver {wire.VERSION}")
    if key is None and (hello.auth or hello.encrypt):
        raise AuthError("sender expects a key but this receiver has none")
    if require_encryption and not hello.encrypt:
        raise AuthError("this receiver accepts encrypted sessions only: pass --encrypt to the sender")
    mode = None if key is None else ("aead" if hello.encrypt else "mac")
    nonce_s = secrets.token_bytes(wire.NONCE_SIZE)
    mac_s = None if key is None else proof(key, "server", hello.nonce, nonce_s, hello.session,
                                           hello.channel, mode)
    await fs.send(wire.Challenge(nonce_s, mac_s))
    auth = await fs.expect(wire.Auth)
    if key is None:
        if auth.mac is not None:
            raise AuthError("sender expects a key but this receiver has none")
        return Peer(hello.session, hello.channel)
    want = proof(key, "client", hello.nonce, nonce_s, hello.session, hello.channel, mode)
    if auth.mac is None:
        raise AuthError("sender did not authenticate (this receiver requires a key)")
    if not hmac.compare_digest(auth.mac, want):
        raise AuthError("sender failed authentication (wrong key, or a replayed handshake)")
    send_seal, recv_seal = derive(key, transcript(hello.nonce, nonce_s, hello.session, hello.channel, mode),
                                  mode, server=True)
    fs.arm(recv=recv_seal)
    return Peer(hello.session, hello.channel, mode, send_seal)


__all__ = ["load_key", "generate_key_file", "proof", "is_loopback", "check_listen_policy",
           "server_ssl_context", "client_ssl_context", "client_handshake", "server_handshake",
           "Peer", "MigratorError"]
