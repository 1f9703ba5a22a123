"""The admin API against a real PostgreSQL: auth, every kind's CRUD, errors, isolation, paging."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from pdp.admin import token_store
from pdp.admin.app import build_admin_app
from pdp.admin.kinds import KINDS, Kind
from pdp.admin.store import AdminStore, create_pool
from tests.raw_http import exchange, get, post

A, B = "acme", "globex"
Client = TestClient[Any, Any]


@pytest.fixture
async def admin(db_url: str, pg: asyncpg.Connection) -> AsyncIterator[Client]:
    for tenant in (A, B):
        await pg.execute("INSERT INTO pdp.tenants (id) VALUES ($1)", tenant)
    await pg.execute("INSERT INTO pdp.users (tenant_id, id) VALUES ($1, 'bob-of-globex')", B)
    pool = await create_pool(db_url)
    client = TestClient(TestServer(build_admin_app(AdminStore(pool))))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()
        await pool.close()


MakeToken = Callable[..., Awaitable[dict[str, str]]]


@pytest.fixture
def token(pg: asyncpg.Connection) -> MakeToken:
    """Headers carrying a fresh token: token(scopes, tenant=None, name=...)."""
    made = 0

    async def make(scopes: str = "read,write", tenant: str | None = A, name: str | None = None) -> dict[str, str]:
        nonlocal made
        made += 1
        new = await token_store.create(pg, name or f"t{made}", tuple(scopes.split(",")), tenant)
        return {"Authorization": f"Bearer {new.text}"}

    return make


async def _json(resp: Any, status: int) -> Any:
    body = await resp.json()
    assert resp.status == status, body
    return body


# --- authentication ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [None, "Basic abc", "Bearer ", "Bearer pdpa_nope", "Bearer pdpa_000000000000_" + "a" * 43],
)
async def test_no_valid_token_is_401(admin: Client, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    resp = await admin.get(f"/admin/v1/tenants/{A}/users", headers=headers)
    body = await _json(resp, 401)
    assert body["error"] == "unauthorized"
    assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


async def test_revocation_and_expiry_take_effect_on_the_next_request(
    admin: Client, token: MakeToken, pg: asyncpg.Connection
) -> None:
    headers = await token("read", name="soon-gone")
    await _json(await admin.get(f"/admin/v1/tenants/{A}/users", headers=headers), 200)
    await token_store.revoke(pg, "soon-gone")
    body = await _json(await admin.get(f"/admin/v1/tenants/{A}/users", headers=headers), 401)
    assert body["message"] == "token revoked"
    expiring = await token("read", name="expiring")
    await _json(await admin.get(f"/admin/v1/tenants/{A}/users", headers=expiring), 200)
    await pg.execute("UPDATE pdp.admin_tokens SET expires_at = now() - interval '1 second' WHERE name = 'expiring'")
    body = await _json(await admin.get(f"/admin/v1/tenants/{A}/users", headers=expiring), 401)
    assert body["message"] == "token expired"


async def test_scopes(admin: Client, token: MakeToken) -> None:
    reader = await token("read")
    body = await _json(await admin.post(f"/admin/v1/tenants/{A}/roles", json={"id": "r"}, headers=reader), 403)
    assert "'write'" in body["message"]
    writer = await token("write")
    await _json(await admin.post(f"/admin/v1/tenants/{A}/roles", json={"id": "r"}, headers=writer), 201)
    await _json(await admin.get(f"/admin/v1/tenants/{A}/roles/r", headers=writer), 200)  # write implies read
    body = await _json(await admin.post("/admin/v1/tenants", json={"id": "new"}, headers=writer), 403)
    assert "platform token" in body["message"]


async def test_a_token_never_appears_in_a_log_line(admin: Client, token: MakeToken, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    headers = await token("read")
    secret = headers["Authorization"].removeprefix("Bearer ")
    for path in (f"/admin/v1/tenants/{A}/users", f"/admin/v1/tenants/{A}/nope", "/admin/v1/tenants/x/roles/%00"):
        await admin.get(path, headers=headers)
    await admin.get(f"/admin/v1/tenants/{A}/users", headers={"Authorization": headers["Authorization"][:-1] + "x"})
    assert caplog.records  # the positive control: the requests did log (aiohttp's access log)
    assert all(secret not in r.getMessage() and secret[:-1] not in r.getMessage() for r in caplog.records)


# --- the kinds --------------------------------------------------------------------------


async def test_the_whole_model_through_the_api(admin: Client, token: MakeToken, pg: asyncpg.Connection) -> None:
    h = await token("write", name="ops@acme")
    t = f"/admin/v1/tenants/{A}"
    steps: list[tuple[str, str, dict[str, Any]]] = [
        ("post", "/users", {"id": "alice", "attributes": {"email": "alice@acme.test"}}),
        ("post", "/users", {"id": "carol", "status": "disabled"}),
        ("post", "/groups", {"id": "eng", "description": "Engineering"}),
        ("post", "/groups/eng/members", {"user_id": "carol"}),
        ("post", "/roles", {"id": "viewer"}),
        ("post", "/roles", {"id": "editor", "description": "edits documents"}),
        ("post", "/roles/editor/inherits", {"inherits_id": "viewer"}),
        ("post", "/roles/viewer/permissions", {"permission": "document:read"}),
        ("post", "/roles/editor/permissions", {"permission": "document:write"}),
        ("post", "/users/alice/roles", {"role_id": "editor", "scope": "document:roadmap"}),
        ("post", "/groups/eng/roles", {"role_id": "viewer", "expires_at": "2030-01-01T00:00:00+00:00"}),
    ]
    revisions = []
    for method, path, body in steps:
        answer = await _json(await getattr(admin, method)(t + path, json=body, headers=h), 201)
        assert answer["data"]["tenant_id"] == A
        revisions.append(int(answer["revision"]))
    assert revisions == sorted(revisions)
    # What the API wrote is what pdp.check sees, recorded with the token's name as actor.
    assert await pg.fetchval("SELECT pdp.check($1, 'alice', 'document', 'roadmap', 'read')", A)
    assert not await pg.fetchval("SELECT pdp.check($1, 'alice', 'document', 'other', 'read')", A)
    actors = await pg.fetch("SELECT DISTINCT actor FROM pdp.change_log WHERE tenant_id = $1 AND entity <> 'tenants'", A)
    assert [r["actor"] for r in actors] == ["ops@acme"]
    last = await pg.fetchval("SELECT max(txid)::text FROM pdp.change_log")
    assert revisions[-1] == int(last)

    got = await admin.get(f"{t}/users/alice", headers=h)
    alice = await _json(got, 200)
    assert alice["data"]["attributes"] == {"email": "alice@acme.test"}
    assert got.headers["ETag"].startswith('"')
    assignment = await _json(await admin.get(f"{t}/users/alice/roles/editor?scope=document:roadmap", headers=h), 200)
    assert assignment["data"]["scope"] == "document:roadmap"
    listed = await _json(await admin.get(f"{t}/roles/editor/permissions", headers=h), 200)
    assert [r["permission"] for r in listed["data"]] == ["document:write"]
    members = await _json(await admin.get(f"{t}/groups/eng/members", headers=h), 200)
    assert [r["user_id"] for r in members["data"]] == ["carol"]
    disabled = await _json(await admin.get(f"{t}/users?status=disabled", headers=h), 200)
    assert [r["id"] for r in disabled["data"]] == ["carol"]

    patched = await _json(await admin.patch(f"{t}/users/carol", json={"status": "active"}, headers=h), 200)
    assert patched["data"]["status"] == "active"
    await _json(await admin.patch(f"{t}/groups/eng/roles/viewer", json={"expires_at": None}, headers=h), 200)
    assert await pg.fetchval("SELECT expires_at FROM pdp.group_roles WHERE tenant_id = $1", A) is None
    await _json(await admin.delete(f"{t}/roles/editor/permissions/document:write", headers=h), 200)
    await _json(await admin.delete(f"{t}/users/alice/roles/editor?scope=document:roadmap", headers=h), 200)
    assert not await pg.fetchval("SELECT pdp.check($1, 'alice', 'document', 'roadmap', 'read')", A)
    await _json(await admin.delete(f"{t}/users/alice/roles/editor?scope=document:roadmap", headers=h), 404)


async def test_etag_and_if_match(admin: Client, token: MakeToken) -> None:
    h = await token("write")
    t = f"/admin/v1/tenants/{A}"
    await _json(await admin.post(f"{t}/roles", json={"id": "r", "description": "one"}, headers=h), 201)
    first = (await admin.get(f"{t}/roles/r", headers=h)).headers["ETag"]
    changed = await admin.patch(f"{t}/roles/r", json={"description": "two"}, headers={**h, "If-Match": first})
    await _json(changed, 200)
    second = changed.headers["ETag"]
    assert second != first
    stale = await _json(await admin.patch(f"{t}/roles/r", json={"description": "three"}, headers={**h, "If-Match": first}), 412)
    assert stale["error"] == "precondition_failed"
    await _json(await admin.delete(f"{t}/roles/r", headers={**h, "If-Match": first}), 412)
    await _json(await admin.delete(f"{t}/roles/r", headers={**h, "If-Match": second}), 200)


@pytest.mark.parametrize(
    ("path", "body", "status", "field", "message"),
    [
        ("/roles/ghost/permissions", {"permission": "document:read"}, 422, "role_id", "unknown role 'ghost'"),
        ("/users/ghost/roles", {"role_id": "viewer"}, 422, "user_id", "unknown user 'ghost'"),
        ("/roles/viewer/permissions", {"permission": "no colon"}, 422, "permission", "role_permissions_permission_check"),
        ("/users/u1/roles", {"role_id": "viewer", "scope": "bad scope"}, 422, "scope", "user_roles_scope_check"),
        ("/users/u1/roles", {"role_id": "viewer", "expires_at": "tomorrow"}, 422, "expires_at", "ISO 8601"),
        ("/users", {"id": "u1"}, 409, None, "already exists"),
        ("/users", {"id": ""}, 422, "id", "non-empty"),
        ("/users", {"id": "x" * 257}, 422, "id", "at most 256"),
        ("/users", {"id": "u2", "status": "gone"}, 422, "status", "'active' or 'disabled'"),
        ("/users", {"id": "u2", "attributes": []}, 422, "attributes", "JSON object"),
        ("/users", {"id": "u2", "color": "red"}, 422, "color", "unknown field 'color'"),
        ("/roles/viewer/inherits", {"inherits_id": "viewer"}, 422, None, "cycle"),
    ],
)
async def test_refused_writes_name_the_field_and_write_nothing(
    admin: Client, token: MakeToken, pg: asyncpg.Connection,
    path: str, body: dict[str, Any], status: int, field: str | None, message: str,
) -> None:  # fmt: skip
    h = await token("write")
    t = f"/admin/v1/tenants/{A}"
    await _json(await admin.post(f"{t}/users", json={"id": "u1"}, headers=h), 201)
    await _json(await admin.post(f"{t}/roles", json={"id": "viewer"}, headers=h), 201)
    before = await pg.fetchval("SELECT count(*) FROM pdp.change_log")
    answer = await _json(await admin.post(t + path, json=body, headers=h), status)
    assert message in answer["message"]
    assert answer.get("field") == field
    assert await pg.fetchval("SELECT count(*) FROM pdp.change_log") == before


async def test_cycles_are_refused_with_their_path(admin: Client, token: MakeToken) -> None:
    h = await token("write")
    t = f"/admin/v1/tenants/{A}"
    for role in ("a", "b", "c"):
        await _json(await admin.post(f"{t}/roles", json={"id": role}, headers=h), 201)
    await _json(await admin.post(f"{t}/roles/a/inherits", json={"inherits_id": "b"}, headers=h), 201)
    await _json(await admin.post(f"{t}/roles/b/inherits", json={"inherits_id": "c"}, headers=h), 201)
    answer = await _json(await admin.post(f"{t}/roles/c/inherits", json={"inherits_id": "a"}, headers=h), 422)
    assert "c -> a -> b -> c" in answer["message"]


@pytest.mark.parametrize(
    ("kwargs", "status", "error"),
    [
        ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "bad_request"),
        ({"data": b"[1]", "headers": {"Content-Type": "application/json"}}, 400, "bad_request"),
        ({"data": b"id=x", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 415, "unsupported_media_type"),
        ({"data": io.BytesIO(b"x" * (1024 * 1024 + 1)), "headers": {"Content-Type": "application/json"}}, 413, "payload_too_large"),
    ],
)
async def test_bad_bodies(admin: Client, token: MakeToken, kwargs: dict[str, Any], status: int, error: str) -> None:
    h = await token("write")
    answer = await _json(await admin.post(f"/admin/v1/tenants/{A}/users", **{**kwargs, "headers": {**h, **kwargs["headers"]}}), status)
    assert answer["error"] == error


# --- isolation -------------------------------------------------------------------------


async def test_another_tenant_is_indistinguishable_from_none(admin: Client, token: MakeToken, pg: asyncpg.Connection) -> None:
    h = await token("read,write", tenant=A)
    for tenant in (B, "no-such-tenant"):
        for method, path, body in [
            ("get", "/users", None), ("get", "/users/bob-of-globex", None),
            ("post", "/users", {"id": "mole"}), ("patch", "/users/bob-of-globex", {"status": "disabled"}),
            ("delete", "/users/bob-of-globex", None), ("get", "/users?after=WyJhIl0", None),
        ]:  # fmt: skip
            kwargs: dict[str, Any] = {"headers": h} if body is None else {"headers": h, "json": body}
            answer = await _json(await getattr(admin, method)(f"/admin/v1/tenants/{tenant}{path}", **kwargs), 404)
            assert answer == {"error": "not_found", "message": f"unknown tenant {tenant!r}"}
        answer = await _json(await admin.get(f"/admin/v1/tenants/{tenant}", headers=h), 404)
        assert answer["message"] == f"unknown tenant {tenant!r}"
    assert await pg.fetchval("SELECT status FROM pdp.users WHERE tenant_id = $1", B) == "active"
    assert await pg.fetchval("SELECT count(*) FROM pdp.users WHERE id = 'mole'") == 0
    listed = await _json(await admin.get("/admin/v1/tenants", headers=h), 200)
    assert [t["id"] for t in listed["data"]] == [A]


async def test_a_platform_token_manages_tenants(admin: Client, token: MakeToken, pg: asyncpg.Connection) -> None:
    h = await token("admin", tenant=None)
    listed = await _json(await admin.get("/admin/v1/tenants", headers=h), 200)
    assert [t["id"] for t in listed["data"]] == [A, B]
    made = await _json(await admin.post("/admin/v1/tenants", json={"id": "initech", "name": "Initech"}, headers=h), 201)
    assert made["data"]["name"] == "Initech"
    await _json(await admin.post("/admin/v1/tenants", json={"id": "initech"}, headers=h), 409)
    await _json(await admin.post("/admin/v1/tenants/initech/users", json={"id": "peter"}, headers=h), 201)
    await _json(await admin.delete("/admin/v1/tenants/initech", headers=h), 200)
    assert await pg.fetchval("SELECT count(*) FROM pdp.users WHERE tenant_id = 'initech'") == 0
    await _json(await admin.delete("/admin/v1/tenants/initech", headers=h), 404)


# --- paging ----------------------------------------------------------------------------


async def test_keyset_pages_cover_the_list_once(admin: Client, token: MakeToken, pg: asyncpg.Connection) -> None:
    await pg.executemany("INSERT INTO pdp.users (tenant_id, id) VALUES ($1, $2)", [(A, f"u{i:02}") for i in range(25)])
    h = await token("read")
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        query = "?limit=10" + (f"&after={after}" if after else "")
        page = await _json(await admin.get(f"/admin/v1/tenants/{A}/users{query}", headers=h), 200)
        seen += [u["id"] for u in page["data"]]
        pages += 1
        after = page["next"]
        if after is None:
            break
    assert seen == [f"u{i:02}" for i in range(25)]
    assert pages == 3


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=x", "after=garbage", "after=WyJhIiwiYiJd", "colour=red"])
async def test_bad_list_parameters(admin: Client, token: MakeToken, query: str) -> None:
    h = await token("read")
    answer = await _json(await admin.get(f"/admin/v1/tenants/{A}/users?{query}", headers=h), 400)
    assert answer["error"] == "bad_request"
    assert answer["field"] in ("limit", "after", "colour")


# --- the command ------------------------------------------------------------------------


def test_admin_serve_stays_off_without_a_token(db_url: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    result = subprocess.run(
        [sys.executable, "-m", "pdp", "admin", "serve"], env={**clean, "PDP_DATABASE_URL": db_url},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "the admin API stays off: no active admin token exists" in result.stderr
    assert "Traceback" not in result.stderr


# --- bulk ------------------------------------------------------------------------------


async def test_bulk_applies_everything_in_one_transaction(admin: Client, token: MakeToken, pg: asyncpg.Connection) -> None:
    h = await token("write")
    operations = [
        {"op": "create", "kind": "users", "key": {"id": "dora"}},
        {"op": "create", "kind": "roles", "key": {"id": "auditor"}, "fields": {"description": "reads all"}},
        {"op": "create", "kind": "role_permissions", "key": {"role_id": "auditor", "permission": "*:read"}},
        {"op": "create", "kind": "user_roles", "key": {"user_id": "dora", "role_id": "auditor"}},
        {"op": "update", "kind": "users", "key": {"id": "dora"}, "fields": {"attributes": {"team": "risk"}}},
    ]
    answer = await _json(await admin.post(f"/admin/v1/tenants/{A}/bulk", json={"operations": operations}, headers=h), 200)
    assert [r["kind"] for r in answer["results"]] == ["users", "roles", "role_permissions", "user_roles", "users"]
    assert answer["results"][3]["data"]["scope"] == "*"
    txids = await pg.fetch("SELECT DISTINCT txid::text FROM pdp.change_log WHERE tenant_id = $1 AND entity <> 'tenants'", A)
    assert [r[0] for r in txids] == [answer["revision"]]
    assert await pg.fetchval("SELECT pdp.check($1, 'dora', 'invoice', 'i1', 'read')", A)


@pytest.mark.parametrize(
    ("bad", "status", "field", "message"),
    [
        ({"op": "create", "kind": "user_roles", "key": {"user_id": "dora", "role_id": "ghost"}}, 422, "operations[2].role_id", "unknown role 'ghost'"),
        ({"op": "create", "kind": "users", "key": {"id": "dora"}}, 409, "operations[2]", "already exists"),
        ({"op": "delete", "kind": "roles", "key": {"id": "ghost"}}, 404, "operations[2]", "no roles with id='ghost'"),
        ({"op": "upsert", "kind": "users", "key": {"id": "x"}}, 400, "operations[2].op", "must be 'create'"),
        ({"op": "create", "kind": "tenants", "key": {"id": "x"}}, 400, "operations[2].kind", "must be one of"),
        ({"op": "create", "kind": "users", "key": {"id": ""}}, 422, "operations[2].id", "non-empty"),
        ({"op": "update", "kind": "users", "key": {"id": "dora"}, "fields": {}}, 422, "operations[2]", "nothing to change"),
        ("create users", 400, "operations[2]", "must be an object"),
    ],
)
async def test_a_bulk_that_fails_anywhere_writes_nothing(
    admin: Client, token: MakeToken, pg: asyncpg.Connection, bad: object, status: int, field: str, message: str
) -> None:
    h = await token("write")
    operations = [
        {"op": "create", "kind": "users", "key": {"id": "dora"}},
        {"op": "create", "kind": "roles", "key": {"id": "auditor"}},
        bad,
    ]
    before = await pg.fetchval("SELECT count(*) FROM pdp.change_log")
    answer = await _json(await admin.post(f"/admin/v1/tenants/{A}/bulk", json={"operations": operations}, headers=h), status)
    assert answer["field"] == field
    assert message in answer["message"]
    assert answer["message"].startswith("operations[2]")
    assert await pg.fetchval("SELECT count(*) FROM pdp.change_log") == before
    assert await pg.fetchval("SELECT count(*) FROM pdp.users WHERE id = 'dora'") == 0


@pytest.mark.parametrize("body", [{}, {"operations": []}, {"operations": "x"}, {"operations": [{}] * 1001}])
async def test_bulk_needs_a_list_of_operations(admin: Client, token: MakeToken, body: dict[str, Any]) -> None:
    answer = await _json(await admin.post(f"/admin/v1/tenants/{A}/bulk", json=body, headers=await token("write")), 400)
    assert answer["field"] == "operations"


async def test_bulk_into_another_tenant_is_a_404_and_writes_nothing(admin: Client, token: MakeToken, pg: asyncpg.Connection) -> None:
    h = await token("write", tenant=A)
    operations = [{"op": "delete", "kind": "users", "key": {"id": "bob-of-globex"}}]
    answer = await _json(await admin.post(f"/admin/v1/tenants/{B}/bulk", json={"operations": operations}, headers=h), 404)
    assert answer["message"] == f"unknown tenant {B!r}"
    assert await pg.fetchval("SELECT count(*) FROM pdp.users WHERE tenant_id = $1", B) == 1


# --- policy as code --------------------------------------------------------------------

POLICY = """\
tenant: acme
roles:
  viewer:
    permissions: [document:read]
users:
  alice:
    roles: [{role: viewer}]
"""


async def test_policy_put_plans_applies_and_exports(admin: Client, token: MakeToken, pg: asyncpg.Connection) -> None:
    h = {**await token("write", name="policy-bot"), "Content-Type": "application/yaml"}
    url = f"/admin/v1/tenants/{A}/policy"
    planned = await _json(await admin.put(url + "?dry_run=true", data=POLICY, headers=h), 200)
    assert planned["applied"] is False
    assert planned["revision"] is None
    assert "+ roles id='viewer'" in planned["changes"]
    assert planned["effect"] == ["+ alice document:read on *"]
    assert await pg.fetchval("SELECT count(*) FROM pdp.roles WHERE tenant_id = $1", A) == 0

    applied = await admin.put(url, data=POLICY, headers=h)
    body = await _json(applied, 200)
    assert body["applied"] is True
    assert applied.headers["X-PDP-Revision"] == body["revision"]
    assert await pg.fetchval("SELECT pdp.check($1, 'alice', 'document', 'd', 'read')", A)
    assert await pg.fetchval("SELECT DISTINCT actor FROM pdp.change_log WHERE entity = 'roles'") == "policy-bot"

    exported = await admin.get(url, headers=h)
    assert exported.status == 200
    assert exported.content_type == "application/yaml"
    again = await _json(await admin.put(url, data=await exported.text(), headers=h), 200)
    assert again == {"tenant": A, "changes": [], "effect": [], "applied": False, "revision": None}


@pytest.mark.parametrize(
    ("tenant", "document", "status", "message"),
    [
        (B, POLICY.replace("acme", "globex"), 404, "unknown tenant 'globex'"),
        (A, POLICY.replace("acme", "globex"), 422, "policy:1:9: tenant: is 'globex', not 'acme'"),
        (A, "tenant: acme\nroles:\n  viewer:\n    grants: []\n", 422, "policy:4:5: roles.viewer.grants: unknown key"),
        (A, "tenant: acme\nroles: {}\nusers:\n  zed:\n    roles: [ghost]\n", 422, "cannot apply '+ user_roles user_id='zed', role_id='ghost', scope='*''"),
    ],
)
async def test_policy_put_refusals(admin: Client, token: MakeToken, pg: asyncpg.Connection, tenant: str, document: str, status: int, message: str) -> None:
    h = {**await token("write", tenant=A), "Content-Type": "application/yaml"}
    before = await pg.fetchval("SELECT count(*) FROM pdp.change_log")
    answer = await _json(await admin.put(f"/admin/v1/tenants/{tenant}/policy", data=document, headers=h), status)
    assert message in answer["message"]
    assert await pg.fetchval("SELECT count(*) FROM pdp.change_log") == before


async def test_two_writers_with_one_etag_one_wins(admin: Client, token: MakeToken, pg: asyncpg.Connection) -> None:
    h = await token("write")
    t = f"/admin/v1/tenants/{A}"
    await _json(await admin.post(f"{t}/roles", json={"id": "shared"}, headers=h), 201)
    seen = (await admin.get(f"{t}/roles/shared", headers=h)).headers["ETag"]
    answers = await asyncio.gather(*(
        admin.patch(f"{t}/roles/shared", json={"description": f"writer {n}"}, headers={**h, "If-Match": seen})
        for n in range(2)
    ))  # fmt: skip
    assert sorted(a.status for a in answers) == [200, 412]
    winner = next(a for a in answers if a.status == 200)
    stored = await pg.fetchval("SELECT description FROM pdp.roles WHERE tenant_id = $1 AND id = 'shared'", A)
    assert (await winner.json())["data"]["description"] == stored


def test_admin_serve_answers_and_stops_on_sigterm(db_url: str) -> None:
    async def token_text() -> str:
        conn = await asyncpg.connect(db_url)
        try:
            await conn.execute("INSERT INTO pdp.tenants (id) VALUES ('acme')")
            return (await token_store.create(conn, "serve-test", ("read",), "acme")).text
        finally:
            await conn.close()

    text = asyncio.run(token_text())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    env = {**clean, "PDP_DATABASE_URL": db_url, "PDP_ADMIN_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "pdp", "admin", "serve"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/admin/v1/tenants", headers={"Authorization": f"Bearer {text}"})
                with urllib.request.urlopen(request, timeout=2) as resp:  # noqa: S310 (http://127.0.0.1)
                    assert json.loads(resp.read())["data"][0]["id"] == "acme"
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "pdp admin serve did not answer within 30 s"
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert text not in stderr
    assert f"admin API on http://127.0.0.1:{port}/admin/v1/" in stderr


def _item_path(kind: Kind) -> str:
    path = kind.item
    for column in kind.path_key:
        path = path.replace("{" + column + "}", "x")
    return path


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
async def test_every_endpoint_of_every_kind_hides_another_tenant(
    admin: Client, token: MakeToken, pg: asyncpg.Connection, kind: Kind
) -> None:
    h = await token("read,write", tenant=A)
    before = await pg.fetchval("SELECT count(*) FROM pdp.change_log")
    collection = kind.collection
    for column in kind.parent_key:
        collection = collection.replace("{" + column + "}", "x")
    body = {c: "x" for c in kind.key if c not in kind.parent_key}
    calls: list[tuple[str, str, dict[str, Any] | None]] = [
        ("get", collection, None), ("post", collection, body),
        ("get", _item_path(kind), None), ("delete", _item_path(kind), None),
    ]  # fmt: skip
    if kind.fields:
        calls.append(("patch", _item_path(kind), {kind.fields[0].name: None if kind.fields[0].nullable else "active"}))
    for tenant in (B, "no-such-tenant"):
        for method, path, payload in calls:
            kwargs: dict[str, Any] = {"headers": h} if payload is None else {"headers": h, "json": payload}
            answer = await _json(await getattr(admin, method)(f"/admin/v1/tenants/{tenant}{path}", **kwargs), 404)
            assert answer == {"error": "not_found", "message": f"unknown tenant {tenant!r}"}, (method, path)
    assert await pg.fetchval("SELECT count(*) FROM pdp.change_log") == before


async def test_conditions_are_compiled_on_write_and_the_inventory_is_managed(admin: Client, token: MakeToken, pg: asyncpg.Connection) -> None:
    h = await token("write")
    t = f"/admin/v1/tenants/{A}"
    await _json(await admin.post(f"{t}/roles", json={"id": "editor"}, headers=h), 201)
    bad = await _json(await admin.post(f"{t}/roles/editor/permissions", json={"permission": "document:edit", "condition": "resource.properties.ownerID =="}, headers=h), 422)
    assert bad["field"] == "condition"
    assert bad["message"].startswith("condition does not compile")
    ownership = "resource.properties.ownerID == subject.attributes.email"
    made = await _json(await admin.post(f"{t}/roles/editor/permissions", json={"permission": "document:edit", "condition": ownership}, headers=h), 201)
    assert made["data"]["condition"] == ownership
    await _json(await admin.patch(f"{t}/roles/editor/permissions/document:edit", json={"condition": "true ="}, headers=h), 422)
    await _json(await admin.patch(f"{t}/roles/editor/permissions/document:edit", json={"condition": None}, headers=h), 200)
    assert await pg.fetchval("SELECT condition FROM pdp.role_permissions WHERE tenant_id = $1", A) is None

    await _json(await admin.post(f"{t}/resources", json={"type": "document", "id": "d1", "attributes": {"ownerID": "alice@acme"}}, headers=h), 201)
    got = await _json(await admin.get(f"{t}/resources/document/d1", headers=h), 200)
    assert got["data"]["attributes"] == {"ownerID": "alice@acme"}
    await _json(await admin.patch(f"{t}/resources/document/d1", json={"attributes": {"ownerID": "bob@acme"}}, headers=h), 200)
    assert await pg.fetchval("SELECT attributes->>'ownerID' FROM pdp.resources WHERE tenant_id = $1", A) == "bob@acme"
    bad_type = await _json(await admin.post(f"{t}/resources", json={"type": "no spaces", "id": "x"}, headers=h), 422)
    assert bad_type["field"] == "type"
    await _json(await admin.delete(f"{t}/resources/document/d1", headers=h), 200)


@pytest.mark.parametrize("path", ["/users", "/policy", "/bulk"])
async def test_compressed_bodies_are_refused_not_inflated(admin: Client, token: MakeToken, pg: asyncpg.Connection, path: str) -> None:
    import gzip

    h = await token("write")
    bomb = gzip.compress(b"[" + b" " * (64 * 1024 * 1024) + b"]")  # 64 MiB of JSON in ~64 KiB
    method = admin.put if path == "/policy" else admin.post
    answer = await _json(await method(
        f"/admin/v1/tenants/{A}{path}", data=bomb,
        headers={**h, "Content-Type": "application/json", "Content-Encoding": "gzip"},
    ), 415)  # fmt: skip
    assert answer["message"] == "Content-Encoding 'gzip' is not accepted"
    assert await pg.fetchval("SELECT count(*) FROM pdp.users WHERE tenant_id = $1", A) == 0


def test_admin_serve_is_behind_the_http_edge(db_url: str) -> None:
    """The admin listener has the check API's edge: a slow body gets a JSON 408 and is
    closed, a malformed request a JSON 400, and past PDP_MAX_CONNECTIONS busy
    connections a new one a JSON 503; none of it a traceback."""

    async def token_text() -> str:
        conn = await asyncpg.connect(db_url)
        try:
            await conn.execute("INSERT INTO pdp.tenants (id) VALUES ('acme')")
            return (await token_store.create(conn, "edge-test", ("read", "write"), "acme")).text
        finally:
            await conn.close()

    text = asyncio.run(token_text())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    env = {
        **clean, "PDP_DATABASE_URL": db_url, "PDP_ADMIN_PORT": str(port),
        "PDP_REQUEST_READ_TIMEOUT_SECONDS": "4", "PDP_MAX_CONNECTIONS": "2",
    }  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "pdp", "admin", "serve"], env=env, stderr=subprocess.PIPE, text=True)
    auth = {"Authorization": f"Bearer {text}"}

    async def probe_edge() -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = await exchange(port, get("/admin/v1/tenants", auth))
                break
            except OSError:
                assert proc.poll() is None, "pdp admin serve exited"
                assert time.monotonic() < deadline, "pdp admin serve did not answer within 30 s"
                await asyncio.sleep(0.1)
        assert answer.status == 200, answer.body
        bad = await exchange(port, b"GET /admin/v1/tenants HTTP/1.1\r\nHost pdp\r\n\r\n")
        assert (bad.status, bad.json()["error"]) == (400, "bad_request")
        started = time.monotonic()
        slow = await exchange(
            port, post("/admin/v1/tenants/acme/users", b"{", headers=auth, length=100), timeout=30
        )
        assert (slow.status, slow.json()["error"]) == (408, "request_timeout")
        assert slow.closed
        assert 3.5 < time.monotonic() - started < 25
        held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            async with asyncio.timeout(20):
                while True:
                    # (a closed one reads EOF, or a reset if it had sent bytes unread)
                    held = [(r, w) for r, w in held if not r.at_eof() and not r.exception()]
                    while len(held) < 2:  # busy: headers begun, not finished
                        reader, writer = await asyncio.open_connection("127.0.0.1", port)
                        writer.write(b"GET /admin/v1/tenants HTTP/1.1\r\n")
                        await writer.drain()
                        held.append((reader, writer))
                    refused = await exchange(port, get("/admin/v1/tenants", auth))
                    if refused.status != 200:
                        break
                    # The server had not read a held one's bytes yet: it closed that one as
                    # idle to make room (as it should); replace it and try again.
                    await asyncio.sleep(0.05)
            assert (refused.status, refused.json()["error"]) == (503, "unavailable")
        finally:
            for _, writer in held:
                writer.close()
        async with asyncio.timeout(10):  # room again once the server saw them close
            while (await exchange(port, get("/admin/v1/tenants", auth))).status == 503:  # noqa: ASYNC110 (polling the server over a socket)
                await asyncio.sleep(0.05)

    try:
        asyncio.run(probe_edge())
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert text not in stderr
    assert "(at most 2 connections)" in stderr
