"""Change capture: every committed write lands in change_log, once, with one notification."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest


class Notifications:
    """A real LISTEN connection on `pdp_changes`; the callback only queues."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str] = asyncio.Queue()

    def on_notify(self, conn: asyncpg.Connection, pid: int, channel: str, payload: str) -> None:
        self.queue.put_nowait(payload)

    async def expect_one(self) -> str:
        payload = await asyncio.wait_for(self.queue.get(), 5)
        await self.expect_none()
        return payload

    async def expect_none(self) -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(self.queue.get(), 0.3)


@pytest.fixture
async def notifications(db_url: str) -> AsyncIterator[Notifications]:
    conn = await asyncpg.connect(db_url)
    received = Notifications()
    await conn.add_listener("pdp_changes", received.on_notify)
    try:
        yield received
    finally:
        await conn.close()


async def _log(pg: asyncpg.Connection, since: int = 0) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pg.fetch(
        "SELECT id, txid::text::bigint AS txid, tenant_id, entity, op, key, old, new, actor, "
        "changed_at FROM pdp.change_log WHERE id > $1 ORDER BY id",
        since,
    )
    return rows


async def _last_id(pg: asyncpg.Connection) -> int:
    return int(await pg.fetchval("SELECT coalesce(max(id), 0) FROM pdp.change_log"))


def _json(value: str | None) -> Any:
    """A jsonb column as Python (asyncpg hands jsonb over as text)."""
    return None if value is None else json.loads(value)


async def test_insert_statement_logs_every_row_with_txid_actor_and_new(
    pg: asyncpg.Connection, notifications: Notifications
) -> None:
    async with pg.transaction():
        await pg.execute("SELECT set_config('pdp.actor', 'admin@example', true)")
        txid = await pg.fetchval("SELECT pg_current_xact_id()::text::bigint")
        await pg.execute("INSERT INTO pdp.tenants (id, name) VALUES ('t', 'T')")
        await pg.execute(
            "INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'u1'), ('t', 'u2'), ('t', 'u3')"
        )
    assert await notifications.expect_one() == ""
    rows = await _log(pg)
    assert [(r["entity"], r["op"]) for r in rows] == [("tenants", "insert")] + [
        ("users", "insert")
    ] * 3
    assert {r["txid"] for r in rows} == {txid}
    assert {r["actor"] for r in rows} == {"admin@example"}
    users = rows[1:]
    assert sorted(r["key"] for r in users) == [
        json.dumps({"id": f"u{i}", "tenant_id": "t"}) for i in (1, 2, 3)
    ]
    assert all(r["old"] is None for r in users)
    assert {_json(r["new"])["status"] for r in users} == {"active"}
    assert all(r["tenant_id"] == "t" and r["changed_at"] is not None for r in rows)


async def test_update_and_delete_log_old_and_new(
    pg: asyncpg.Connection, notifications: Notifications
) -> None:
    await pg.execute("INSERT INTO pdp.tenants (id) VALUES ('t'); "
                     "INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'u')")
    await notifications.expect_one()
    mark = await _last_id(pg)
    await pg.execute("UPDATE pdp.users SET status = 'disabled' WHERE id = 'u'")
    await notifications.expect_one()
    await pg.execute("DELETE FROM pdp.users WHERE id = 'u'")
    await notifications.expect_one()
    update, delete = await _log(pg, mark)
    assert update["op"] == "update"
    assert _json(update["old"])["status"] == "active"
    assert _json(update["new"])["status"] == "disabled"
    assert delete["op"] == "delete"
    assert delete["new"] is None
    assert _json(delete["key"]) == {"tenant_id": "t", "id": "u"}
    assert update["actor"] is None  # no pdp.actor set


async def test_update_of_a_primary_key_logs_both_keys(pg: asyncpg.Connection) -> None:
    await pg.execute(
        """INSERT INTO pdp.tenants (id) VALUES ('t');
           INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'u');
           INSERT INTO pdp.roles (tenant_id, id) VALUES ('t', 'r');
           INSERT INTO pdp.user_roles (tenant_id, user_id, role_id, scope) VALUES ('t','u','r','doc:1')"""
    )
    mark = await _last_id(pg)
    await pg.execute("UPDATE pdp.user_roles SET scope = 'doc:2'")
    rows = await _log(pg, mark)
    keys = sorted(_json(r["key"])["scope"] for r in rows)
    assert keys == ["doc:1", "doc:2"]
    by_scope = {_json(r["key"])["scope"]: r for r in rows}
    assert by_scope["doc:1"]["new"] is None
    assert by_scope["doc:1"]["old"] is not None
    assert by_scope["doc:2"]["old"] is None
    assert by_scope["doc:2"]["new"] is not None


async def test_cascaded_deletes_are_captured(pg: asyncpg.Connection) -> None:
    await pg.execute(
        """INSERT INTO pdp.tenants (id) VALUES ('t');
           INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'u');
           INSERT INTO pdp.groups (tenant_id, id) VALUES ('t', 'g');
           INSERT INTO pdp.group_members VALUES ('t', 'g', 'u');
           INSERT INTO pdp.roles (tenant_id, id) VALUES ('t', 'a'), ('t', 'b');
           INSERT INTO pdp.role_inherits VALUES ('t', 'a', 'b');
           INSERT INTO pdp.role_permissions VALUES ('t', 'b', 'doc:read');
           INSERT INTO pdp.user_roles (tenant_id, user_id, role_id) VALUES ('t', 'u', 'a');
           INSERT INTO pdp.group_roles (tenant_id, group_id, role_id) VALUES ('t', 'g', 'b');"""
    )
    mark = await _last_id(pg)
    await pg.execute("DELETE FROM pdp.tenants WHERE id = 't'")
    deleted = {(r["entity"], r["op"]) for r in await _log(pg, mark)}
    assert deleted == {
        (entity, "delete")
        for entity in ("tenants", "users", "groups", "group_members", "roles", "role_inherits",
                       "role_permissions", "user_roles", "group_roles")
    }


async def test_rollback_and_savepoints_leave_only_what_committed(
    pg: asyncpg.Connection, notifications: Notifications
) -> None:
    await pg.execute("INSERT INTO pdp.tenants (id) VALUES ('t')")
    await notifications.expect_one()
    mark = await _last_id(pg)

    tx = pg.transaction()
    await tx.start()
    await pg.execute("INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'gone')")
    await tx.rollback()
    await notifications.expect_none()
    assert await _log(pg, mark) == []

    async with pg.transaction():
        await pg.execute("INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'kept')")
        savepoint = pg.transaction()
        await savepoint.start()
        await pg.execute("INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'dropped')")
        await savepoint.rollback()
        await pg.execute(
            """DO $$ BEGIN
                 INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'also-dropped');
                 RAISE EXCEPTION 'undo';
               EXCEPTION WHEN raise_exception THEN NULL;
               END $$"""
        )
    await notifications.expect_one()
    rows = await _log(pg, mark)
    assert [_json(r["key"])["id"] for r in rows] == ["kept"]
    # The change row carries the top-level transaction id, not a subtransaction's.
    assert len({r["txid"] for r in rows}) == 1


async def test_one_notification_per_transaction_of_many_statements(
    pg: asyncpg.Connection, notifications: Notifications
) -> None:
    async with pg.transaction():
        await pg.execute("INSERT INTO pdp.tenants (id) VALUES ('t')")
        for i in range(20):
            await pg.execute("INSERT INTO pdp.users (tenant_id, id) VALUES ('t', $1)", f"u{i}")
        await pg.execute("UPDATE pdp.users SET status = 'disabled'")
        await pg.execute("DELETE FROM pdp.users WHERE id = 'u1'")
    await notifications.expect_one()
    assert len(await _log(pg)) == 1 + 20 + 20 + 1


async def test_statements_touching_no_row_log_and_notify_nothing(
    pg: asyncpg.Connection, notifications: Notifications
) -> None:
    await pg.execute("UPDATE pdp.users SET status = 'disabled' WHERE false")
    await pg.execute("DELETE FROM pdp.roles")
    await notifications.expect_none()
    assert await _log(pg) == []
    # The listener hears, and the log takes, the first statement that touches a row.
    await pg.execute("INSERT INTO pdp.tenants (id) VALUES ('t'); DELETE FROM pdp.roles")
    assert await notifications.expect_one() == ""
    assert [(r["entity"], r["op"]) for r in await _log(pg)] == [("tenants", "insert")]


async def test_truncate_writes_a_reset_marker(
    pg: asyncpg.Connection, notifications: Notifications
) -> None:
    await pg.execute("INSERT INTO pdp.tenants (id) VALUES ('t'); "
                     "INSERT INTO pdp.roles (tenant_id, id) VALUES ('t', 'r')")
    await notifications.expect_one()
    mark = await _last_id(pg)
    await pg.execute("TRUNCATE pdp.role_permissions, pdp.role_inherits, pdp.user_roles, "
                     "pdp.group_roles, pdp.roles")
    await notifications.expect_one()
    rows = await _log(pg, mark)
    assert {r["op"] for r in rows} == {"truncate"}
    assert {r["entity"] for r in rows} == {
        "role_permissions", "role_inherits", "user_roles", "group_roles", "roles"
    }
    assert all(r["key"] is None for r in rows)
    assert all(r["tenant_id"] is None for r in rows)


async def test_paused_capture_and_bulk_load_marker(
    pg: asyncpg.Connection, notifications: Notifications
) -> None:
    async with pg.transaction():
        await pg.execute("SET LOCAL pdp.capture = 'off'")
        await pg.execute("INSERT INTO pdp.tenants (id) VALUES ('t')")
        await pg.execute("INSERT INTO pdp.users (tenant_id, id) SELECT 't', 'u' || g "
                         "FROM generate_series(1, 100) g")
        await pg.execute("SELECT pdp.mark_bulk_load('t')")
    await notifications.expect_one()
    rows = await _log(pg)
    assert [(r["tenant_id"], r["entity"], r["op"]) for r in rows] == [
        ("t", "tenants", "bulk_load")
    ]
    # Capture resumes outside the loading transaction.
    await pg.execute("INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'after')")
    assert (await _log(pg, rows[0]["id"]))[0]["op"] == "insert"
