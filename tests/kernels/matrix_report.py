"""Pure parts of the kernel matrix: reading pytest's summary line, turning `migrator probe --json`
into a table row, and printing the table.  No I/O here, so tests/kernels/test_report.py can check
every rule exactly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

# pytest's final line, e.g. "===== 3 failed, 10 passed, 2 skipped in 4.20s =====" or, with -q,
# "3 failed, 10 passed in 4.20s".  The counts come before " in <time>".
_SUMMARY_RE = re.compile(
    r"^=*\s*(?P<counts>(?:\d+ [a-z]+(?:, )?)+) in (?P<secs>[0-9.]+)s(?: \([0-9:]+\))?\s*=*\s*$")
_COUNT_RE = re.compile(r"(\d+) ([a-z]+)")
# pytest says "error" and "errors", "warning" and "warnings": keep one key each
_PLURALS = {"errors": "error", "warnings": "warning"}
_NO_TESTS_RE = re.compile(r"^=*\s*no tests ran in (?P<secs>[0-9.]+)s")


@dataclass
class PytestSummary:
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> int:
        return self.counts.get("passed", 0)

    @property
    def failed(self) -> int:
        """Tests that did not pass and were not skipped on purpose: failed + error."""
        return self.counts.get("failed", 0) + self.counts.get("error", 0)

    @property
    def skipped(self) -> int:
        return self.counts.get("skipped", 0)


def parse_pytest_summary(output: str) -> PytestSummary | None:
    """The counts of pytest's last summary line in output, or None when there is none (pytest did
    not finish: crash, timeout, collection aborted before the summary)."""
    for line in reversed(output.splitlines()):
        line = _strip_ansi(line).strip()
        m = _SUMMARY_RE.match(line)
        if m:
            counts: dict[str, int] = {}
            for n, word in _COUNT_RE.findall(m.group("counts")):
                word = _PLURALS.get(word, word)
                counts[word] = counts.get(word, 0) + int(n)
            return PytestSummary(counts, float(m.group("secs")))
        m = _NO_TESTS_RE.match(line)
        if m:
            return PytestSummary({}, float(m.group("secs")))
    return None


def _strip_ansi(s: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", s)


# ---------------------------------------------------------------------------------------------
# migrator probe --json

@dataclass
class ProbeRow:
    release: str | None = None
    trackers: list[str] = field(default_factory=list)   # exact trackers the probe found usable
    features: dict[str, bool] = field(default_factory=dict)
    auto: str | None = None
    derived: bool = False       # trackers and auto derived from the features, not named by the probe


def _truth(v) -> bool:
    """A probe entry is either a bool or an object with one of these flags."""
    if isinstance(v, dict):
        for key in ("supported", "available", "usable", "present", "ok"):
            if key in v:
                return bool(v[key])
        return False
    return bool(v)


def derive_trackers(features: dict[str, bool]) -> tuple[list[str], str]:
    """The trackers a kernel with these features offers for private memory, best first, and the
    one `auto` takes for a cooperating target (one that holds a userfaultfd), by the rule of
    migrator.tracking.choose.make_tracker: write-protect when the kernel has async uffd-wp on
    anonymous memory, PAGEMAP_SCAN and pidfd_getfd; else soft-dirty; else content hashing.
    Used when the probe's JSON does not name trackers itself."""
    out = []
    if all(features.get(k) for k in ("uffd_wp_async_anon", "pagemap_scan", "pidfd_getfd")):
        out.append("wp")
    if features.get("soft_dirty"):
        out.append("soft-dirty")
    out.append("hash")
    return out, out[0]


def parse_probe(doc: str | dict) -> ProbeRow:
    """The row for `migrator probe --json` output.

    The shape `migrator probe --json` prints (one object per feature):
      {"soft_dirty": {"supported": true, "detail": "..."}, "pagemap_scan": {...}, ...}
    also accepted, with trackers and the auto choice named by the probe itself:
      {"kernel": {"release": "6.12.117+deb12-amd64"} | "6.12...",   (or "release")
       "features": {"soft_dirty": true | {"supported": true, ...}, ...},
       "trackers": ["wp", ...] | {"wp": true | {"usable": true}, ...},
       "auto": "wp" | {"tracker": "wp"}}
    Without "trackers"/"auto" they are derived from the features (derive_trackers).
    """
    if isinstance(doc, str):
        doc = json.loads(doc)
    if not isinstance(doc, dict):
        raise ValueError(f"probe JSON: expected an object, got {type(doc).__name__}")
    row = ProbeRow()
    kernel = doc.get("kernel", doc.get("release"))
    if isinstance(kernel, dict):
        kernel = kernel.get("release", kernel.get("uname"))
    row.release = kernel if isinstance(kernel, str) else None

    if "features" in doc or "mechanisms" in doc:
        feats = doc.get("features", doc.get("mechanisms"))
    else:       # flat: every object with a "supported" flag is a feature
        feats = {k: v for k, v in doc.items() if isinstance(v, dict) and "supported" in v}
        if not feats:
            raise ValueError("probe JSON: no features (no \"features\" and no {\"supported\": ...} entries)")
    if isinstance(feats, dict):
        row.features = {k: _truth(v) for k, v in feats.items()}
    elif isinstance(feats, list):
        row.features = {str(k): True for k in feats}

    trackers = doc.get("trackers")
    if isinstance(trackers, dict):
        row.trackers = [k for k, v in trackers.items() if _truth(v)]
    elif isinstance(trackers, list):
        names = []
        for t in trackers:
            if isinstance(t, str):
                names.append(t)
            elif isinstance(t, dict) and "name" in t and _truth(t):
                names.append(str(t["name"]))
        row.trackers = names

    auto = doc.get("auto", doc.get("best"))
    if isinstance(auto, dict):
        auto = auto.get("tracker", auto.get("name"))
    row.auto = auto if isinstance(auto, str) else None
    if trackers is None and auto is None:
        row.trackers, row.auto = derive_trackers(row.features)
        row.derived = True
    return row


def expectation_errors(row: ProbeRow, expect: dict[str, bool], strict: bool = True) -> list[str]:
    """Differences between what the probe found and what the kernel class is known to have.
    A feature the probe does not report at all is an error too (strict): the row would otherwise
    look right by omission."""
    errs = []
    for name, want in expect.items():
        if name not in row.features:
            if not strict:
                continue
            errs.append(f"{name}: not reported by the probe (expected {'yes' if want else 'no'})")
        elif row.features[name] != want:
            errs.append(f"{name}: probe says {'yes' if row.features[name] else 'no'}, "
                        f"this kernel {'has' if want else 'does not have'} it")
    return errs


# ---------------------------------------------------------------------------------------------
# the table

@dataclass
class KernelResult:
    name: str                       # the kernel class, e.g. "debian-6.12"
    release: str | None = None      # uname -r inside
    status: str = "ok"              # "ok", or why the kernel failed: "fetch failed", "boot failed", ...
    probe: ProbeRow | None = None
    tests: PytestSummary | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    output_tail: str = ""

    @property
    def ok(self) -> bool:
        return (self.status == "ok" and self.tests is not None and self.tests.failed == 0
                and self.tests.passed > 0)


def _short(status: str, width: int = 60) -> str:
    """One line of at most width characters (the notes under the table carry the rest)."""
    line = " ".join(status.split())
    return line if len(line) <= width else line[:width - 3] + "..."


def render_table(results: list[KernelResult]) -> str:
    head = ["kernel", "release", "trackers (probe)", "auto", "passed", "failed", "skipped",
            "time", "result"]
    rows = [head]
    for r in results:
        t = r.tests
        rows.append([
            r.name,
            r.release or "?",
            ",".join(r.probe.trackers) if r.probe and r.probe.trackers else "-",
            (r.probe.auto if r.probe and r.probe.auto else "-"),
            str(t.passed) if t else "-",
            str(t.failed) if t else "-",
            str(t.skipped) if t else "-",
            f"{r.seconds:.0f}s",
            "PASS" if r.ok else ("FAIL: " + _short(r.status) if r.status != "ok" else "FAIL"),
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
