"""Change-log retention: prune old rows and record the purge horizon.

A row is removed only when it is older than the retention period AND its
transaction is older than every transaction still running (`txid` below the
current snapshot's xmin), so no sidecar can still be waiting to see it commit.
`sync_meta.purged_max_xid` records the highest removed txid; a sidecar whose
cursor is not past it reloads instead of missing changes.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import asyncpg

from pdp.pg.errors import DRIVER_ERRORS

log = logging.getLogger(__name__)

# One batch: delete up to $2 rows older than $1 seconds whose transactions ended
# before every running one, and advance the horizon in the same transaction.
PRUNE_BATCH = """
WITH doomed AS (
    SELECT id FROM pdp.change_log
    WHERE changed_at < now() - make_interval(secs => $1)
      AND txid < pg_snapshot_xmin(pg_current_snapshot())
    ORDER BY id
    LIMIT $2
), deleted AS (
    DELETE FROM pdp.change_log c USING doomed d WHERE c.id = d.id RETURNING c.txid
), horizon AS (
    UPDATE pdp.sync_meta
    SET purged_max_xid = greatest(purged_max_xid, (SELECT max(txid) FROM deleted)),
        purged_at = now()
    WHERE EXISTS (SELECT 1 FROM deleted)
    RETURNING purged_max_xid
)
SELECT (SELECT count(*) FROM deleted) AS removed,
       (SELECT purged_max_xid::text::bigint FROM horizon) AS horizon
"""


@dataclass(frozen=True, slots=True)
class PruneResult:
    removed: int
    horizon: int | None


async def prune(
    conn: asyncpg.Connection, retention_seconds: float, batch_size: int = 50_000
) -> PruneResult:
    """Prune in batches (short transactions, no long locks) until nothing is due."""
    removed, horizon = 0, None
    while True:
        async with conn.transaction():
            row = await conn.fetchrow(PRUNE_BATCH, retention_seconds, batch_size)
        assert row is not None
        removed += row["removed"]
        if row["horizon"] is not None:
            horizon = row["horizon"]
        if row["removed"] < batch_size:
            return PruneResult(removed, horizon)


async def prune_once(url: str, retention_seconds: float) -> PruneResult:
    conn = await asyncpg.connect(url, server_settings={"application_name": "pdp-retention"})
    try:
        return await prune(conn, retention_seconds)
    finally:
        await conn.close()


async def run_forever(url: str, retention_seconds: float, interval: float) -> None:
    """Prune every `interval` seconds until cancelled; survives database outages."""
    while True:
        try:
            result = await prune_once(url, retention_seconds)
            if result.removed:
                log.info(
                    "pruned %d change-log rows; purge horizon %s", result.removed, result.horizon
                )
        except DRIVER_ERRORS as exc:
            log.warning("retention run failed (%s: %s)", type(exc).__name__, exc)
        await asyncio.sleep(interval)
