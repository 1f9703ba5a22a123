"""Load a `seed_data.Dataset` into the pdp schema with COPY (`pdp seed`).

Guarantees: all or nothing, in one transaction:
    SET LOCAL pdp.actor = 'pdp seed'
    [--replace: DELETE the dataset's tenants (captured like any write)]
    SET LOCAL pdp.capture = 'off'
    COPY each table, streaming the dataset's lazy iterators (bounded memory)
    SELECT pdp.mark_bulk_load(tenant) for each tenant
so the change log gets one `bulk_load` marker per tenant instead of a row per
loaded row, and running sidecars reload those tenants when the transaction commits.
An existing tenant without `replace`, or a database without the pdp schema, is a
`UserError` and nothing is written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg

from pdp.errors import UserError
from pdp.pg.schema import SCHEMA
from pdp.pg.seed_data import COLUMNS, TABLES, Dataset, Row

log = logging.getLogger(__name__)

ACTOR = "pdp seed"
SCHEMA_MISSING = "pdp schema not found: run `pdp migrate` first"


@dataclass(frozen=True, slots=True)
class TenantSummary:
    """Rows loaded for one tenant, per table in `TABLES` order."""

    tenant_id: str
    counts: tuple[tuple[str, int], ...]

    def line(self) -> str:
        """One line for stdout: `tenant-1: users=1000 groups=20 ...`."""
        return f"{self.tenant_id}: " + " ".join(
            f"{table}={count}" for table, count in self.counts if table != "tenants"
        )


async def load(url: str, dataset: Dataset, *, replace: bool = False) -> list[TenantSummary]:
    """Load `dataset` at `url` in one transaction; return what was loaded per tenant."""
    conn: asyncpg.Connection = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await _require_schema(conn)
            await conn.execute(f"SET LOCAL pdp.actor = '{ACTOR}'")
            await _clear(conn, dataset.tenant_ids, replace=replace)
            await conn.execute("SET LOCAL pdp.capture = 'off'")
            counts = await _copy(conn, dataset)
            for tenant_id in dataset.tenant_ids:
                await conn.execute("SELECT pdp.mark_bulk_load($1)", tenant_id)
    finally:
        await conn.close()
    return [
        TenantSummary(tenant_id, tuple((table, counts[tenant_id][table]) for table in TABLES))
        for tenant_id in dataset.tenant_ids
    ]


async def _require_schema(conn: asyncpg.Connection) -> None:
    present = await conn.fetchval(
        "SELECT to_regclass('pdp.tenants') IS NOT NULL"
        " AND to_regprocedure('pdp.mark_bulk_load(text)') IS NOT NULL"
    )
    if not present:
        raise UserError(SCHEMA_MISSING)


async def _clear(conn: asyncpg.Connection, tenant_ids: tuple[str, ...], *, replace: bool) -> None:
    existing: list[str] = [
        r["id"]
        for r in await conn.fetch(
            "SELECT id FROM pdp.tenants WHERE id = ANY($1::text[]) ORDER BY id", list(tenant_ids)
        )
    ]
    if not existing:
        return
    if not replace:
        more = f" and {len(existing) - 5} more" if len(existing) > 5 else ""
        shown = ", ".join(existing[:5]) + more
        raise UserError(f"tenant already exists: {shown} (use --replace to delete and reload it)")
    started = time.perf_counter()
    await conn.execute("DELETE FROM pdp.tenants WHERE id = ANY($1::text[])", existing)
    log.info("deleted %d existing tenant(s) in %.1fs", len(existing), time.perf_counter() - started)


async def _copy(conn: asyncpg.Connection, dataset: Dataset) -> dict[str, dict[str, int]]:
    # One COPY per table across all tenants, parents before children (foreign keys).
    # Each tenant's iterators are built once: they share that tenant's role plan.
    tables = {tenant_id: dataset.tables(tenant_id) for tenant_id in dataset.tenant_ids}
    counts: dict[str, dict[str, int]] = {tenant_id: {} for tenant_id in dataset.tenant_ids}
    for table in TABLES:
        started = time.perf_counter()
        records = (
            row
            for tenant_id, rows in tables.items()
            for row in _tally(rows[table], counts[tenant_id], table)
        )
        await conn.copy_records_to_table(
            table, schema_name=SCHEMA, columns=list(COLUMNS[table]), records=records
        )
        total = sum(c[table] for c in counts.values())
        log.info("copied %d rows into pdp.%s in %.2fs", total, table, time.perf_counter() - started)
    return counts


def _tally(rows: Iterator[Row], tally: dict[str, int], table: str) -> Iterator[Row]:
    """Yield `rows`, then record how many there were in `tally[table]`."""
    n = 0
    for row in rows:
        n += 1
        yield row
    tally[table] = n
