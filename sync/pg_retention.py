"""Change-log retention: prune old rows and record the purge horizon; audit retention.

A row is removed only when it is older than the retention period AND its
transaction is older than every transaction still running (`txid` below the
current snapshot's xmin), so no sidecar can still be waiting to see it commit.
`sync_meta.purged_max_xid` records the highest removed txid; a sidecar whose
cursor is not past it reloads instead of missing changes.

Sync's window and the audit trail's are separate: a row leaves the change log by
moving into `pdp.audit_archive` in the same statement (never lost, never in both),
and leaves the archive only once it is older than the audit retention
(PDP_AUDIT_RETENTION, months or years). The audit surfaces read both tables.
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
    DELETE FROM pdp.change_log c USING doomed d WHERE c.id = d.id RETURNING c.*
), archived AS (
    INSERT INTO pdp.audit_archive
        (id, txid, tenant_id, entity, op, key, old, new, actor, changed_at)
    SELECT id, txid, tenant_id, entity, op, key, old, new, actor, changed_at FROM deleted
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

# One batch of audit retention: archive rows older than $1 seconds.
AUDIT_PRUNE_BATCH = """
WITH doomed AS (
    SELECT id FROM pdp.audit_archive
    WHERE changed_at < now() - make_interval(secs => $1)
    ORDER BY id
    LIMIT $2
), deleted AS (
    DELETE FROM pdp.audit_archive a USING doomed d WHERE a.id = d.id RETURNING a.id
)
SELECT count(*) FROM deleted
"""


@dataclass(frozen=True, slots=True)
class PruneResult:
    removed: int  # rows moved from the change log into the audit archive
    horizon: int | None
    audit_removed: int = 0  # archive rows past the audit retention, deleted


async def prune(
    conn: asyncpg.Connection,
    retention_seconds: float,
    batch_size: int = 50_000,
    audit_retention_seconds: float | None = None,
) -> PruneResult:
    """Prune in batches (short transactions, no long locks) until nothing is due.

    Change-log rows move into the audit archive; with `audit_retention_seconds`,
    archive rows older than that are then deleted (None: the archive is kept whole).
    """
    removed, horizon = 0, None
    while True:
        async with conn.transaction():
            row = await conn.fetchrow(PRUNE_BATCH, retention_seconds, batch_size)
        assert row is not None
        removed += row["removed"]
        if row["horizon"] is not None:
            horizon = row["horizon"]
        if row["removed"] < batch_size:
            break
    audit_removed = 0
    while audit_retention_seconds is not None:
        async with conn.transaction():
            count = int(await conn.fetchval(AUDIT_PRUNE_BATCH, audit_retention_seconds, batch_size))
        audit_removed += count
        if count < batch_size:
            break
    return PruneResult(removed, horizon, audit_removed)


async def prune_once(
    url: str, retention_seconds: float, audit_retention_seconds: float | None = None
) -> PruneResult:
    conn = await asyncpg.connect(url, server_settings={"application_name": "pdp-retention"})
    try:
        return await prune(conn, retention_seconds, audit_retention_seconds=audit_retention_seconds)
    finally:
        await conn.close()


async def run_forever(
    url: str,
    retention_seconds: float,
    interval: float,
    audit_retention_seconds: float | None = None,
) -> None:
    """Prune every `interval` seconds until cancelled; survives database outages."""
    while True:
        try:
            result = await prune_once(url, retention_seconds, audit_retention_seconds)
            if result.removed or result.audit_removed:
                log.info(
                    "moved %d change-log rows to the audit archive; purge horizon %s;"
                    " %d archive rows past the audit retention removed",
                    result.removed, result.horizon, result.audit_removed,
                )  # fmt: skip
        except DRIVER_ERRORS as exc:
            log.warning("retention run failed (%s: %s)", type(exc).__name__, exc)
        await asyncio.sleep(interval)
