"""How the catch-up loop paces itself under commits, against real PostgreSQL.

- Bounded work: catch-ups start at least `min_interval` apart, so a burst of N commits
  makes a handful of catch-ups, not N.
- Nothing is lost between catch-ups: a commit whose doorbell rings while a catch-up
  runs (after its read, before it applied) gets a catch-up of its own right after,
  with no further ring and long before the poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from pdp.replica import Replica
from sync import pg_read
from sync.options import SyncOptions
from sync.service import SyncService
from tests.sync_harness import current_xid
from tests.waiting import until

BASE = "INSERT INTO pdp.tenants (id) VALUES ('t')"
POLL = 60.0  # so every catch-up below is a doorbell's


@contextlib.asynccontextmanager
async def syncing(url: str, options: SyncOptions) -> AsyncIterator[SyncService]:
    service = SyncService(url, Replica(), options=options)
    async with service.lifespan() as body:
        task = asyncio.create_task(body())
        try:
            yield service
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_a_burst_of_commits_makes_few_catch_ups(
    db_url: str, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    await pg.execute(BASE)
    interval = 0.1
    reads: list[float] = []
    read_fast = pg_read.read_fast

    async def timed(*args: Any) -> pg_read.Batch | None:
        reads.append(time.monotonic())
        return await read_fast(*args)

    monkeypatch.setattr(pg_read, "read_fast", timed)
    options = SyncOptions(poll_interval=POLL, min_interval=interval)
    async with syncing(db_url, options) as service:
        replica = service.sync.replica
        assert await replica.wait_for_revision(await current_xid(pg), 10)
        before, started = service.sync.catchups, time.monotonic()
        # 200 transactions in one round trip: 200 commits, 200 notifications (not
        # waiting for WAL flushes, which on a busy disk would spread them out).
        burst = 200
        await pg.execute(
            "SET synchronous_commit = off;"
            + "".join(
                f"BEGIN; INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'u{i}'); COMMIT;"
                for i in range(burst)
            )
        )
        assert await replica.wait_for_revision(await current_xid(pg), 10)
        catchups, elapsed = service.sync.catchups - before, time.monotonic() - started
    engine = replica.engine
    assert engine is not None
    last = engine.check("t", f"u{burst - 1}", "doc", "1", "read", time.time())
    assert last.reason != "unknown_user"
    assert catchups <= elapsed / interval + 2
    assert catchups < burst / 10
    assert len(reads) >= 2
    gaps = [b - a for a, b in itertools.pairwise(reads)]
    assert min(gaps) >= interval - 0.02, gaps  # starts min_interval apart


async def test_a_ring_during_a_catch_up_gets_the_next_one_at_once(
    db_url: str, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    await pg.execute(BASE)
    writer = await asyncpg.connect(db_url)
    armed: list[Replica] = []  # the replica, once the test wants the commit
    rang_during: list[int] = []
    read_fast = pg_read.read_fast

    async def commit_after_reading(*args: Any) -> pg_read.Batch | None:
        batch = await read_fast(*args)
        if armed and not rang_during:
            # Committed after this read's snapshot: this catch-up cannot see it; its
            # notification rings while the catch-up has not finished.
            async with writer.transaction():
                xid = await writer.fetchval("SELECT pg_current_xact_id()::text::bigint")
                await writer.execute("INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'late')")
            rang_during.append(int(xid))
            await until(armed[0].wake.is_set, 10, "the commit's notification rang")
        return batch

    monkeypatch.setattr(pg_read, "read_fast", commit_after_reading)
    try:
        async with syncing(db_url, SyncOptions(poll_interval=POLL)) as service:
            replica = service.sync.replica
            assert await replica.wait_for_revision(await current_xid(pg), 10)
            armed.append(replica)
            await pg.execute("INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'first')")
            await until(lambda: bool(rang_during), 10, "a catch-up read and then a commit")
            # No ring after the one during the catch-up, and the poll is a minute away.
            assert await replica.wait_for_revision(rang_during[0], 10)
    finally:
        await writer.close()
