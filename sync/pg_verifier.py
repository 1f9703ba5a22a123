"""Consistency verifier: the engine's per-tenant digest against the same digest in SQL.

Both sides are taken at one snapshot: the sync worker exports the snapshot of a
catch-up transaction, this verifier imports it into its own REPEATABLE READ
transaction (`SET TRANSACTION SNAPSHOT`) before that catch-up commits, and the
worker reports the engine's digests right after applying that very snapshot.
The SQL digest then runs on the verifier's connection without holding up sync.
A tenant that differs is counted, flagged in `pdp_cache_consistent{tenant}` and
reloaded whole; a tenant that is gone from both sides loses its series.

`PgVerifier.lifespan` is a supervised worker: PostgreSQL trouble skips a round,
anything else crashes the worker (the supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg

from pdp.pg.errors import DRIVER_ERRORS
from pdp.supervisor import Body
from sync import pg_queries as q
from sync.metrics import ConsistencyReport, NullMetrics, VerifierMetrics
from sync.pg_sync import PgSync

log = logging.getLogger(__name__)

_EMPTY = "0000000000000000:0"


def _render(total: int, lines: int) -> str:
    return f"{int(total):016x}:{lines}"


# How far back the change log reaches (its lowest id is about its oldest row): past
# PDP_CHANGE_RETENTION by much, `pdp prune` is not running and the table only grows.
OLDEST_CHANGE = (
    "SELECT extract(epoch FROM now() - changed_at)::float8 FROM pdp.change_log ORDER BY id LIMIT 1"
)


class PgVerifier:
    """Periodically proves (or disproves and repairs) that the replica equals the database."""

    def __init__(
        self, url: str, sync: PgSync, metrics: VerifierMetrics | None, interval: float
    ) -> None:
        self._url = url
        self._sync = sync
        self._metrics = metrics or NullMetrics()
        self._interval = interval
        self._consistency = ConsistencyReport(self._metrics)

    async def verify_once(self) -> dict[str, bool]:
        """Compare every tenant once; returns {tenant: consistent}."""
        conn = await asyncpg.connect(self._url, server_settings={"application_name": "pdp-verify"})
        try:
            tx = conn.transaction(isolation="repeatable_read", readonly=True)
            await tx.start()

            async def attach(snapshot_id: str) -> None:
                await conn.execute(f"SET TRANSACTION SNAPSHOT '{snapshot_id}'")

            # Bounded: when sync cannot run (database down) there is nothing to verify.
            _snapshot, engine_digests = await asyncio.wait_for(self._sync.probe(attach), 30)
            tenants = {r[0] for r in await conn.fetch("SELECT id FROM pdp.tenants")}
            result: dict[str, bool] = {}
            for tenant in sorted(tenants | set(engine_digests)):
                total, lines = await conn.fetchrow(q.TENANT_DIGEST, tenant)
                expected = _render(total, lines)
                result[tenant] = engine_digests.get(tenant, _EMPTY) == expected
            oldest = await conn.fetchval(OLDEST_CHANGE)
            await tx.rollback()
        finally:
            await conn.close()
        self._report(result)
        self._metrics.set_change_log_age(0.0 if oldest is None else float(oldest))
        return result

    def _report(self, result: dict[str, bool]) -> None:
        self._consistency.report(result)
        for tenant, ok in result.items():
            if not ok:
                log.error("replica of tenant %s differs from the database; reloading it", tenant)
                self._sync.reload_tenant(tenant)

    async def run(self) -> None:
        """Verify every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.verify_once()
            except DRIVER_ERRORS as exc:
                log.warning("verification failed (%s: %s)", type(exc).__name__, exc)

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[Body]:
        yield self.run
