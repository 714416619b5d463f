"""The pre-copy round rule alone (precopy/policy.py): every branch, table-driven, no I/O.

Numbers: 4 KiB pages, a 100 MB/s link (one page takes ~41 µs), a 100 ms limit, so the pause
fits from about 2400 pages with a free final collect."""

import pytest

from migrator.precopy.policy import Action, Observation, RoundRules, Streaks, decide

BW = 100e6
RULES = RoundRules(limit_s=0.1, switchover="converge", max_rounds=30, nonconvergence_rounds=3)


def obs(n: int, prev: int = 10_000, **kw) -> Observation:
    return Observation(**{"round_no": 1, "dirty_pages": n, "prev_sent": prev, "bandwidth": BW,
                          "final_collect_s": 0.0, **kw})


@pytest.mark.parametrize("o,streaks,rules,action,after", [
    # 1. forced, or the last allowed round: switch over whatever the rest costs
    (obs(50_000, forced=True), Streaks(), RULES, Action.SWITCH_OVER, Streaks()),
    (obs(50_000, round_no=30), Streaks(2, 1), RULES, Action.SWITCH_OVER, Streaks(2, 1)),
    (obs(50_000, round_no=29), Streaks(), RULES, Action.SEND_ROUND, Streaks(1, 0)),
    # 2. it fits: "fits" switches over at once
    (obs(2000), Streaks(), RoundRules(0.1, "fits"), Action.SWITCH_OVER, Streaks()),
    # ... "converge" sends one more round while the guest wrote at most half of what was sent
    (obs(2000, prev=4000), Streaks(), RULES, Action.SEND_ROUND, Streaks(0, 0)),
    (obs(2001, prev=4000), Streaks(), RULES, Action.SWITCH_OVER, Streaks()),
    # ... or, with deltas, while the pages were last sent in round 0 (a round caches them):
    # the guest rewrote all it sent, and one more round still pays off; not with "fits"
    (obs(2000, prev=2000, uncached=True), Streaks(), RULES, Action.SEND_ROUND, Streaks(1, 0)),
    (obs(2000, prev=2000, uncached=True), Streaks(), RoundRules(0.1, "fits"), Action.SWITCH_OVER, Streaks()),
    (obs(20, prev=20, uncached=True), Streaks(), RULES, Action.SWITCH_OVER, Streaks()),
    # ... unless the transfer is trivial (<= 1 ms: 24 pages here)
    (obs(20, prev=1000), Streaks(), RULES, Action.SWITCH_OVER, Streaks()),
    # ... the final collect counts toward the pause: 2000 pages (82 ms) + 30 ms does not fit
    (obs(2000, prev=2100, final_collect_s=0.03), Streaks(), RULES, Action.SEND_ROUND, Streaks(1, 0)),
    # ... and so does the round's end: 2000 pages + 10 ms fits, + 20 ms does not
    (obs(2000, prev=2100, round_end_s=0.01), Streaks(), RULES, Action.SWITCH_OVER, Streaks()),
    (obs(2000, prev=2100, round_end_s=0.02), Streaks(), RULES, Action.SEND_ROUND, Streaks(1, 0)),
    # 3. the final collect alone over the limit with a sweep, 3 times in a row: give up
    (obs(100, prev=1000, final_collect_s=0.2, swept=True), Streaks(0, 2), RULES,
     Action.GIVE_UP_SWEEPS, Streaks(0, 3)),
    (obs(100, prev=1000, final_collect_s=0.2, swept=True), Streaks(0, 1), RULES,
     Action.SEND_ROUND, Streaks(0, 2)),
    # ... without a sweep the streak restarts (the cost was page tables: rounds can help)
    (obs(100, prev=1000, final_collect_s=0.2), Streaks(0, 2), RULES, Action.SEND_ROUND, Streaks(0, 0)),
    # 4. the dirty set did not shrink (>= 95 % of what was sent), 3 times in a row
    (obs(9500), Streaks(2, 0), RULES, Action.GIVE_UP_HOT, Streaks(3, 0)),
    (obs(9499), Streaks(2, 0), RULES, Action.SEND_ROUND, Streaks(0, 0)),
    (obs(9500), Streaks(1, 0), RULES, Action.SEND_ROUND, Streaks(2, 0)),
    # ... auto-converge throttles instead, and again after one more hot round
    (obs(9500), Streaks(2, 0), RoundRules(0.1, auto_converge=True), Action.THROTTLE_UP, Streaks(2, 0)),
    # ... at the maximum throttle, rounds go on
    (obs(9500, throttle_at_max=True), Streaks(2, 0), RoundRules(0.1, auto_converge=True),
     Action.SEND_ROUND, Streaks(3, 0)),
    # 5. shrinking but not fitting: another round
    (obs(5000), Streaks(), RULES, Action.SEND_ROUND, Streaks()),
])
def test_decide(o, streaks, rules, action, after):
    assert decide(o, streaks, rules) == (action, after)


def test_expected_pause_is_collect_plus_transfer_plus_round_end():
    o = obs(2441, final_collect_s=0.02, round_end_s=0.005)
    assert o.transfer_s == pytest.approx(2441 * 4096 / BW)
    assert o.expected_s == pytest.approx(0.02 + 2441 * 4096 / BW + 0.005)


@pytest.mark.parametrize("field,value,message", [
    ("downtime_limit_ms", 0, "downtime_limit_ms must be above 0 ms, not 0"),
    ("max_bandwidth", -1.0, "max_bandwidth must be above 0 bytes/s"),
    ("max_rounds", 0, "max_rounds must be at least 1, not 0"),
    ("channels", 0, "channels must be at least 1, not 0"),
    ("nonconvergence_rounds", 0, "nonconvergence_rounds must be at least 1"),
    ("min_round_s", -0.1, "min_round_s must not be negative"),
    ("tracker", "magic", "tracker 'magic': expected one of auto, wp, soft-dirty, hash"),
    ("switchover", "soon", "switch-over rule 'soon': expected one of converge, fits"),
    ("verify", "eyes", "verify 'eyes': expected one of hashes, memory"),
    ("compress", "gzip", "compress 'gzip': expected one of auto, zstd, lz4, none"),
])
def test_migration_policy_checks_itself(field, value, message):
    """A bad value is refused when the policy is made, naming the field; a policy is frozen."""
    import dataclasses

    from migrator.errors import UsageError
    from migrator.precopy.controller import MigrationPolicy
    with pytest.raises(UsageError) as e:
        MigrationPolicy(**{field: value})
    assert str(e.value).startswith(f"migration policy: {message}")
    p = MigrationPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.max_rounds = 3
    assert dataclasses.replace(p, max_rounds=3).max_rounds == 3


def test_channel_default_is_one_value_everywhere():
    """Two channels unless told otherwise (transport.DEFAULT_CHANNELS): the policy, a scenario's
    [policy] and what `migrate --help` says (its parser does not import the transport)."""
    import argparse

    from migrator.cli import migrate as migrate_cli
    from migrator.precopy.controller import MigrationPolicy
    from migrator.scenarios.spec import PolicySpec
    from migrator.transport import DEFAULT_CHANNELS

    assert DEFAULT_CHANNELS == 2
    assert MigrationPolicy().channels == PolicySpec().channels == DEFAULT_CHANNELS
    sub = argparse.ArgumentParser().add_subparsers()
    migrate_cli.register(sub)
    text = sub.choices["migrate"].format_help()
    assert f"(default {DEFAULT_CHANNELS}:" in " ".join(text.split())
