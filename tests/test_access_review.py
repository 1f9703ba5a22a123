"""Access review: equals the engine on every (user, permission) pair; the past is rebuilt exactly."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from pdp.admin import access_review, token_store
from pdp.admin.app import build_admin_app
from pdp.admin.store import AdminStore, create_pool
from pdp.engine import Engine
from pdp.errors import RequestError
from pdp.pg.seed_data import ACTIONS, RESOURCE_TYPES
from sync import pg_retention
from tests.sync_harness import TENANT, current_xid, horizon_passed, running, seed, settle

Client = TestClient[Any, Any]
Row = tuple[Any, ...]


async def _review(url: str, at: datetime, *, past: bool, since: datetime | None = None) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction(isolation="repeatable_read"):
            return [r async for r in access_review.rows(conn, TENANT, at, past=past, since=since)]
    finally:
        await conn.close()


def _matches(pattern: str, value: str) -> bool:
    return pattern in ("*", value)


def _grants(row: dict[str, Any], rtype: str, rid: str, action: str) -> bool:
    ptype, _, paction = row["permission"].partition(":")
    scope = row["scope"]
    covers = scope in ("*", f"{rtype}:*", f"{rtype}:{rid}")
    return covers and _matches(ptype, rtype) and _matches(paction, action)


def _norm(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """JSON rows with expires_at as an instant (its text form may differ, not its value)."""
    return [{**r, "expires_at": r["expires_at"] and datetime.fromisoformat(r["expires_at"])} for r in rows]


def _key(row: dict[str, Any]) -> Row:
    return tuple(row[c] for c in access_review.COLUMNS)


async def test_access_review_equals_the_engine_on_every_user_and_permission(db_url: str, pg: asyncpg.Connection) -> None:
    await seed(db_url, users=150)
    at: datetime = await pg.fetchval("SELECT now()")
    rows = await _review(db_url, at, past=False)
    assert rows
    assert all(list(r) == list(access_review.COLUMNS) for r in rows)
    assert all(r["condition"] is None for r in rows)
    by_user: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_user.setdefault(row["user_id"], []).append(row)
        assert row["path"].split(">")[0] == row["role"]
    users = [r[0] for r in await pg.fetch("SELECT id FROM pdp.users WHERE tenant_id = $1", TENANT)]
    scoped = {r[0] for r in await pg.fetch("SELECT scope FROM pdp.user_roles WHERE tenant_id = $1 UNION SELECT scope FROM pdp.group_roles WHERE tenant_id = $1", TENANT)}
    ids = {s.split(":", 1)[1] for s in scoped if ":" in s and not s.endswith(":*")} | {"never-named"}
    async with running(db_url) as sidecar:
        await settle(pg, sidecar.replica)
        engine = sidecar.replica.engine
        assert isinstance(engine, Engine)
        compared = allowed = 0
        for user in users:
            mine = by_user.get(user, [])
            for rtype in RESOURCE_TYPES:
                for action in ACTIONS:
                    for rid in ids:
                        decision = engine.check(TENANT, user, rtype, rid, action, at.timestamp())
                        paths = [r for r in mine if _grants(r, rtype, rid, action)]
                        assert decision.allowed == bool(paths), (user, rtype, rid, action, decision)
                        compared += 1
                        if decision.allowed:
                            allowed += 1
                            # The engine's explanation is one of the listed grant paths.
                            assert (decision.role, ">".join(decision.path), decision.via_group, decision.scope) in {
                                (r["role"], r["path"], r["via_group"], r["scope"]) for r in paths
                            }
    assert compared > 10_000
    assert 0 < allowed < compared  # both answers occur: the comparison can fail


async def _change_a_lot(pg: asyncpg.Connection) -> None:
    """Every kind of change after the moment under review, through plain SQL."""
    t = TENANT
    users = [r[0] for r in await pg.fetch("SELECT id FROM pdp.users WHERE tenant_id = $1 ORDER BY id LIMIT 6", t)]
    roles = [r[0] for r in await pg.fetch("SELECT id FROM pdp.roles WHERE tenant_id = $1 ORDER BY id", t)]
    group = await pg.fetchval("SELECT id FROM pdp.groups WHERE tenant_id = $1 ORDER BY id LIMIT 1", t)
    await pg.execute("DELETE FROM pdp.users WHERE tenant_id = $1 AND id = $2", t, users[0])
    await pg.execute("UPDATE pdp.users SET status = 'disabled' WHERE tenant_id = $1 AND id = $2", t, users[1])
    await pg.execute("INSERT INTO pdp.users (tenant_id, id) VALUES ($1, 'newcomer')", t)
    await pg.execute("INSERT INTO pdp.user_roles (tenant_id, user_id, role_id, scope) VALUES ($1, 'newcomer', $2, '*')", t, roles[-1])
    await pg.execute("INSERT INTO pdp.user_roles (tenant_id, user_id, role_id, scope) VALUES ($1, $2, $3, 'document:q3') ON CONFLICT DO NOTHING", t, users[2], roles[0])
    await pg.execute("DELETE FROM pdp.group_members WHERE tenant_id = $1 AND user_id = $2", t, users[3])
    await pg.execute("INSERT INTO pdp.group_members (tenant_id, group_id, user_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING", t, group, users[4])
    await pg.execute("DELETE FROM pdp.role_permissions WHERE ctid = (SELECT ctid FROM pdp.role_permissions WHERE tenant_id = $1 ORDER BY role_id, permission LIMIT 1)", t)
    await pg.execute("INSERT INTO pdp.role_permissions (tenant_id, role_id, permission) VALUES ($1, $2, 'report:approve') ON CONFLICT DO NOTHING", t, roles[1])
    await pg.execute("DELETE FROM pdp.role_inherits WHERE ctid = (SELECT ctid FROM pdp.role_inherits WHERE tenant_id = $1 ORDER BY role_id LIMIT 1)", t)
    await pg.execute("UPDATE pdp.group_roles SET expires_at = now() - interval '1 day' WHERE ctid = (SELECT ctid FROM pdp.group_roles WHERE tenant_id = $1 ORDER BY group_id LIMIT 1)", t)
    # A key that changes (the update logs the old key and the new one).
    await pg.execute("UPDATE pdp.user_roles SET scope = 'folder:moved' WHERE ctid = (SELECT ctid FROM pdp.user_roles WHERE tenant_id = $1 AND user_id = $2 LIMIT 1)", t, users[5])
    await pg.execute("DELETE FROM pdp.roles WHERE tenant_id = $1 AND id = $2", t, roles[2])


async def test_a_past_state_is_rebuilt_after_later_changes_and_diffed(db_url: str, pg: asyncpg.Connection) -> None:
    await seed(db_url, users=120)
    then: datetime = await pg.fetchval("SELECT now()")
    before = await _review(db_url, then, past=False)
    await _change_a_lot(pg)
    # Half the later history already moved to the archive: both are replayed.
    await horizon_passed(pg, await current_xid(pg) - 1)
    await pg_retention.prune(pg, retention_seconds=0)
    await pg.execute("INSERT INTO pdp.users (tenant_id, id) VALUES ($1, 'late')", TENANT)
    await pg.execute("INSERT INTO pdp.user_roles (tenant_id, user_id, role_id, scope) SELECT $1, 'late', id, '*' FROM pdp.roles WHERE tenant_id = $1 LIMIT 1", TENANT)
    now: datetime = await pg.fetchval("SELECT now()")
    after = await _review(db_url, now, past=False)
    assert {_key(r) for r in after} != {_key(r) for r in before}  # the changes changed access
    rebuilt = await _review(db_url, then, past=True)
    assert rebuilt == before
    diff = await _review(db_url, now, past=False, since=then)
    gained = {_key(r) for r in diff if r["change"] == "gained"}
    lost = {_key(r) for r in diff if r["change"] == "lost"}
    assert gained == {_key(r) for r in after} - {_key(r) for r in before}
    assert lost == {_key(r) for r in before} - {_key(r) for r in after}
    assert any(r["user_id"] == "late" for r in diff if r["change"] == "gained")


async def test_history_too_short_is_refused(db_url: str, pg: asyncpg.Connection) -> None:
    await seed(db_url, users=20)
    oldest: datetime = await pg.fetchval("SELECT min(changed_at) FROM pdp.change_log")
    with pytest.raises(RequestError, match="audit history kept starts at"):
        await _review(db_url, oldest - timedelta(seconds=1), past=True)
    between: datetime = await pg.fetchval("SELECT now()")
    await pg.execute("SELECT pdp.mark_bulk_load($1)", TENANT)  # what a seed with capture off ends with
    with pytest.raises(RequestError, match="bulk-loaded"):
        await _review(db_url, between, past=True)


@pytest.fixture
async def admin(db_url: str, pg: asyncpg.Connection) -> AsyncIterator[Client]:
    pool = await create_pool(db_url)
    client = TestClient(TestServer(build_admin_app(AdminStore(pool))))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()
        await pool.close()


async def test_access_review_endpoint_and_command(admin: Client, db_url: str, pg: asyncpg.Connection) -> None:
    await seed(db_url, users=40)
    await pg.execute("INSERT INTO pdp.tenants (id) VALUES ('other')")
    made = await token_store.create(pg, "auditor", ("read",), TENANT)
    h = {"Authorization": f"Bearer {made.text}", "X-Request-ID": "rev-1"}
    base = f"/admin/v1/tenants/{TENANT}/access-review"
    resp = await admin.get(base, headers=h)
    assert resp.status == 200
    assert resp.headers["X-Request-ID"] == "rev-1"
    listed = await resp.json()
    now: datetime = await pg.fetchval("SELECT now()")
    expected = [access_review.json_value(r) for r in await _review(db_url, now, past=False)]
    assert _norm(listed) == _norm(expected)
    resp = await admin.get(base + "?format=csv", headers=h)
    assert resp.headers["Content-Type"].startswith("text/csv")
    table = list(csv.reader(io.StringIO(await resp.text())))
    assert table[0] == list(access_review.COLUMNS)
    assert len(table) == len(expected) + 1
    lines = (await (await admin.get(base + "?format=jsonl", headers=h)).text()).splitlines()
    assert _norm([json.loads(line) for line in lines]) == _norm(expected)
    # A past state and a diff through the API, as pdp_admin under RLS.
    moment = now.isoformat().replace("+", "%2B")
    user = expected[0]["user_id"]
    await pg.execute("DELETE FROM pdp.users WHERE tenant_id = $1 AND id = $2", TENANT, user)
    past = await (await admin.get(f"{base}?at={moment}", headers=h)).json()
    assert _norm(past) == _norm(expected)
    diff = await (await admin.get(f"{base}?since={moment}&format=jsonl", headers=h)).text()
    changes = [json.loads(line) for line in diff.splitlines()]
    assert changes
    assert {(c["change"], c["user_id"]) for c in changes} == {("lost", user)}
    assert len(changes) == sum(1 for r in expected if r["user_id"] == user)
    # Errors: another tenant, a bad moment, history too short, unknown parameter.
    for query, status, field in [
        ("", 404, None),
        ("?at=whenever", 400, "at"),
        ("?at=2001-01-01T00:00:00Z", 400, "at"),
        ("?since=2030-01-01", 400, "since"),
        ("?format=xml", 400, "format"),
        ("?colour=red", 400, "colour"),
    ]:
        path = "/admin/v1/tenants/other/access-review" if status == 404 else base + query
        body = await (await admin.get(path, headers=h)).json()
        assert body.get("field") == field, (query, body)
    # The command: the same rows, as one JSON array or CSV.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")} | {"PDP_DATABASE_URL": db_url}

    def pdp(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pdp", *args], env=clean, capture_output=True, text=True, timeout=120, check=False)

    done = await asyncio.to_thread(pdp, "access-review", "--tenant", TENANT, "--format", "json")
    assert done.returncode == 0, done.stderr
    assert _norm(json.loads(done.stdout)) == _norm([r for r in expected if r["user_id"] != user])  # deleted above
    done = await asyncio.to_thread(pdp, "access-review", "--tenant", TENANT, "--at", "2001-01-01")
    assert done.returncode == 2
    assert "audit history kept starts at" in done.stderr
    done = await asyncio.to_thread(pdp, "access-review", "--tenant", "nobody")
    assert done.returncode == 2
    assert "unknown tenant" in done.stderr


async def test_a_conditional_grant_shows_its_condition_now_and_in_the_past(db_url: str, pg: asyncpg.Connection) -> None:
    await pg.execute("INSERT INTO pdp.tenants (id) VALUES ($1)", TENANT)
    await pg.execute("INSERT INTO pdp.users (tenant_id, id) VALUES ($1, 'alice')", TENANT)
    await pg.execute("INSERT INTO pdp.roles (tenant_id, id) VALUES ($1, 'editor')", TENANT)
    ownership = "resource.properties.ownerID == subject.attributes.email"
    await pg.execute("INSERT INTO pdp.role_permissions VALUES ($1, 'editor', 'document:edit', $2)", TENANT, ownership)
    await pg.execute("INSERT INTO pdp.user_roles (tenant_id, user_id, role_id) VALUES ($1, 'alice', 'editor')", TENANT)
    before = await pg.fetchval("SELECT clock_timestamp()")
    await pg.execute("UPDATE pdp.role_permissions SET condition = NULL WHERE tenant_id = $1", TENANT)
    now = await pg.fetchval("SELECT clock_timestamp()")
    [current] = await _review(db_url, now, past=False)
    assert (current["permission"], current["condition"]) == ("document:edit", None)
    [past] = await _review(db_url, before, past=True)
    assert (past["permission"], past["condition"]) == ("document:edit", ownership)
