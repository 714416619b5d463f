"""Parsing of sizes (bytes) and rates (bytes/s or pages/s) as users write them: 256M, 100MB/s."""

import re

from .errors import UsageError

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1000, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1000**2, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1000**4, "tib": 1 << 40,
}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes from '4096', '256M' (MiB), '1G' (GiB), '100MB' (10**6), '2GiB'."""
    m = _SIZE_RE.match(str(text))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise UsageError(f"bad size {text!r}: expected a number with an optional unit like 256M, 1G, 100MB")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_rate(text: str, page_size: int = 4096) -> float:
    """Bytes per second from '100MB/s', '1G/s', '20000pages/s' (pages of page_size bytes)."""
    t = str(text).strip()
    if not t.endswith("/s"):
        raise UsageError(f"bad rate {text!r}: expected e.g. 100MB/s, 1GiB/s or 20000pages/s")
    body = t[:-2].strip()
    if body.lower().endswith("pages"):
        num = body[:-5].strip()
        try:
            return float(num) * page_size
        except ValueError:
            raise UsageError(f"bad rate {text!r}: {num!r} is not a number") from None
    return float(parse_size(body))


def format_bytes(n: float) -> str:
    """'1.5 GiB' style, for humans."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
