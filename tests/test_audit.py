"""The audit trail: GET /admin/v1/audit and `pdp audit` over the change log and its archive."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from pdp.admin import audit, token_store
from pdp.admin.app import build_admin_app
from pdp.admin.store import AdminStore, create_pool
from sync import pg_retention
from tests.sync_harness import current_xid, horizon_passed

A, B = "acme", "globex"
Client = TestClient[Any, Any]


@pytest.fixture
async def admin(db_url: str, pg: asyncpg.Connection) -> AsyncIterator[Client]:
    for tenant in (A, B):
        await pg.execute("INSERT INTO pdp.tenants (id) VALUES ($1)", tenant)
    pool = await create_pool(db_url)
    client = TestClient(TestServer(build_admin_app(AdminStore(pool))))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()
        await pool.close()


async def _headers(
    pg: asyncpg.Connection, name: str, tenant: str | None, scopes: str = "read,write"
) -> dict[str, str]:
    made = await token_store.create(pg, name, tuple(scopes.split(",")), tenant)
    return {"Authorization": f"Bearer {made.text}"}


async def _json(resp: Any, status: int) -> Any:
    body = await resp.json()
    assert resp.status == status, body
    return body


async def _write_some(admin: Client, h: dict[str, str], tenant: str = A) -> list[int]:
    """alice and bob, a group with both, a role held by alice; then alice is deleted."""
    t = f"/admin/v1/tenants/{tenant}"
    revisions = []
    for path, body in [
        ("/users", {"id": "alice", "attributes": {"email": "alice@example.test"}}),
        ("/users", {"id": "bob"}),
        ("/groups", {"id": "eng"}),
        ("/groups/eng/members", {"user_id": "alice"}),
        ("/groups/eng/members", {"user_id": "bob"}),
        ("/roles", {"id": "viewer"}),
        ("/users/alice/roles", {"role_id": "viewer"}),
    ]:
        revisions.append(
            int((await _json(await admin.post(t + path, json=body, headers=h), 201))["revision"])
        )
    revisions.append(
        int((await _json(await admin.delete(f"{t}/users/alice", headers=h), 200))["revision"])
    )
    return revisions


async def _all(
    admin: Client, h: dict[str, str], query: str = "", limit: int = 1000
) -> list[dict[str, Any]]:
    """Every record, following `next` page by page."""
    out: list[dict[str, Any]] = []
    after = ""
    while True:
        body = await _json(
            await admin.get(f"/admin/v1/audit?limit={limit}{query}{after}", headers=h), 200
        )
        out += body["data"]
        if body["next"] is None:
            return out
        assert int(body["next"]) == out[-1]["id"]
        after = f"&after={body['next']}"


async def test_audit_rows_are_what_was_written_with_cascades_and_the_actor(
    admin: Client, pg: asyncpg.Connection
) -> None:
    h = await _headers(pg, "ops@acme", A)
    revisions = await _write_some(admin, h)
    records = await _all(admin, h)
    assert all(set(r) == set(audit.COLUMNS) for r in records)
    mine = [r for r in records if r["entity"] != "tenants"]
    assert [r["actor"] for r in mine] == ["ops@acme"] * len(mine)
    assert {r["tenant_id"] for r in records} == {A}
    # The delete's transaction: the user, and by cascade its membership and assignment.
    last = [r for r in records if r["txid"] == str(revisions[-1])]
    assert sorted((r["entity"], r["op"]) for r in last) == [
        ("group_members", "delete"),
        ("user_roles", "delete"),
        ("users", "delete"),
    ]
    gone = next(r for r in last if r["entity"] == "users")
    assert gone["key"] == {"tenant_id": A, "id": "alice"}
    assert gone["old"]["attributes"] == {"email": "alice@example.test"}
    assert gone["new"] is None
    # Each record is its change-log row, column by column.
    rows = await pg.fetch(
        "SELECT id, txid::text, tenant_id, entity, op, key::text, old::text, new::text, actor, changed_at FROM pdp.change_log WHERE tenant_id = $1 ORDER BY id",
        A,
    )
    assert [r["id"] for r in records] == [r["id"] for r in rows]
    for rec, row in zip(records, rows, strict=True):
        assert rec["key"] == json.loads(row["key"])
        assert rec["old"] == (None if row["old"] is None else json.loads(row["old"]))
        assert datetime.fromisoformat(rec["changed_at"]) == row["changed_at"]
        assert rec["txid"] == row["txid"]


async def test_filters_and_pages(admin: Client, pg: asyncpg.Connection) -> None:
    h = await _headers(pg, "ops@acme", A)
    revisions = await _write_some(admin, h)
    await pg.execute("SELECT set_config('pdp.actor', 'dba', false)")
    await pg.execute("INSERT INTO pdp.roles (tenant_id, id) VALUES ($1, 'by-hand')", A)
    everything = await _all(admin, h)
    # Pages of 2 give the same records, in id order, none twice.
    paged = await _all(admin, h, limit=2)
    assert paged == everything
    assert [r["id"] for r in paged] == sorted({r["id"] for r in paged})

    def ids(records: list[dict[str, Any]]) -> list[int]:
        return [r["id"] for r in records]

    assert ids(await _all(admin, h, "&actor=dba")) == [
        r["id"] for r in everything if r["actor"] == "dba"
    ]
    assert {r["entity"] for r in await _all(admin, h, "&entity=group_members")} == {"group_members"}
    alice = await _all(admin, h, "&key.user_id=alice")
    assert sorted((r["entity"], r["op"]) for r in alice) == [
        ("group_members", "delete"),
        ("group_members", "insert"),
        ("user_roles", "delete"),
        ("user_roles", "insert"),
    ]
    both = await _all(admin, h, "&key.user_id=bob&key.group_id=eng")
    assert [(r["entity"], r["op"]) for r in both] == [("group_members", "insert")]
    assert ids(await _all(admin, h, f"&txid={revisions[-1]}")) == [
        r["id"] for r in everything if r["txid"] == str(revisions[-1])
    ]
    middle = everything[3]["changed_at"]
    since = await _all(admin, h, f"&since={middle.replace('+', '%2B')}")
    until = await _all(admin, h, f"&until={middle.replace('+', '%2B')}")
    assert ids(until) + ids(since) == ids(everything)
    assert ids(until) == ids(everything[:3])


async def test_tenants_see_only_their_own_history(admin: Client, pg: asyncpg.Connection) -> None:
    ours, theirs = await _headers(pg, "a", A), await _headers(pg, "b", B)
    await _write_some(admin, ours, A)
    await _write_some(admin, theirs, B)
    assert {r["tenant_id"] for r in await _all(admin, theirs)} == {B}
    body = await _json(await admin.get(f"/admin/v1/audit?tenant={A}", headers=theirs), 404)
    assert body["error"] == "not_found"
    platform = await _headers(pg, "root", None, "read")
    body = await _json(await admin.get("/admin/v1/audit", headers=platform), 400)
    assert body["field"] == "tenant"
    assert {r["tenant_id"] for r in await _all(admin, platform, f"&tenant={A}")} == {A}
    # A platform token may read a deleted tenant's history; RLS still holds per tenant.
    await pg.execute("DELETE FROM pdp.tenants WHERE id = $1", B)
    gone = await _all(admin, platform, f"&tenant={B}")
    assert ("tenants", "delete", {"id": B}) in [(r["entity"], r["op"], r["key"]) for r in gone]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("since=yesterday", "since"),
        ("until=2026-13-01", "until"),
        ("since=2026-12-02&until=2026-12-01", "since"),
        ("txid=-1", "txid"),
        ("after=abc", "after"),
        ("entity=passwords", "entity"),
        ("key.User=x", "key.User"),
        ("key.user_id=", "key.user_id"),
        ("colour=red", "colour"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("tenant=", "tenant"),
    ],
)
async def test_bad_audit_queries_are_400_naming_the_field(
    admin: Client, pg: asyncpg.Connection, query: str, field: str
) -> None:
    h = await _headers(pg, "a", A)
    body = await _json(await admin.get(f"/admin/v1/audit?{query}", headers=h), 400)
    assert body["field"] == field
    assert body["error"] == "bad_request"


async def test_pruning_for_sync_keeps_audit_history_that_retention_requires(
    admin: Client, pg: asyncpg.Connection
) -> None:
    h = await _headers(pg, "ops@acme", A)
    await _write_some(admin, h)
    before = await _all(admin, h)
    await horizon_passed(pg, await current_xid(pg) - 1)
    # The sync window is over for every row: they all leave the change log...
    result = await pg_retention.prune(pg, retention_seconds=0, audit_retention_seconds=3600)
    assert result.removed > len(before)  # both tenants' rows and the tokens' tenants
    assert result.audit_removed == 0
    assert await pg.fetchval("SELECT count(*) FROM pdp.change_log") == 0
    # ...into the archive, unchanged: the audit trail is the same.
    assert await _all(admin, h) == before
    # New rows (change log) and archived ones read as one trail.
    await _json(
        await admin.post(f"/admin/v1/tenants/{A}/roles", json={"id": "late"}, headers=h), 201
    )
    after = await _all(admin, h)
    assert after[:-1] == before
    assert after[-1]["key"] == {"tenant_id": A, "id": "late"}
    # Audit retention removes only archive rows older than it.
    old = [r["id"] for r in before[:3]]
    await pg.execute(
        "UPDATE pdp.audit_archive SET changed_at = now() - interval '2 hours' WHERE id = ANY($1)",
        old,
    )
    result = await pg_retention.prune(pg, retention_seconds=0, audit_retention_seconds=3600)
    assert result.audit_removed == 3
    assert [r["id"] for r in await _all(admin, h)] == [r["id"] for r in after[3:]]


async def test_a_row_is_archived_in_the_statement_that_prunes_it(pg: asyncpg.Connection) -> None:
    """Never in neither table, never in both: the move is one statement."""
    await pg.execute("INSERT INTO pdp.tenants (id) SELECT 't' || g FROM generate_series(1, 50) g")
    await horizon_passed(pg, await current_xid(pg) - 1)
    ids = [r[0] for r in await pg.fetch("SELECT id FROM pdp.change_log ORDER BY id")]
    result = await pg_retention.prune(pg, retention_seconds=0, batch_size=7)
    assert result.removed == len(ids)
    assert [r[0] for r in await pg.fetch("SELECT id FROM pdp.audit_archive ORDER BY id")] == ids
    both = await pg.fetchval(
        "SELECT count(*) FROM pdp.change_log c JOIN pdp.audit_archive a USING (id)"
    )
    assert both == 0


def _pdp(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    return subprocess.run(
        [sys.executable, "-m", "pdp", *args], env={**clean, "PDP_DATABASE_URL": url},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


async def test_pdp_audit_exports_jsonl_and_csv_with_the_change_log_columns(
    admin: Client, pg: asyncpg.Connection, db_url: str
) -> None:
    h = await _headers(pg, "ops@acme", A)
    await _write_some(admin, h)
    await horizon_passed(pg, await current_xid(pg) - 1)
    await pg_retention.prune(pg, retention_seconds=0)  # half the trail in the archive
    await _json(
        await admin.post(f"/admin/v1/tenants/{A}/roles", json={"id": "late"}, headers=h), 201
    )
    expected = await _all(admin, h)
    done = await asyncio.to_thread(_pdp, db_url, "audit", "--tenant", A)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines == expected
    assert all(list(line) == list(audit.COLUMNS) for line in lines)
    done = await asyncio.to_thread(
        _pdp,
        db_url,
        "audit",
        "--tenant",
        A,
        "--format",
        "csv",
        "--entity",
        "users",
        "--key",
        "id=alice",
    )
    assert done.returncode == 0, done.stderr
    table = list(csv.reader(io.StringIO(done.stdout)))
    assert table[0] == list(audit.COLUMNS)
    wanted = [r for r in expected if r["entity"] == "users" and r["key"]["id"] == "alice"]
    assert [int(row[0]) for row in table[1:]] == [r["id"] for r in wanted]
    assert [json.loads(row[5]) for row in table[1:]] == [r["key"] for r in wanted]
    assert table[-1][7] == ""  # the delete's `new` is NULL: an empty field
    bad = await asyncio.to_thread(_pdp, db_url, "audit", "--since", "whenever")
    assert bad.returncode == 2
    assert "--since" in bad.stderr
    assert "Traceback" not in bad.stderr


async def test_a_reader_that_stops_early_ends_the_export_quietly(pg: asyncpg.Connection, db_url: str) -> None:
    await pg.execute("INSERT INTO pdp.tenants (id) VALUES ($1)", A)
    await pg.execute("INSERT INTO pdp.users (tenant_id, id) SELECT $1, 'user-' || g FROM generate_series(1, 5000) g", A)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    clean |= {"PDP_DATABASE_URL": db_url, "PDP_LOG_LEVEL": "WARNING"}
    for command in (["audit", "--tenant", A], ["audit", "--format", "csv"], ["access-review", "--tenant", A, "--format", "json"]):

        def head(command: list[str] = command) -> tuple[int, bytes, bytes]:
            proc = subprocess.Popen([sys.executable, "-m", "pdp", *command], env=clean, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert proc.stdout is not None
            first = proc.stdout.readline()
            proc.stdout.close()  # like `| head -1`
            _, err = proc.communicate(timeout=60)
            return proc.returncode, first, err

        code, first, err = await asyncio.to_thread(head)
        assert first
        # access-review of a tenant without grants writes little: it may finish first.
        assert code in ((141,) if command[0] == "audit" else (0, 141)), err
        assert err == b"", err
