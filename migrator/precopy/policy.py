"""The pre-copy controller's round rule, pure: what the last collect showed in, a decision out.

After each live round the controller observes how many pages the guest wrote meanwhile, the
bandwidth, and what the final collect would cost, and decides: send another round, switch over
(pause and send the rest), throttle the guest one step (auto-converge), or give up (the guest
keeps running).  No I/O and no clock here, so every rule is tested alone (tests/test_policy.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

NONCONVERGENCE_RATIO = 0.95     # dirtied / previously sent at or above this: no progress
SHRINKING_RATIO = 0.5           # dirtied / previously sent at or below this: a round pays off
SHORT_TRANSFER_S = 0.001        # a final transfer this short is not worth another round


class Action(enum.Enum):
    SEND_ROUND = "send-round"           # another live round of the pages found
    SWITCH_OVER = "switch-over"         # pause the source, send the rest
    THROTTLE_UP = "throttle-up"         # auto-converge: slow the guest one step, then a round
    GIVE_UP_SWEEPS = "give-up-sweeps"   # the final collect alone overruns the limit
    GIVE_UP_HOT = "give-up-hot"         # the dirty set does not shrink (no auto-converge)


@dataclass(frozen=True)
class RoundRules:
    """The policy's part the rule reads (MigrationPolicy holds it for a migration)."""

    limit_s: float                  # the downtime limit (s)
    switchover: str = "converge"    # "converge": one more round where it shortens the pause;
                                    # "fits": as soon as the pause would fit (QEMU's rule)
    max_rounds: int = 30            # live rounds before a switch-over regardless
    nonconvergence_rounds: int = 3  # bad rounds in a row before throttling or giving up
    auto_converge: bool = False


@dataclass(frozen=True)
class Observation:
    """What the controller knows before round `round_no` (1 for the first after round 0)."""

    round_no: int
    dirty_pages: int          # pages the last collect found (the next round's, or the pause's)
    prev_sent: int            # pages the previous round sent (>= 1)
    bandwidth: float          # bytes/s, measured so far (> 0)
    final_collect_s: float    # what the final collect would cost (s): the tracker's estimate
    round_end_s: float = 0.0  # a round's end, measured: its last page sent -> acknowledged (s)
    swept: bool = False       # the last collect had to sweep an object (tracking/sweepgate.py)
    forced: bool = False      # a switch-over was requested (MigrationPolicy.force_switchover)
    throttle_at_max: bool = False
    page_size: int = 4096
    # with deltas: the last round kept no copies of its pages (round 0 never does; a later
    # round only when the guest rewrote as much as half of what was sent before): one more
    # round caches them, and the pause then sends what changed in them since (delta.py)
    uncached: bool = False

    @property
    def transfer_s(self) -> float:
        """Sending the dirty pages at the measured bandwidth (s)."""
        return self.dirty_pages * self.page_size / self.bandwidth

    @property
    def expected_s(self) -> float:
        """The pause a switch-over now would cost (s): the final collect, the transfer, then
        the stop-and-copy round's end (the receiver's acknowledgement)."""
        return self.final_collect_s + self.transfer_s + self.round_end_s


@dataclass(frozen=True)
class Streaks:
    """Bad rounds in a row, carried from one decision to the next."""

    hot: int = 0        # rounds whose dirty set did not shrink (NONCONVERGENCE_RATIO)
    sweeps: int = 0     # rounds whose final collect alone would overrun the limit


def decide(obs: Observation, streaks: Streaks, rules: RoundRules) -> tuple[Action, Streaks]:
    """The decision after a collect, and the streaks to pass to the next one.  In order:
    1. a forced switch-over, or max_rounds live rounds: switch over;
    2. the pause fits the limit: switch over, unless "converge" and one more round pays off
       (the transfer is not trivial, and the guest wrote at most SHRINKING_RATIO of what the
       last round sent, or the pages are uncached: a round caches them for deltas);
    3. the final collect alone overran the limit, with a sweep, nonconvergence_rounds times in
       a row: give up (no number of rounds or throttling can help);
    4. the dirty set did not shrink (>= NONCONVERGENCE_RATIO of what the last round sent)
       nonconvergence_rounds times in a row: throttle one step (auto-converge, below its
       maximum; then again after one more such round), or give up without auto-converge;
       at the maximum throttle, rounds go on;
    5. otherwise: another round."""
    if obs.forced or obs.round_no >= rules.max_rounds:
        return Action.SWITCH_OVER, streaks
    if obs.expected_s <= rules.limit_s:
        pays_off = (rules.switchover == "converge" and obs.transfer_s > SHORT_TRANSFER_S
                    and (obs.dirty_pages <= SHRINKING_RATIO * obs.prev_sent or obs.uncached))
        if not pays_off:
            return Action.SWITCH_OVER, streaks
    n = rules.nonconvergence_rounds
    sweeps = streaks.sweeps + 1 if obs.final_collect_s > rules.limit_s and obs.swept else 0
    if sweeps >= n:
        return Action.GIVE_UP_SWEEPS, Streaks(streaks.hot, sweeps)
    hot = streaks.hot + 1 if obs.dirty_pages >= NONCONVERGENCE_RATIO * obs.prev_sent else 0
    if hot >= n:
        if rules.auto_converge and not obs.throttle_at_max:
            return Action.THROTTLE_UP, Streaks(n - 1, sweeps)
        if not rules.auto_converge:
            return Action.GIVE_UP_HOT, Streaks(hot, sweeps)
    return Action.SEND_ROUND, Streaks(hot, sweeps)


__all__ = ["Action", "Observation", "RoundRules", "Streaks", "decide",
           "NONCONVERGENCE_RATIO", "SHRINKING_RATIO", "SHORT_TRANSFER_S"]
