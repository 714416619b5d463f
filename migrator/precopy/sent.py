"""What the destination holds: the XXH3-64 of every page as last sent, per region (8 bytes a
page), kept as pages are packed.  The source's region digests come from these tables, so the
switch-over reads no memory to verify: the receiver builds the same tables as pages arrive, and
equal digests prove that it holds every page as sent.  That the pages sent are the source's
memory is the trackers' claim; `--verify memory` checks it by reading the paused source
(compare())."""

from __future__ import annotations

from ..tracking.ledger import record_runs, zero_hash_table, zero_page_hash
from ..transport.digest import TableDigest


class SentHashes:
    """Per-page hashes of what each region's destination holds (a zero page's hash for a page
    never sent: the destination starts with zeros)."""

    def __init__(self, npages: dict[str, int]):
        self._zero = zero_page_hash()
        self._tables: dict[str, object] = {}
        self._views: dict[str, object] = {}       # each table's 8 * npages bytes
        self._npages = dict(npages)
        for name, n in npages.items():
            self._tables[name], self._views[name] = zero_hash_table(n)
        self._digests = {name: TableDigest(self._views[name], n) for name, n in npages.items()}

    def record(self, name: str, data_flat, zero_flat, hashes: bytes) -> None:
        """A sender's on_packed hook (from producer threads; batches never overlap): the pages
        of data runs went with these hashes, those of zero runs as zeros."""
        try:
            record_runs(self._tables[name], self._npages[name], data_flat, zero_flat, hashes, self._zero)
            d = self._digests[name]
            d.touch(data_flat)
            d.touch(zero_flat)
        except ValueError:
            raise ValueError(f"pages recorded outside region {name}") from None

    def hashes(self, name: str) -> bytes:
        return bytes(self._views[name])

    def refresh(self) -> None:
        """Bring the digests up to date with what was recorded (blocking: between sends, so
        that the switch-over's digests hash only its last pages)."""
        for d in self._digests.values():
            d.refresh()

    def digest(self, name: str) -> str:
        """The region's digest (transport/digest.py) from the table: the leaves recorded into
        since the last refresh() or digest() hashed again (not between sends)."""
        return self._digests[name].digest()

    def compare(self, name: str, now: bytes) -> list[int]:
        """The pages whose hashes `now` (8 bytes a page, e.g. SourceMemory.page_hashes of the
        paused source) differ from what was sent (at most 1000 listed)."""
        n = self._npages[name]
        if len(now) != 8 * n:
            raise ValueError(f"{len(now)} bytes of page hashes for {n} pages")
        sent = self._views[name]
        if now == sent[:]:
            return []
        bad = []
        mv_now, mv_sent = memoryview(now).cast("Q"), memoryview(sent).cast("Q")
        for i in range(n):
            if mv_now[i] != mv_sent[i]:
                bad.append(i)
                if len(bad) >= 1000:
                    break
        return bad
