"""Production paths against PostgreSQL itself: the SQL fallback and the keyed catch-up.

- `PgFallback` answers `pdp.check` in the database, for a revision memory cannot show
  in time; through the whole sidecar it answers what only the database knows.
- The transactional catch-up re-reads changed keys with `ROWS_BY_KEYS` (it runs when
  a verifier probe or a tenant reload meets concurrent writes); here every entity's
  keys are upserted, updated and deleted, and the batch must state each key's truth.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest
from pytest_aiohttp import AiohttpClient

from pdp.config import Settings
from pdp.engine import COLUMNS, Engine, RowChange, Snapshot
from pdp.errors import DependencyError
from pdp.sidecar import sidecar_app
from sync import pg_load, pg_read
from sync import pg_queries as q
from sync.options import SyncOptions
from sync.pg_fallback import PgFallback

BASE = """
INSERT INTO pdp.tenants (id) VALUES ('t'), ('u');
INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'alice'), ('t', 'bob'), ('t', 'carol');
INSERT INTO pdp.groups (tenant_id, id) VALUES ('t', 'eng'), ('t', 'ops');
INSERT INTO pdp.group_members VALUES ('t', 'eng', 'bob'), ('t', 'ops', 'carol');
INSERT INTO pdp.roles (tenant_id, id) VALUES ('t', 'viewer'), ('t', 'editor'), ('t', 'old');
INSERT INTO pdp.role_inherits VALUES ('t', 'editor', 'viewer');
INSERT INTO pdp.role_permissions VALUES ('t', 'viewer', 'doc:read'), ('t', 'editor', 'doc:write');
INSERT INTO pdp.user_roles (tenant_id, user_id, role_id, scope) VALUES ('t', 'alice', 'viewer', '*');
INSERT INTO pdp.group_roles (tenant_id, group_id, role_id, scope) VALUES ('t', 'eng', 'editor', 'doc:*');
INSERT INTO pdp.resources VALUES ('t', 'doc', '1', '{"owner": "alice"}');
"""

# One statement per entity that inserts, updates (in place, or moving a key) or
# deletes rows after the cursor.
CHANGES = """
UPDATE pdp.users SET status = 'disabled' WHERE tenant_id = 't' AND id = 'carol';
INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'dave');
INSERT INTO pdp.tenants (id) VALUES ('v');
DELETE FROM pdp.tenants WHERE id = 'u';
INSERT INTO pdp.groups (tenant_id, id) VALUES ('t', 'sec');
DELETE FROM pdp.group_members WHERE group_id = 'ops';
INSERT INTO pdp.group_members VALUES ('t', 'sec', 'dave');
DELETE FROM pdp.roles WHERE id = 'old';
INSERT INTO pdp.roles (tenant_id, id) VALUES ('t', 'admin');
DELETE FROM pdp.role_inherits;
INSERT INTO pdp.role_inherits VALUES ('t', 'admin', 'editor');
UPDATE pdp.role_permissions SET permission = 'doc:update' WHERE role_id = 'editor';
INSERT INTO pdp.role_permissions VALUES ('t', 'admin', '*:*');
UPDATE pdp.user_roles SET scope = 'doc:1', expires_at = '2030-01-01Z' WHERE user_id = 'alice';
INSERT INTO pdp.user_roles (tenant_id, user_id, role_id, scope) VALUES ('t', 'dave', 'admin', '*');
UPDATE pdp.group_roles SET expires_at = '2030-06-01Z';
INSERT INTO pdp.group_roles (tenant_id, group_id, role_id, scope) VALUES ('t', 'sec', 'viewer', '*');
UPDATE pdp.resources SET attributes = '{"owner": "bob"}';
INSERT INTO pdp.resources VALUES ('t', 'doc', '2');
UPDATE pdp.role_permissions SET condition = 'resource.properties.owner == subject.id' WHERE role_id = 'viewer';
UPDATE pdp.users SET attributes = '{"email": "bob@t"}' WHERE id = 'bob';
"""


async def _tables(conn: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {e: [tuple(r) for r in await conn.fetch(sql)] for e, sql in q.ALL_ROWS.items()}


async def test_keyed_catch_up_states_every_changed_key(pg: asyncpg.Connection) -> None:
    await pg.execute(BASE)
    before = Snapshot.parse(await pg.fetchval("SELECT pg_current_snapshot()::text"))
    tables = await _tables(pg)
    epoch = await pg.fetchval("SELECT epoch::text FROM pdp.sync_meta")
    await pg.execute(CHANGES)
    # A tenant to reload makes the read transactional: the changed keys of the other
    # tenants go through ROWS_BY_KEYS, one query per entity.
    batch = await pg_read.read(
        pg, pg_read.Cursor(before, epoch), SyncOptions(), time.monotonic(), reload_tenants={"nobody"}
    )
    assert batch.full is None
    assert set(batch.tenants) == {"nobody"}
    changed = {(c.entity, c.key) for c in batch.changes}
    assert {entity for entity, _ in changed} == set(COLUMNS)
    # Each change states the key's current row, or its absence.
    after = await _tables(pg)
    current = {
        (entity, RowChange.upsert(entity, row).key): row
        for entity, rows in after.items()
        for row in rows
    }
    for change in batch.changes:
        assert change.row == current.get((change.entity, change.key)), change
    assert any(c.row is None for c in batch.changes)  # deletes are stated as deletes
    # Applying them to an engine of the old state gives the engine of the new state.
    engine = Engine.build(tables, before)
    engine.apply(batch.changes, batch.snapshot)
    fresh = Engine.build(after, batch.snapshot)
    assert engine.tenants() == fresh.tenants() == ("t", "v")
    for tenant in fresh.tenants():
        assert engine.digest(tenant) == fresh.digest(tenant)


async def test_full_read_that_builds_holds_exactly_the_rows_read(
    pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pieces of 2 rows: every table with rows arrives in several pieces, while the
    # next piece is fetched.
    await pg.execute(BASE)
    await pg.execute(CHANGES)
    monkeypatch.setattr(pg_load, "CHUNK_ROWS", 2)
    first = pg_read.Cursor(None, None)
    built = await pg_read.read(pg, first, SyncOptions(), time.monotonic(), build=True)
    assert built.full is None
    assert built.engine is not None
    assert built.is_full
    assert built.reload_reason == "bootstrap"
    rows = await pg_read.read(pg, first, SyncOptions(), time.monotonic())
    assert rows.full is not None
    assert rows.engine is None
    fresh = Engine.build(rows.full, rows.snapshot)
    held = built.engine.tables()
    for entity, expected in fresh.tables().items():
        assert sorted(held[entity], key=repr) == sorted(expected, key=repr), entity
    assert built.engine.tenants() == fresh.tenants() == ("t", "v")
    for tenant in fresh.tenants():
        assert built.engine.digest(tenant) == fresh.digest(tenant)
    assert built.engine.counts() == fresh.counts()
    assert built.engine.counts()["group_members"] == 2
    on_demand = SyncOptions(on_demand=True)
    lean = await pg_read.read(pg, first, on_demand, time.monotonic(), build=True)
    assert lean.engine is not None
    counts = lean.engine.counts()
    assert counts["users"] == counts["group_members"] == counts["user_roles"] == 0
    assert counts["roles"] == fresh.counts()["roles"]


async def test_sql_fallback_answers_pdp_check(db_url: str, pg: asyncpg.Connection) -> None:
    await pg.execute(BASE)
    fallback = PgFallback(db_url)
    async with fallback.running():
        assert await fallback("t", "alice", "doc", "1", "read") is True
        assert await fallback("t", "alice", "doc", "1", "write") is False
        assert await fallback("t", "bob", "doc", "9", "write") is True  # through group eng
        assert await fallback("t", "nobody", "doc", "1", "read") is False
    with pytest.raises(DependencyError, match="not started"):
        await fallback("t", "alice", "doc", "1", "read")


async def test_sql_fallback_failure_is_a_dependency_error() -> None:
    # Nothing listens on port 1: the pool cannot connect.
    fallback = PgFallback("postgresql://postgres@127.0.0.1:1/none", timeout=1.0)
    async with fallback.running():
        with pytest.raises(DependencyError, match="consistent check in PostgreSQL failed"):
            await fallback("t", "alice", "doc", "1", "read")


async def test_sidecar_answers_an_unseen_revision_from_postgresql(
    db_url: str, pg: asyncpg.Connection, aiohttp_client: AiohttpClient
) -> None:
    await pg.execute(BASE)
    settings = Settings(consistency_wait_ms=50, verify_interval_seconds=3600)
    client = await aiohttp_client(sidecar_app(settings, db_url))
    async with asyncio.timeout(15):
        while (await client.get("/readyz")).status != 200:  # noqa: ASYNC110 -- behind HTTP
            await asyncio.sleep(0.05)
    # A grant only the database knows (capture paused: the sidecar never hears of it),
    # asked for with a revision memory will not reach in time.
    async with pg.transaction():
        await pg.execute("SET LOCAL pdp.capture = 'off'")
        await pg.execute("INSERT INTO pdp.user_roles (tenant_id, user_id, role_id) VALUES ('t', 'carol', 'editor')")
        xid = int(await pg.fetchval("SELECT pg_current_xact_id()::text::bigint"))
    body = {
        "subject": {"type": "user", "id": "carol", "properties": {"tenant": "t"}},
        "action": {"name": "write"},
        "resource": {"type": "doc", "id": "1"},
    }
    memory = await (await client.post("/access/v1/evaluation", json=body)).json()
    assert memory["decision"] is False
    future = str(xid + 1_000_000)  # never visible in the sidecar's snapshot
    response = await client.post("/access/v1/evaluation", json=body, headers={"X-PDP-Min-Revision": future})
    answer = await response.json()
    assert answer == {"decision": True, "context": {"reason": "consistent_fallback", "revision": "sql"}}
