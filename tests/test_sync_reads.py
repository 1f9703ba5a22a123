"""Which change-log rows a catch-up reads, and what it costs, against real PostgreSQL.

A catch-up from snapshot `prev` wants the rows of transactions visible now and not in
`prev`: those that started after it, and those in progress in it (its `xip`) that have
committed since. Both read paths (`read_fast`, one statement; `read`, transactional)
must find exactly those, while another transaction stays open across catch-ups; and
the statement PostgreSQL plans once for every cursor (a prepared statement's generic
plan) must go by the txid index, so a catch-up costs what it reads, not the length of
the retained log.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from pdp.engine import Snapshot
from sync import pg_queries as q
from sync import pg_read
from sync.options import SyncOptions
from sync.pg_read import Batch, Cursor

BASE = """
INSERT INTO pdp.tenants (id) VALUES ('t');
INSERT INTO pdp.roles (tenant_id, id) VALUES ('t', 'viewer');
"""


async def _snapshot(pg: asyncpg.Connection) -> Snapshot:
    return Snapshot.parse(await pg.fetchval("SELECT pg_current_snapshot()::text"))


async def _fast(pg: asyncpg.Connection, cursor: Cursor) -> Batch:
    batch = await pg_read.read_fast(pg, cursor, SyncOptions(), time.monotonic())
    assert batch is not None
    return batch


async def _transactional(pg: asyncpg.Connection, cursor: Cursor) -> Batch:
    # A tenant to reload makes the read take the transactional path (CHANGES).
    return await pg_read.read(
        pg, cursor, SyncOptions(), time.monotonic(), reload_tenants={"nobody"}
    )


Read = Callable[[asyncpg.Connection, Cursor], Awaitable[Batch]]


def _users(batch: Batch) -> set[str]:
    return {c.key[1] for c in batch.changes if c.entity == "users" and c.row is not None}


@pytest.mark.parametrize("read", [_fast, _transactional], ids=["fast", "transactional"])
async def test_a_transaction_open_across_catch_ups_is_read_once_it_commits(
    db_url: str, pg: asyncpg.Connection, read: Read
) -> None:
    await pg.execute(BASE)
    epoch = await pg.fetchval("SELECT epoch::text FROM pdp.sync_meta")
    slow = await asyncpg.connect(db_url)
    try:
        tx = slow.transaction()
        await tx.start()
        await slow.execute("INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'slow')")
        slow_xid = int(await slow.fetchval("SELECT pg_current_xact_id()::text::bigint"))
        # A later transaction completes: snapshots now list the slow one as in progress
        # (before, it was at or past their xmax).
        await pg.execute("INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'early')")
        first = await _snapshot(pg)
        assert slow_xid in first.xip
        await pg.execute("INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'quick')")
        batch = await read(pg, Cursor(first, epoch))
        assert _users(batch) == {"quick"}  # the open transaction's row is not visible yet
        assert slow_xid in batch.snapshot.xip
        await tx.commit()
        later = await read(pg, Cursor(batch.snapshot, epoch))
        assert _users(later) == {"slow"}  # found through the cursor's in-progress list
        assert _users(await read(pg, Cursor(later.snapshot, epoch))) == set()
    finally:
        await slow.close()


async def _generic_plan(pg: asyncpg.Connection, sql: str, cursor: Snapshot) -> str:
    """The plan PostgreSQL runs `sql` with once it plans without the parameters' values."""
    await pg.execute("SET plan_cache_mode = force_generic_plan")
    await pg.execute(f"PREPARE catchup(text, int) AS {sql}")
    rows = await pg.fetch(f"EXPLAIN (ANALYZE, COSTS OFF) EXECUTE catchup('{cursor}', 50001)")
    await pg.execute("DEALLOCATE catchup")
    return "\n".join(row[0] for row in rows)


@pytest.mark.parametrize("sql", [q.FAST_CATCHUP, q.CHANGES], ids=["fast", "transactional"])
async def test_the_generic_plan_reads_the_new_changes_only(
    db_url: str, pg: asyncpg.Connection, sql: str
) -> None:
    await pg.execute(BASE)
    # A long retained log (one transaction's 20,000 rows), and a transaction open
    # throughout, so the cursor's xmin stays before all of it.
    holder = await asyncpg.connect(db_url)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT pg_current_xact_id()")
        await pg.execute(
            "INSERT INTO pdp.users (tenant_id, id) "
            "SELECT 't', 'old-' || g FROM generate_series(1, 20000) g"
        )
        await pg.execute("ANALYZE pdp.change_log")
        cursor = await _snapshot(pg)
        await pg.execute("INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'new')")
        plan = await _generic_plan(pg, sql, cursor)
        await tx.rollback()
    finally:
        await holder.close()
    # Not the primary key walked in id order, nor the whole table: the txid index.
    assert "change_log_txid_idx" in plan, plan
    assert "change_log_pkey" not in plan, plan
    assert "Seq Scan on change_log" not in plan, plan
    assert "Rows Removed by Filter" not in plan.split("CTE Scan")[0], plan
