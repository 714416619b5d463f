"""The sample project's own migration checks: its cache server, busy rewriting values, moves to
another host within 300 ms of downtime, and its memory arrives byte for byte (the fixture's
default verification reads the paused source again and compares)."""

import pytest

import migrator


def test_kvcache_migrates_within_its_downtime_budget(migration, kvcache):
    rep = migration.run(pid=kvcache.pid, regions=["kind:anon"], downtime_limit_ms=300)
    assert rep.status == "completed", rep.reason
    assert rep.downtime_ms < 300
    assert migration.manifest()["complete"]
    assert kvcache.get(7)[:8] == (7).to_bytes(8, "little")     # resumed, and still serving


@pytest.mark.trio
async def test_kvcache_migrates_from_an_async_test(migration, kvcache):
    rep = await migration.run_async(pid=kvcache.pid, regions=["kind:anon"],
                                    policy=migrator.MigrationPolicy(downtime_limit_ms=300))
    assert rep.status == "completed", rep.reason
    assert rep.verify_memory_ms > 0          # the destination was compared with the source
