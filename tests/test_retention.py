"""Change-log retention: old rows go, running transactions' rows stay, the horizon is kept."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import asyncpg

from sync import pg_retention
from tests.sync_harness import current_xid, horizon_passed


async def _changes(pg: asyncpg.Connection) -> int:
    return int(await pg.fetchval("SELECT count(*) FROM pdp.change_log"))


async def test_nothing_younger_than_the_retention_is_removed(pg: asyncpg.Connection) -> None:
    await pg.execute("INSERT INTO pdp.tenants (id) VALUES ('a'), ('b')")
    result = await pg_retention.prune(pg, retention_seconds=3600)
    assert result == pg_retention.PruneResult(0, None)
    assert await _changes(pg) == 2
    assert await pg.fetchval("SELECT purged_max_xid FROM pdp.sync_meta") is None


async def test_prune_records_the_horizon_and_spares_running_transactions(
    pg: asyncpg.Connection, db_url: str
) -> None:
    async with pg.transaction():
        await pg.execute("INSERT INTO pdp.tenants (id) VALUES ('old')")
        old_xid = int(await pg.fetchval("SELECT pg_current_xact_id()::text::bigint"))
    await horizon_passed(pg, old_xid)
    running = await asyncpg.connect(db_url)
    try:
        await running.execute("BEGIN")
        await running.execute("INSERT INTO pdp.tenants (id) VALUES ('running')")
        # Committed after the running transaction began: newer than the oldest running one.
        await pg.execute("INSERT INTO pdp.tenants (id) VALUES ('newer')")
        result = await pg_retention.prune(pg, retention_seconds=0, batch_size=1)
        assert result.removed == 1
        assert result.horizon == old_xid
        await running.execute("COMMIT")
        await horizon_passed(pg, await current_xid(pg) - 1)
    finally:
        await running.close()
    left = {r[0] for r in await pg.fetch("SELECT tenant_id FROM pdp.change_log")}
    assert left == {"running", "newer"}
    assert await pg.fetchval("SELECT purged_max_xid::text::bigint FROM pdp.sync_meta") == old_xid
    # Once nothing runs, the rest goes too and the horizon only moves forward.
    again = await pg_retention.prune(pg, retention_seconds=0, batch_size=1)
    assert again.removed == 2
    assert again.horizon is not None
    assert again.horizon > old_xid
    assert await _changes(pg) == 0


async def test_prune_command_once(db_url: str, pg: asyncpg.Connection) -> None:
    await pg.execute("INSERT INTO pdp.tenants (id) VALUES ('a')")
    await horizon_passed(pg, await current_xid(pg) - 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    env |= {"PDP_DATABASE_URL": db_url, "PDP_CHANGE_RETENTION": "0s"}
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "pdp", "prune", "--once"], env=env,
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("removed=1 purge_horizon=")
    assert await _changes(pg) == 0
