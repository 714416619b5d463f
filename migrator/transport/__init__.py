"""Page streaming: wire format, authentication, sender, receiver, destination images.

    wire.py      frames and messages; the only parser of network bytes
    decoder.py   the frame decoder (sans-IO: bytes in, checked messages out)
    framing.py   frames over a trio stream (async and blocking), driving the decoder
    auth.py      key file, HMAC challenge-response, TLS contexts, loopback rule
    sender.py    source side: connect_sender() -> Sender
    receiver.py  destination side: serve(), Receiver.handle_stream
    images.py    image files and manifest.json
    digest.py    region digests (same on both sides)
"""

from .auth import client_ssl_context as client_ssl_context
from .auth import generate_key_file as generate_key_file
from .auth import load_key as load_key
from .auth import server_ssl_context as server_ssl_context
from .digest import PageReader as PageReader
from .digest import digest_bytes as digest_bytes
from .digest import file_digest as file_digest
from .digest import region_digest as region_digest
from .receiver import Receiver as Receiver
from .receiver import SessionOutcome as SessionOutcome
from .receiver import parse_listen as parse_listen
from .receiver import serve as serve
from .sender import DEFAULT_CHANNELS as DEFAULT_CHANNELS
from .sender import FinishResult as FinishResult
from .sender import KnownPages as KnownPages
from .sender import RegionVerdict as RegionVerdict
from .sender import Sender as Sender
from .sender import SenderStatistics as SenderStatistics
from .sender import SendStats as SendStats
from .sender import connect_sender as connect_sender
from .wire import RegionSpec as RegionSpec

__all__ = ["DEFAULT_CHANNELS", "RegionSpec", "PageReader", "KnownPages", "connect_sender", "Sender", "SendStats", "SenderStatistics",
           "FinishResult", "RegionVerdict", "serve", "Receiver", "SessionOutcome", "parse_listen",
           "load_key", "generate_key_file", "server_ssl_context", "client_ssl_context",
           "region_digest", "digest_bytes", "file_digest"]
