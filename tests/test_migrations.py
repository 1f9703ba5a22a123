"""Migrations: single head, upgrade -> downgrade -> upgrade, and metadata == database."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from pdp.pg import migrate
from pdp.pg.schema import SCHEMA, metadata


def test_single_head() -> None:
    assert len(migrate.heads(migrate.alembic_config("postgresql://"))) == 1


async def _objects(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        tables = await conn.fetchval(
            "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename <> 'alembic_version'",
            SCHEMA,
        )
        functions = await conn.fetchval(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = $1",
            SCHEMA,
        )
        triggers = await conn.fetchval(
            "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = $1 AND NOT t.tgisinternal",
            SCHEMA,
        )
        return {"tables": tables, "functions": functions, "triggers": triggers}
    finally:
        await conn.close()


async def test_upgrade_downgrade_upgrade(empty_db_url: str) -> None:
    await migrate.upgrade(empty_db_url)
    first = await _objects(empty_db_url)
    assert first["tables"] == len(metadata.tables)
    # 10 captured tables x 4 capture triggers + 2 cycle-guard triggers.
    assert first["triggers"] == 10 * 4 + 2
    await migrate.downgrade(empty_db_url, "base")
    assert await _objects(empty_db_url) == {"tables": 0, "functions": 0, "triggers": 0}
    await migrate.upgrade(empty_db_url)
    assert await _objects(empty_db_url) == first


def _diff(connection: Connection) -> list[object]:
    context = MigrationContext.configure(
        connection,
        opts={"include_schemas": True, "include_name": migrate.include_name},
    )
    return list(compare_metadata(context, metadata))


async def test_metadata_matches_migrated_database(db_url: str) -> None:
    """The SQLAlchemy metadata (the contract) and the migrations describe one schema."""
    engine = create_async_engine(db_url.replace("postgresql://", "postgresql+asyncpg://", 1))
    try:
        async with engine.connect() as connection:
            diff = await connection.run_sync(_diff)
    finally:
        await engine.dispose()
    assert diff == []


async def test_sync_meta_has_one_row_with_an_epoch(pg: asyncpg.Connection, empty_db_url: str) -> None:
    rows = await pg.fetch("SELECT epoch, purged_max_xid FROM pdp.sync_meta")
    assert len(rows) == 1
    assert isinstance(rows[0]["epoch"], uuid.UUID)
    assert rows[0]["purged_max_xid"] is None
    # Each migrated database draws its own epoch (this one was copied from the template).
    await migrate.upgrade(empty_db_url)
    other = await asyncpg.connect(empty_db_url)
    try:
        assert await other.fetchval("SELECT epoch FROM pdp.sync_meta") != rows[0]["epoch"]
    finally:
        await other.close()


def test_offline_sql_mentions_every_table(capsys: pytest.CaptureFixture[str]) -> None:
    migrate.upgrade_sql("postgresql://")
    out = capsys.readouterr().out
    for table in metadata.tables.values():
        assert f"CREATE TABLE {SCHEMA}.{table.name}" in out
    assert "CREATE FUNCTION pdp.check" in out


async def test_migrate_is_idempotent(db_url: str) -> None:
    await asyncio.wait_for(migrate.upgrade(db_url), 60)
    assert (await _objects(db_url))["tables"] == len(metadata.tables)


def test_engine_row_format_follows_the_schema() -> None:
    """The pure engine keeps its own copy of the key columns (it may not import the
    schema); it must name each table's primary key, in order, and real columns."""
    from pdp.engine import COLUMNS, KEY_WIDTH
    from pdp.pg.schema import DATA_TABLES, primary_key

    assert set(COLUMNS) == {t.name for t in DATA_TABLES}
    for table in DATA_TABLES:
        assert COLUMNS[table.name][: KEY_WIDTH[table.name]] == primary_key(table), table.name
        assert set(COLUMNS[table.name]) <= set(table.columns.keys()), table.name
