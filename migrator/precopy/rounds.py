"""The live rounds of pre-copy: round 0 sends every populated page, each later round the pages
written since the previous collect; each round's end overlaps the collect of the next one's pages.
What the stages of one migration share is a Migration; one round is a LiveRound; the loop that
runs rounds until policy.decide says switch over (or give up) is run_rounds."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from ..errors import MigratorError
from ..kernel.maps import Region
from ..kernel.native import PAGE_SIZE
from ..tracking.base import ContentBaseline, DirtyPages, Tracker
from ..tracking.pageset import PageSet
from ..transport import SendStats
from ..transport.sender import Sender
from .background import Guard
from .pause import Throttle
from .policy import NONCONVERGENCE_RATIO, SHRINKING_RATIO, Action, Observation, RoundRules, Streaks, decide
from .report import MigrationReport, RoundStats
from .sent import SentHashes
from .source import SourceMemory

if TYPE_CHECKING:
    from .controller import MigrationPolicy

SAMPLE_STRIDE = 16       # a round's sample of sent data pages: every 16th ...
SAMPLE_PAGES = 4096      # ... up to this many (16 MiB hashed at most per check)
PAUSE_RATE_MIN_BYTES = 1 << 20   # a round this large measures the rate the pause's send gets


def page_runs(dirty: dict[str, PageSet]) -> dict[str, list[tuple[int, int]]]:
    """Each non-empty set as (first page, page count) runs, by region name."""
    return {name: list(s.runs()) for name, s in dirty.items() if s}


def count_pages(d: dict[str, PageSet]) -> int:
    return sum(len(s) for s in d.values())


@dataclass
class Migration:
    """One migration in progress: what its stages (the live rounds, the stop-and-copy) share, and
    the bookkeeping each round ends with."""

    rep: MigrationReport
    policy: MigrationPolicy
    tracker: Tracker
    baseline: ContentBaseline | None          # tracker.content_baseline(), asked once
    source: SourceMemory
    sender: Sender
    regions: list[Region]
    throttle: Throttle
    progress: Callable[[RoundStats], None] | None = None
    # what the destination holds, page by page (the digests come from it)
    sent_tables: SentHashes = field(init=False)

    def __post_init__(self) -> None:
        self.sent_tables = SentHashes({r.name: r.npages for r in self.regions})
        self.limit_s = self.policy.downtime_limit_ms / 1000
        self.total_bytes = sum(r.npages for r in self.regions) * PAGE_SIZE
        self.mark = self.rep.timeline.mark

    def on_packed(self, name: str, data_flat, zero_flat, hashes: bytes) -> None:
        """Pages the sender packed (from its producer threads): what the destination holds, and
        what the ledger compares with next (ContentBaseline.record_sent)."""
        self.sent_tables.record(name, data_flat, zero_flat, hashes)
        if self.baseline is not None:
            self.baseline.record_sent(name, data_flat, zero_flat, hashes)

    def on_reading(self, name: str, flat) -> None:
        """Pages the sender is about to read in a live round (from its producer threads): in
        flight for the ledger until on_packed reports them (ContentBaseline.mark_reading)."""
        if self.baseline is not None:
            self.baseline.mark_reading(name, flat)

    def switchover_bound_s(self) -> float:
        """The longest a switch-over now could take (s): the final collect, then every page of
        the regions sent at the bandwidth measured so far."""
        bandwidth = self.sender.statistics().bandwidth
        if bandwidth <= 0:
            return math.inf
        return self.tracker.final_collect_estimate_s() + self.total_bytes / bandwidth

    def account(self, round_no: int, dirtied: int, st: SendStats, tracker_s: float, dirty_rate: float,
                expected_ms: float, final: bool = False) -> RoundStats:
        """A round's line in the report (pages, bytes, ms), the totals, and the progress hook."""
        rep = self.rep
        rs = RoundStats(round=round_no, pages_dirtied=dirtied,
                        pages_sent=st.pages_normal + st.pages_zero, pages_zero=st.pages_zero,
                        bytes=st.bytes, duration_ms=st.duration * 1000, tracker_ms=tracker_s * 1000,
                        bandwidth_mbps=st.bytes * 8 / st.duration / 1e6 if st.duration > 0 else 0.0,
                        dirty_rate_pps=dirty_rate, expected_downtime_ms=expected_ms,
                        throttle_percent=self.throttle.percent, stop_and_copy=final,
                        cpu_ms=st.cpu * 1000)
        rep.per_round.append(rs)
        rep.rounds = len(rep.per_round)
        rep.transferred_bytes += st.bytes
        rep.pages_normal += st.pages_normal
        rep.pages_zero += st.pages_zero
        ss = self.sender.statistics()
        rep.compressed_batches = ss.compressed_batches
        rep.compressed_raw_bytes = ss.compressed_raw_bytes
        rep.compressed_wire_bytes = ss.compressed_wire_bytes
        rep.delta_batches = ss.delta_batches
        rep.delta_raw_bytes = ss.delta_raw_bytes
        rep.delta_wire_bytes = ss.delta_wire_bytes
        if self.progress:
            self.progress(rs)
        return rs

    def note(self, d: DirtyPages, round_no: int | str) -> None:
        """Fail on a tracked region that changed shape; record what else the tracker saw
        (mappers of shared memory found or gone) and each object the ledger swept, and why."""
        for e in d.events:
            if e.what.startswith("mapper-") or e.what == "pages-left-view":
                self.rep.events.append(f"round {round_no}: {e.region}: {e.what}: {e.detail}")
            if e.what == "unmapped":
                raise MigratorError(f"region {e.region} changed under the migration: {e.detail}")
        for s in d.sweeps:
            self.rep.sweeps.append({"round": round_no, "regions": list(s.regions), "bytes": s.nbytes,
                                    "reason": s.reason})


class SentPages:
    """The pages a round has packed (an on_packed hook, called from producer threads), for the
    pages a round cut short left, and a sample of its data pages (every SAMPLE_STRIDE-th, up to
    SAMPLE_PAGES a region) to see how much of what it sent is rewritten already."""

    def __init__(self, npages: dict[str, int], then: Callable | None = None):
        self._npages = npages
        self._then = then             # the hook this one wraps (Migration.on_packed)
        self._sent: dict[str, PageSet] = {}
        self._samples: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    def _add(self, into: dict[str, PageSet], name: str, *flats) -> None:
        s = into.get(name)
        if s is None:
            s = into[name] = PageSet(self._npages[name])
        for flat in flats:
            for i in range(0, len(flat), 2):
                s.add_range(flat[i], flat[i] + flat[i + 1])

    def packed(self, name: str, data_flat, zero_flat, hashes: bytes) -> None:
        if self._then is not None:
            self._then(name, data_flat, zero_flat, hashes)
        with self._lock:
            self._add(self._sent, name, data_flat, zero_flat)
            pages = self._samples.setdefault(name, [])
            for i in range(0, len(data_flat), 2):
                if len(pages) < SAMPLE_PAGES:
                    pages.extend(range(data_flat[i], data_flat[i] + data_flat[i + 1], SAMPLE_STRIDE))

    def sample(self) -> dict[str, list[int]]:
        with self._lock:
            return {k: list(v) for k, v in self._samples.items()}

    def left(self, planned: dict[str, PageSet], dropped: list) -> dict[str, PageSet]:
        """The planned pages not sent: never packed, or packed into batches that were dropped
        (SendStats.dropped: the ledger recorded them as sent; the final round forces them)."""
        gone: dict[str, PageSet] = {}
        for name, data_flat, zero_flat in dropped:
            self._add(gone, name, data_flat, zero_flat)
        out = {}
        for name, s in planned.items():
            done = self._sent.get(name)
            if done is not None and name in gone:
                done = done - gone[name]
            left = s - done if done is not None else s
            if left:
                out[name] = left
        return out


@dataclass
class RoundResult:
    stats: SendStats
    dirty: DirtyPages | None        # the pages collected for the next round; None: the collect
                                    # was skipped, switch over now
    collected_at: float             # time.monotonic() of that collect (or of the skip)
    unsent: dict[str, PageSet]      # the round was cut short: its pages not sent
    end_s: float | None = None      # its last page sent -> its end acknowledged (s); None: no
                                    # end marker (switching over now)


class LiveRound:
    """One live round: send `runs` and, overlapping its end, collect the pages for the next one.
    The collect starts lead_s into the send (or once every page is read and sent, if sooner,
    while the receiver's acknowledgement is still due), and not before policy.min_round_s after
    the previous collect (`since`).  A round may be cut short (see _cutter), and its collect
    skipped where it could not change the decision (see _skip_collect)."""

    def __init__(self, m: Migration, runs: dict[str, PageSet], round_no: int, lead_s: float, since: float,
                 cache: bool = False):
        self.m, self.runs, self.round_no, self.lead_s, self.since = m, runs, round_no, lead_s, since
        self.cache = cache      # keep copies of the pages sent for deltas (Sender.send_pages)
        self._rewritten = m.baseline.rewritten_fraction if m.baseline is not None else None
        self._cut = threading.Event() if can_cut(m, round_no) else None
        self._sent = SentPages({r.name: r.npages for r in m.regions}, m.on_packed)
        self._send_done = trio.Event()
        self._skip: bool | None = None
        self._dirty: DirtyPages | None = None
        self._at = 0.0

    async def run(self) -> RoundResult:
        m, round_no = self.m, self.round_no
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._collector)
            if self._cut is not None:
                nursery.start_soon(self._cutter)
            # what is sent is what the tracker compares with next (ContentBaseline.record_sent)
            hook = self._sent.packed if self._cut is not None else m.on_packed
            st = await m.sender.send_pages(page_runs(self.runs), m.source, round_no, hook, until=self._cut,
                                           cache=self.cache,
                                           on_reading=m.on_reading if m.baseline is not None else None)
            m.mark(f"round{round_no}-sent")
            sent_at, end_s = time.monotonic(), None
            self._send_done.set()
            # the digests brought up to date with this round (the switch-over's then hash only
            # the pages of its last rounds)
            nursery.start_soon(trio.to_thread.run_sync, m.sent_tables.refresh)
            # switching over now: the final round's end marker covers these pages too (but
            # deltas in the pause need the copies this round cached acknowledged: a round trip
            # before it)
            if not self._skip_collect() or self.cache:
                await m.sender.end_round(round_no)
                end_s = time.monotonic() - sent_at
                m.mark(f"round{round_no}-acked")
        cut = self._cut is not None and self._cut.is_set()
        unsent = self._sent.left(self.runs, st.dropped) if cut else {}
        return RoundResult(st, self._dirty, self._at, unsent, end_s)

    def _skip_collect(self) -> bool:
        """Decided once, when the collect would start or the send ended, if sooner: even if
        every page were written now, the switch-over would fit the limit, so this collect could
        not change the decision (the final collect finds the pages)."""
        if self._skip is None:
            m = self.m
            bound = m.switchover_bound_s()
            self._skip = bound <= m.limit_s or (self._cut is not None and self._cut.is_set())
            if self.round_no == 0 and m.sender.deltas and m.policy.switchover == "converge":
                # with deltas, round 0's collect decides whether a round caches the pages the
                # guest rewrites (the pause then sends them as deltas)
                self._skip = self._cut is not None and self._cut.is_set()
            if self._skip:
                self._dirty, self._at = None, time.monotonic()
                m.rep.expected_downtime_ms = bound * 1000
                m.mark(f"collect{self.round_no + 1}-skipped")
        return self._skip

    async def _collector(self) -> None:
        m = self.m
        with trio.move_on_after(self.lead_s):
            await self._send_done.wait()
        if self._skip_collect():
            return
        await trio.sleep_until(self.since + m.policy.min_round_s)
        m.mark(f"collect{self.round_no + 1}-start")
        self._dirty = await trio.to_thread.run_sync(m.tracker.collect)
        self._at = time.monotonic()
        m.mark(f"collect{self.round_no + 1}-done")

    async def _cutter(self) -> None:
        """Once the bandwidth is measured (policy.sample_s), end the round early if even every
        page of the regions would fit the limit (the rest goes in the stop-and-copy):
        - "fits": as soon as that bound fits (checked every 5 ms);
        - "converge": only if, besides, nearly all of a sample of the pages this round sent are
          rewritten already (checked every sample_s): the rest of the round would be sent again
          anyway, so going on could not shorten the pause, only the guest's time with the link
          and the CPU."""
        m, policy = self.m, self.m.policy
        start = time.monotonic()
        every = 0.005 if policy.switchover == "fits" else policy.sample_s
        with trio.move_on_after(policy.sample_s):
            await self._send_done.wait()
        while not self._send_done.is_set():
            bound = m.switchover_bound_s()
            why = await self._cut_reason() if bound <= m.limit_s else ""
            if why:
                self._cut.set()
                m.rep.expected_downtime_ms = bound * 1000
                m.mark(f"round{self.round_no}-cut")
                m.rep.events.append(f"round {self.round_no} cut after {(time.monotonic() - start) * 1000:.0f} ms "
                                    f"({why}); its pages not sent go in the stop-and-copy")
                return
            with trio.move_on_after(every):
                await self._send_done.wait()

    async def _cut_reason(self) -> str:
        """Why the round should end now that the rest fits the limit ("" if it should not)."""
        if self.m.policy.switchover == "fits":
            return "the rest fits the limit"
        sample = self._sent.sample()
        frac = await trio.to_thread.run_sync(self._rewritten, sample)
        n = sum(len(v) for v in sample.values())
        if frac is None or frac < NONCONVERGENCE_RATIO or self._send_done.is_set():
            return ""
        return f"{frac * 100:.0f} % of a sample of {n} pages it sent rewritten already"


def can_cut(m: Migration, round_no: int) -> bool:
    """Whether a live round may end before it sent all its pages (see LiveRound._cutter):
    "fits" cuts any round; "converge" only round 0, where the tracker can tell how much of what
    the round sent is rewritten already (no collect has measured the dirty rate yet), and not
    with deltas (the pages round 0 would leave to the pause, the next round caches, and the
    pause then sends as deltas)."""
    if m.policy.switchover == "fits":
        return True
    return round_no == 0 and m.baseline is not None and not m.sender.deltas


@dataclass
class SwitchOver:
    """Where the live rounds ended: the next round's number (the stop-and-copy's) and the
    pages it must send besides what the final collect finds."""

    round_no: int
    pending: dict[str, PageSet]


async def run_rounds(m: Migration, first: dict[str, PageSet], guard: Guard) -> SwitchOver | None:
    """Round 0 (`first`: every populated page), then rounds until the policy says switch over.
    None: gave up (the report says why, status not-converged).

    Where round 0 may be cut short, the receiver is told its plan first (PREPARE) and allocates
    those pages beside the stream, so the pages a cut leaves cost no allocation in the
    stop-and-copy.  Elsewhere every page of the plan arrives in a live round, whose write
    allocates it anyway: a second thread allocating beside the writes only contends with them
    for the image's lock (the receiver's CPU per GiB of round 0: 1.20 s with it, 1.04 without;
    docs/protocol.md)."""
    policy, rep = m.policy, m.rep
    if can_cut(m, 0):
        await m.sender.prepare(page_runs(first))
    t0 = time.monotonic()
    res = await LiveRound(m, first, 0, math.inf, t0 - policy.min_round_s).run()
    m.account(0, count_pages(first), res.stats, 0.0, 0.0, 0.0)
    elapsed, last_collect = res.collected_at - t0, res.collected_at
    rules = RoundRules(limit_s=m.limit_s, switchover=policy.switchover, max_rounds=policy.max_rounds,
                       nonconvergence_rounds=policy.nonconvergence_rounds,
                       auto_converge=policy.auto_converge)
    streaks = Streaks()
    prev_sent = count_pages(first)
    last_sent = first       # the pages the last round sent
    cached = False          # the last round kept copies of its pages for deltas
    round_no = 0
    # the stop-and-copy's end, as the live rounds' ends measured it (the least: a live round's
    # end may also wait for the receiver's disk, which the stop-and-copy's never does; round
    # 0's always does, so it is left out)
    round_end_s = math.inf
    while True:
        round_no += 1
        dirty = res.dirty
        if dirty is None:        # the collect was skipped: switch over now (see LiveRound)
            return SwitchOver(round_no, res.unsent)     # (a round cut short: its pages not sent)
        m.note(dirty, round_no)
        n = count_pages(dirty.pages)
        # with deltas, copies are kept of the pages of a round only if the guest rewrites what
        # it was sent: at least SHRINKING_RATIO of the last round's pages were written again
        # (a guest writing all over a large memory rarely writes a page twice: caching would
        # cost a copy, and a page fault, on each side for every page sent, for nothing)
        cache_next = m.sender.deltas and rewritten(dirty.pages, last_sent) >= SHRINKING_RATIO * prev_sent
        rep.dirty_pages_rate = n / max(elapsed, 1e-6)                # pages/s
        stats = m.sender.statistics()
        rep.bandwidth_bytes_per_s = bandwidth = max(stats.bandwidth, 1.0)
        # the pause will cost the final collect (its page-table scans, and a sweep of each
        # object this collect had to sweep), the transfer, at the slower of the whole
        # migration's rate and the last round's (a small round's is nearer the pause's), and
        # the round's end
        if cached and cache_next and stats.last_bandwidth > 0:
            # the last round sent the pages the guest rewrites as deltas against copies it
            # keeps (or cached them): the pause sends them as that round did
            bandwidth = stats.last_bandwidth
        elif res.stats.bytes >= PAUSE_RATE_MIN_BYTES and stats.last_bandwidth > 0:
            bandwidth = min(bandwidth, stats.last_bandwidth)
        obs = Observation(round_no=round_no, dirty_pages=n, prev_sent=prev_sent, bandwidth=bandwidth,
                          final_collect_s=m.tracker.final_collect_estimate_s(), swept=bool(dirty.sweeps),
                          round_end_s=0.0 if math.isinf(round_end_s) else round_end_s,
                          forced=policy.force_switchover is not None and policy.force_switchover.is_set(),
                          throttle_at_max=m.throttle.percent >= Throttle.MAX,
                          page_size=PAGE_SIZE, uncached=cache_next and not cached)
        rep.expected_downtime_ms = obs.expected_s * 1000
        rep.remaining_bytes = n * PAGE_SIZE
        action, streaks = decide(obs, streaks, rules)
        if action is Action.SWITCH_OVER:
            return SwitchOver(round_no, dirty.pages)
        if action in (Action.GIVE_UP_SWEEPS, Action.GIVE_UP_HOT):
            rep.status = "not-converged"
            rep.reason = _not_converging(action, obs, dirty, streaks, policy.downtime_limit_ms, rep.dirty_pages_rate)
            return None
        if action is Action.THROTTLE_UP:
            await guard.armed()
            m.throttle.step_up()
        lead = max(0.0, n * PAGE_SIZE / bandwidth - dirty.cost_s)
        cached = cache_next
        res = await LiveRound(m, dirty.pages, round_no, lead, last_collect, cache=cached).run()
        last_sent = dirty.pages
        if res.end_s is not None:
            round_end_s = min(round_end_s, res.end_s)
        m.account(round_no, n, res.stats, dirty.cost_s, rep.dirty_pages_rate, obs.expected_s * 1000)
        prev_sent = max(n, 1)
        elapsed, last_collect = res.collected_at - last_collect, res.collected_at


def rewritten(dirty: dict[str, PageSet], sent: dict[str, PageSet]) -> int:
    """Pages of dirty that are also in sent."""
    return sum(len(d) - len(d - sent[name]) for name, d in dirty.items() if name in sent)


def _not_converging(action: Action, obs: Observation, dirty: DirtyPages, streaks: Streaks,
                    limit_ms: float, dirty_rate: float) -> str:
    """The report's reason for giving up, with what the user can change."""
    if action is Action.GIVE_UP_SWEEPS:
        s = dirty.sweeps[-1]
        return (f"not converging: the final collect alone would take about "
                f"{obs.final_collect_s * 1000:.0f} ms, over the {limit_ms:.0f} ms "
                f"limit: the shmem ledger must sweep {', '.join(s.regions)} "
                f"({s.nbytes / 2**20:.0f} MiB) at every collect, because {s.reason}; raise "
                "--downtime-limit, or pause or stop what writes it by system calls; the guest "
                "keeps running")
    n = obs.dirty_pages
    return (f"not converging: for {streaks.hot} rounds the dirty set did not shrink "
            f"({n} pages, {n * PAGE_SIZE / 1e6:.1f} MB, dirtied at "
            f"{dirty_rate * PAGE_SIZE / 1e6:.1f} MB/s against {obs.bandwidth / 1e6:.1f} MB/s "
            f"of bandwidth): a switch-over now would pause the guest about "
            f"{obs.expected_s * 1000:.0f} ms, over the {limit_ms:.0f} ms limit; "
            "enable --auto-converge, raise --downtime-limit or --max-bandwidth; "
            "the guest keeps running")
