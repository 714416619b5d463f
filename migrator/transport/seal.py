"""Per-frame authentication (and optional encryption) after the handshake.

Once both sides have proved they hold the pre-shared key (auth.py), every later frame on the
connection carries a 16-byte AES-256-GCM tag after its data.  Each connection has two keys, one
per direction, derived from the key and the handshake transcript (HKDF-SHA256: both nonces, the
session id, the channel index and the mode), and each direction counts its frames: frame n is
sealed with nonce n.  So a frame cannot be altered, dropped, replayed, reordered, or moved to
another channel or session without the next tag check failing.

Two modes, chosen by the sender and bound into the handshake proofs (no downgrade):
- "mac" (default): the header, meta and page data are authenticated, sent in the clear
  (GMAC: AES-GCM with everything as associated data; ~7.5 GB/s here, docs/protocol.md);
- "aead" (--encrypt): the header is authenticated, meta and page data are encrypted in place
  (AES-GCM, ~3.6 GB/s here), for links that need confidentiality without TLS.

AES-GCM comes from the `cryptography` package (OpenSSL), which releases the GIL on large
buffers: the sender seals a batch in its channel thread, the receiver opens it in its pump
thread.  Nothing unauthenticated is parsed after the handshake: the receiver checks a frame's
tag before it decodes the frame's meta.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from typing import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ProtocolError

TAG_SIZE = 16
MODES = ("mac", "aead")
_NONCE = struct.Struct("!IQ")        # 4 zero bytes, then the frame's sequence number


def _writable(piece) -> memoryview | None:
    mv = memoryview(piece)
    if mv.readonly:
        return None
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


class FrameSeal:
    """One direction of one connection: its key, mode and frame counter."""

    def __init__(self, key: bytes, mode: str, label: str):
        if mode not in MODES:
            raise ValueError(f"unknown seal mode {mode!r}")
        self._aes = algorithms.AES(key)
        self.mode = mode
        self.label = label          # "sender to receiver" / "receiver to sender", for errors
        self.seq = 0
        self._lock = threading.Lock()

    def _nonce(self) -> bytes:
        n = self.seq
        if n >= 1 << 63:
            raise ProtocolError("frame counter exhausted (2^63 frames on one connection)")
        self.seq = n + 1
        return _NONCE.pack(0, n)

    def seal(self, head: bytes, pieces: Sequence) -> tuple[bytes, bytes]:
        """Seal the next outgoing frame: head = header + meta as encoded, pieces = its data.
        Returns (head to send, tag).  In "aead" mode the meta comes back encrypted and the
        pieces are encrypted in place (a read-only piece cannot be: ValueError)."""
        with self._lock:
            enc = Cipher(self._aes, modes.GCM(self._nonce())).encryptor()
            if self.mode == "mac":
                enc.authenticate_additional_data(head)
                for p in pieces:
                    enc.authenticate_additional_data(p)
            else:
                enc.authenticate_additional_data(head[:12])
                head = head[:12] + enc.update(head[12:])
                for p in pieces:
                    mv = _writable(p)
                    if mv is None:
                        raise ValueError("a read-only buffer cannot be encrypted in place")
                    enc.update_into(mv, mv)
            enc.finalize()
            return head, enc.tag

    def open(self, header: bytes, meta: bytes, data: memoryview | None, tag: bytes) -> bytes:
        """Check (and in "aead" mode decrypt, the data in place) the next incoming frame.
        Returns the plain meta.  ProtocolError if the tag does not match: the frame was
        altered, replayed, reordered or forged."""
        with self._lock:
            seq = self.seq
            dec = Cipher(self._aes, modes.GCM(self._nonce(), tag)).decryptor()
            if self.mode == "mac":
                dec.authenticate_additional_data(header)
                dec.authenticate_additional_data(meta)
                if data is not None and len(data):
                    dec.authenticate_additional_data(data)
            else:
                dec.authenticate_additional_data(header)
                meta = dec.update(meta)
                if data is not None and len(data):
                    dec.update_into(data, data)
            try:
                dec.finalize()
            except InvalidTag:
                raise ProtocolError(f"frame #{seq} {self.label} failed authentication: altered, "
                                    f"replayed, reordered or forged on the way") from None
            return meta


def transcript(nonce_c: bytes, nonce_s: bytes, session: bytes, channel: int, mode: str | None) -> bytes:
    """What both proofs and the frame keys are bound to."""
    return (nonce_c + nonce_s + session + struct.pack("!H", channel)
            + (mode or "none").encode())


def derive(key: bytes, transcript_bytes: bytes, mode: str, server: bool) -> tuple[FrameSeal, FrameSeal]:
    """(seal for what this side sends, seal for what it receives) on one connection."""
    salt = hashlib.sha256(b"migrator/3 transcript\0" + transcript_bytes).digest()
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=salt,
               info=b"migrator/3 frame keys " + mode.encode()).derive(key)
    c2s = FrameSeal(okm[:32], mode, "from the sender")
    s2c = FrameSeal(okm[32:], mode, "from the receiver")
    return (s2c, c2s) if server else (c2s, s2c)


__all__ = ["FrameSeal", "derive", "transcript", "TAG_SIZE", "MODES"]
