"""Stop-and-copy: pause the source, send the pages still pending beside the final exact collect,
then what it found beyond them and a scanning send of the objects the ledger must sweep; verify
the digests with the receiver; optionally compare the paused source with what was sent
(--verify memory), and wait for the destination's commit (wait_durable).  On success the
source stays paused (QEMU's postmigrate)."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

import trio

from ..errors import CommitRefusedError, MigratorError
from ..tracking.base import DirtyPages
from ..transport import FinishResult, KnownPages, SendStats
from .background import Guard
from .rounds import Migration, SwitchOver, page_runs

PAUSE_SWITCH_S = 0.0002      # the GIL switch interval during the pause (Python's default: 5 ms)

if TYPE_CHECKING:
    from .controller import MigrationTarget, SourcePauser


def _no_send(round_no: int) -> SendStats:
    return SendStats(round_no, 0, 0, 0, 0, 0.0)


def _total(round_no: int, parts: tuple[SendStats, ...]) -> SendStats:
    return SendStats(round_no, sum(x.bytes for x in parts), sum(x.pages_normal for x in parts),
                     sum(x.pages_zero for x in parts), sum(x.batches for x in parts),
                     sum(x.duration for x in parts), cpu=sum(x.cpu for x in parts))


class StopAndCopy:
    """The switch-over of one migration, from where the live rounds left it (`at`)."""

    def __init__(self, m: Migration, at: SwitchOver, target: MigrationTarget, pauser: SourcePauser,
                 guard: Guard, unpaused_ok: set[int]):
        self.m, self.round_no, self.pending = m, at.round_no, at.pending
        self.target, self.pauser, self.guard = target, pauser, guard
        self._unpaused_ok = unpaused_ok      # the processes the pause stops (warn about others)

    async def run(self) -> None:
        """Pause, the final round, the checks; sets the report's status to completed, or raises
        MigratorError (the caller resumes the source unless rep.committing)."""
        m, policy = self.m, self.m.policy
        await self.guard.armed()
        if sum(len(s) for s in self.pending.values()) <= m.sender.batch_pages:
            # a small pause is one batch on one channel: the others close before it, while
            # the source runs, and the receiver's work on them stays out of the downtime
            await m.sender.close_secondaries(wait=True)
        with trio.CancelScope(shield=True):
            await m.throttle.stop()        # its last SIGCONT must come before our SIGSTOP
        t_pause = time.monotonic()
        m.mark("pause")
        # in the pause, threads hand the GIL on after PAUSE_SWITCH_S instead of Python's 5 ms:
        # the final collect's threads (walks, /proc scan, hole check) and the send's each hold
        # it for short stretches between C calls, and one waiting a whole interval for another
        # is downtime
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, PAUSE_SWITCH_S))
        try:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.pauser.pause)
            m.mark("paused")
            with trio.fail_after(policy.verify_timeout_s):
                # beside the final round: what the target does once paused (a QEMU source
                # starts its own migration, up to its device state)
                async with trio.open_nursery() as beside:
                    if self.target.after_pause is not None:
                        beside.start_soon(self.target.after_pause)
                    result = await self._final_round()
        except trio.TooSlowError:
            raise MigratorError(f"stop-and-copy did not finish within {policy.verify_timeout_s} s") from None
        finally:
            sys.setswitchinterval(switch)
        m.rep.downtime_ms = (time.monotonic() - t_pause) * 1000
        m.rep.remaining_bytes = 0
        if not result.complete:
            bad = [n for n, v in result.regions.items() if not v.verified]
            raise MigratorError(f"receiver could not verify region(s) {', '.join(bad)}: {result.message}")
        if policy.verify == "memory":
            await self._verify_memory()
        if self.target.wait_durable:
            await self._commit()
        m.rep.status = "completed"

    async def _final_round(self) -> FinishResult:
        """The source is paused: the final round's pages sent, the digests verified by the
        receiver (beside it, target.alongside_verify)."""
        m = self.m
        st = await self._send_final()
        digests = await self._digests_beside_round_end()
        # every page sent in this round is one the destination did not hold (each sent once)
        m.rep.final_dirty_pages = st.pages_normal + st.pages_zero
        m.account(self.round_no, m.rep.final_dirty_pages, st, self._final.cost_s, m.rep.dirty_pages_rate,
                  m.rep.expected_downtime_ms, final=True)
        t_verify = time.monotonic()
        m.mark("verify")
        if not self.target.wait_durable:
            # a destination that runs once verified (QEMU) may take over from END on: from here
            # a source resumed by the guardian could make two live copies
            self.guard.disarm()
        if self.target.alongside_verify is None:
            result = await m.sender.finish(digests, commit=self.target.wait_durable)
        else:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.target.alongside_verify)
                result = await m.sender.finish(digests, commit=self.target.wait_durable)
                m.mark("verify-result")
        m.mark("verified")
        m.rep.verify_ms = (time.monotonic() - t_verify) * 1000
        return result

    async def _send_final(self) -> SendStats:
        """The pages still pending (beside the final collect), then the pages it found beyond
        them, then a scanning send of the objects it did not sweep (unswept)."""
        m, round_no = self.m, self.round_no
        # Where the ledger's hashes are those of what the destination holds, a sweep the final
        # collect needs is done by the sender instead: it compares every page with them as it
        # sends, one pass over the memory, not a sweep and then a send.
        hashes = m.baseline.known_hashes() if m.baseline is not None else {}
        got: list[DirtyPages] = []
        # a target's own pauser (QEMU's stop) guarantees nothing writes its memory now: pages are
        # hashed where they lie and sent from there (no copy).  The default pauser stops the
        # processes it was given, and another holder may still write (the final collect finds
        # it, --verify memory shows what it wrote): pages are copied, and their copies hashed
        stable = self.target.pauser is not None

        async def collect_final() -> None:
            if m.baseline is not None and hashes:
                fusable = frozenset(hashes)
                got.append(await trio.to_thread.run_sync(
                    lambda: m.baseline.collect(final=True, defer=fusable)))
            else:
                got.append(await trio.to_thread.run_sync(lambda: m.tracker.collect(final=True)))
            m.mark("final-collect")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect_final)
            # the pages still pending from the last round go out at once (the source is paused,
            # so what is read now is final)
            st1 = await m.sender.send_pages(page_runs(self.pending), m.source, round_no, m.on_packed,
                                            stable=stable)
            m.mark("final-pending-sent")
            # the bulk is out: the few pages the collect finds beyond it go on channel 0, and
            # the other channels close now, beside the collect, not a round trip later (no-op
            # if they closed before the pause)
            await m.sender.close_secondaries()
        final = self._final = got[0]
        m.rep.final_collect_ms = {"total": round(final.cost_s * 1000, 2), **final.parts_ms}
        m.note(final, "final")
        self._warn_unpaused()
        extra = page_runs({name: (s - self.pending[name] if name in self.pending else s)
                           for name, s in final.pages.items()})
        # (nothing beyond the pending pages, as when the guest rewrites them all: no send to set
        # up and drain)
        st2 = await m.sender.send_pages(extra, m.source, round_no, m.on_packed, stable=stable) if extra \
            else _no_send(round_no)
        scanned = sorted(final.unswept)
        m.rep.final_scanned = scanned
        st3 = _no_send(round_no)
        if scanned:
            by_name = {r.name: r for r in m.regions}
            st3 = await m.sender.send_pages({n: [(0, by_name[n].npages)] for n in scanned}, m.source,
                                            round_no, m.on_packed,
                                            known={n: KnownPages(hashes[n], None, stable=True) for n in scanned})
            m.mark("final-scanned")
        m.mark("final-sent")
        return _total(round_no, (st1, st2, st3))

    def _warn_unpaused(self) -> None:
        """Processes that map the migrated shared memory but were not paused (only where the
        default pauser stops the processes it was given)."""
        if self.target.pauser is not None:
            return
        for pid in sorted(self.m.tracker.writer_pids() - self._unpaused_ok):
            self.m.rep.events.append(f"warning: process {pid} maps the migrated shared memory and was "
                                     "not paused: writes it makes after the final collect are not in "
                                     "the copy (give it to --writers)")

    async def _digests_beside_round_end(self) -> dict[str, str]:
        """The digests, from what was sent (8 bytes a page hashed, no memory read), while the
        receiver acknowledges the round."""
        m = self.m
        digests: dict[str, str] = {}

        async def digest_all() -> None:
            for r in m.regions:
                digests[r.name] = await trio.to_thread.run_sync(m.sent_tables.digest, r.name)
            m.mark("digests")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(digest_all)
            await m.sender.end_round(self.round_no, final=True)
            m.mark("final-acked")
        return digests

    async def _verify_memory(self) -> None:
        """--verify memory: the source is still paused (it stays so on success): its memory read
        once more and compared with what was sent, apart from the downtime."""
        m = self.m
        t = time.monotonic()
        m.mark("verify-memory")
        differ = {}
        for r in m.regions:
            now = await trio.to_thread.run_sync(m.source.page_hashes, r.name)
            bad = m.sent_tables.compare(r.name, now)
            if bad:
                differ[r.name] = bad
        m.rep.verify_memory_ms = (time.monotonic() - t) * 1000
        m.mark("verified-memory")
        if differ:
            what = "; ".join(f"{n}: {len(b)}{'+' if len(b) >= 1000 else ''} pages (e.g. "
                             f"{', '.join(map(str, b[:8]))})" for n, b in differ.items())
            raise MigratorError(f"--verify memory: the paused source differs from what was sent in {what}: "
                                "writes the trackers missed")

    async def _commit(self) -> None:
        """After the downtime: the destination fsyncs its images and says so; then we commit
        (its manifest says complete only then).  From the commit on, the source never resumes:
        if sending it fails, whether the destination got it is unknown, and a resumed source
        beside a complete destination would be two live copies."""
        m, rep = self.m, self.m.rep
        t = time.monotonic()
        m.mark("durable")
        await m.sender.wait_synced(m.policy.verify_timeout_s)
        rep.durable_ms = (time.monotonic() - t) * 1000
        rep.committing = True
        self.guard.disarm()               # (before the COMMIT: see the guardian's docstring)
        try:
            await m.sender.commit()
        except MigratorError as e:
            raise MigratorError(f"the commit may not have reached the receiver ({e}): the source stays "
                                f"paused; check the destination's manifest.json before resuming it") from None
        # the receiver's manifest says complete once it answers: when migrate returns, the
        # destination can be used (not a race against the COMMIT still in flight)
        try:
            await m.sender.wait_committed(m.policy.verify_timeout_s)
        except CommitRefusedError as e:
            # it says its manifest does not say complete: the destination is not usable, and the
            # source resumes (the guardian stays disarmed: a kill -9 now leaves it paused)
            rep.committing = False
            raise MigratorError(f"the receiver could not record the commit ({e}): the source "
                                f"resumes") from None
        except MigratorError as e:
            raise MigratorError(f"committed, but the receiver did not confirm its manifest ({e}): the "
                                f"source stays paused; check the destination's manifest.json") from None
        rep.durable_ms = (time.monotonic() - t) * 1000
        m.mark("committed")
