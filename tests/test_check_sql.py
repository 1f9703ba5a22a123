"""pdp.check, the SQL reference decision, against hand-written cases for every branch."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
PAST = T0 - timedelta(days=1)
FUTURE = T0 + timedelta(days=1)

DATA = """
INSERT INTO pdp.tenants (id) VALUES ('acme'), ('other');
INSERT INTO pdp.users (tenant_id, id, status) VALUES
  ('acme', 'alice', 'active'), ('acme', 'bob', 'active'), ('acme', 'carol', 'active'),
  ('acme', 'dave', 'disabled'), ('acme', 'erin', 'active'), ('acme', 'frank', 'active'),
  ('acme', 'greta', 'active'), ('acme', 'henry', 'active'), ('other', 'ivan', 'active');
INSERT INTO pdp.roles (tenant_id, id) VALUES
  ('acme', 'viewer'), ('acme', 'editor'), ('acme', 'admin'), ('acme', 'auditor'),
  ('acme', 'root'), ('acme', 'deep1'), ('acme', 'deep2'), ('acme', 'deep3'), ('acme', 'deep4'),
  ('acme', 'empty'), ('other', 'root');
INSERT INTO pdp.role_inherits VALUES
  ('acme', 'editor', 'viewer'), ('acme', 'admin', 'editor'),
  ('acme', 'deep1', 'deep2'), ('acme', 'deep2', 'deep3'), ('acme', 'deep3', 'deep4');
INSERT INTO pdp.role_permissions VALUES
  ('acme', 'viewer', 'document:read'), ('acme', 'editor', 'document:write'),
  ('acme', 'admin', 'document:*'), ('acme', 'auditor', '*:read'), ('acme', 'root', '*:*'),
  ('acme', 'deep4', 'report:approve'), ('other', 'root', '*:*');
INSERT INTO pdp.groups (tenant_id, id) VALUES ('acme', 'eng'), ('acme', 'ops');
INSERT INTO pdp.group_members VALUES ('acme', 'eng', 'greta'), ('acme', 'ops', 'greta');
INSERT INTO pdp.user_roles (tenant_id, user_id, role_id, scope, expires_at) VALUES
  ('acme', 'alice', 'admin', '*', NULL),
  ('acme', 'bob', 'editor', 'document:*', NULL),
  ('acme', 'carol', 'viewer', 'document:d1', NULL),
  ('acme', 'carol', 'editor', 'document:d2', $1),
  ('acme', 'dave', 'root', '*', NULL),
  ('acme', 'erin', 'auditor', 'folder:f1', $2),
  ('acme', 'frank', 'empty', '*', NULL),
  ('acme', 'henry', 'viewer', '*', $3),
  ('other', 'ivan', 'root', '*', NULL);
INSERT INTO pdp.group_roles (tenant_id, group_id, role_id, scope, expires_at) VALUES
  ('acme', 'eng', 'editor', 'document:d3', NULL),
  ('acme', 'ops', 'deep1', '*', $2);
"""

# (tenant, user, resource type, resource id, action, expected, what it covers)
CASES = [
    ("acme", "alice", "document", "d9", "read", True, "tenant-wide scope, inherited grant"),
    ("acme", "alice", "document", "d9", "purge", True, "type wildcard document:* on own role"),
    ("acme", "alice", "folder", "f1", "read", False, "grants are per type"),
    ("acme", "bob", "document", "d1", "write", True, "type-wide scope document:*"),
    ("acme", "bob", "document", "d1", "read", True, "inherited from viewer"),
    ("acme", "bob", "document", "d1", "delete", False, "no grant for action"),
    ("acme", "bob", "folder", "x", "read", False, "scope document:* does not cover folder"),
    ("acme", "carol", "document", "d1", "read", True, "scope type:id matches"),
    ("acme", "carol", "document", "d2", "read", False, "scope d1 does not cover d2; d2 expired"),
    ("acme", "carol", "document", "d2", "write", False, "expired assignment"),
    ("acme", "dave", "document", "d1", "read", False, "disabled user"),
    ("acme", "erin", "folder", "f1", "read", True, "*:read wildcard, unexpired"),
    ("acme", "erin", "report", "f1", "read", False, "scope folder:f1 vs report"),
    ("acme", "erin", "folder", "f2", "read", False, "scoped to f1 only"),
    ("acme", "erin", "folder", "f1", "write", False, "*:read does not give write"),
    ("acme", "frank", "document", "d1", "read", False, "role without grants"),
    ("acme", "greta", "document", "d3", "write", True, "through group eng"),
    ("acme", "greta", "document", "d4", "write", False, "group scope is d3"),
    ("acme", "greta", "report", "r1", "approve", True, "group, inheritance depth 4"),
    ("acme", "greta", "report", "r1", "read", False, "deep chain grants only approve"),
    ("acme", "henry", "document", "d1", "read", False, "expires exactly now = expired"),
    ("acme", "nobody", "document", "d1", "read", False, "unknown user"),
    ("nowhere", "alice", "document", "d1", "read", False, "unknown tenant"),
    ("acme", "ivan", "document", "d1", "read", False, "user of another tenant"),
    ("other", "ivan", "anything", "x", "anything", True, "*:* superuser"),
    ("other", "alice", "document", "d1", "read", False, "tenants do not share users"),
]


@pytest.fixture
async def acme(pg: asyncpg.Connection) -> asyncpg.Connection:
    script = DATA
    for n, moment in ((1, PAST), (2, FUTURE), (3, T0)):
        script = script.replace(f"${n}", f"'{moment.isoformat()}'::timestamptz")
    await pg.execute(script)
    return pg


@pytest.mark.parametrize(("tenant", "user", "rtype", "rid", "action", "expected", "why"), CASES)
async def test_check(
    acme: asyncpg.Connection, tenant: str, user: str, rtype: str, rid: str, action: str,
    expected: bool, why: str,
) -> None:
    got = await acme.fetchval(
        "SELECT pdp.check($1, $2, $3, $4, $5, $6)", tenant, user, rtype, rid, action, T0
    )
    assert got is expected, why


async def test_check_defaults_to_now(acme: asyncpg.Connection) -> None:
    # erin's grant expires at T0 + 1 day, long past by the time this runs.
    assert await acme.fetchval("SELECT pdp.check('acme', 'erin', 'folder', 'f1', 'read')") is False
    assert await acme.fetchval("SELECT pdp.check('acme', 'alice', 'document', 'x', 'read')") is True


GRANTED = ("acme", "alice", "document", "x", "read")  # tenant-wide admin: document:*


@pytest.mark.parametrize(
    "position",
    [
        pytest.param(0, id="tenant"),
        pytest.param(1, id="user"),
        pytest.param(2, id="resource type"),
        pytest.param(3, id="resource id"),
        pytest.param(4, id="action"),
        pytest.param(5, id="time"),
    ],
)
async def test_null_arguments_deny(acme: asyncpg.Connection, position: int) -> None:
    """A NULL is an unknown: denied (revision 0002; before it a NULL id matched `*`)."""
    sql = "SELECT pdp.check($1, $2, $3, $4, $5, $6)"
    explain = "SELECT count(*) FROM pdp.explain($1, $2, $3, $4, $5, $6)"
    assert await acme.fetchval(sql, *GRANTED, T0) is True  # the same request, all set
    assert await acme.fetchval(explain, *GRANTED, T0) > 0
    args: list[object] = [*GRANTED, T0]
    args[position] = None
    assert await acme.fetchval(sql, *args) is False
    assert await acme.fetchval(explain, *args) == 0


async def test_explain_names_the_path(acme: asyncpg.Connection) -> None:
    rows = await acme.fetch(
        "SELECT * FROM pdp.explain('acme', 'greta', 'report', 'r1', 'approve', $1)", T0
    )
    assert [tuple(r) for r in rows] == [
        ("deep1", ["deep1", "deep2", "deep3", "deep4"], "report:approve", "ops", "*", FUTURE, None)
    ]  # the last column: the grant's condition (NULL: unconditional)
    rows = await acme.fetch(
        "SELECT role_id, path, permission, via_group, scope "
        "FROM pdp.explain('acme', 'alice', 'document', 'd1', 'read', $1)", T0
    )
    # Every matching way, shortest path first: admin's own document:*, then via editor.
    assert [tuple(r) for r in rows] == [
        ("admin", ["admin"], "document:*", None, "*"),
        ("admin", ["admin", "editor", "viewer"], "document:read", None, "*"),
    ]


@pytest.mark.parametrize(("tenant", "user", "rtype", "rid", "action", "expected", "why"), CASES)
async def test_explain_agrees_with_check(
    acme: asyncpg.Connection, tenant: str, user: str, rtype: str, rid: str, action: str,
    expected: bool, why: str,
) -> None:
    rows = await acme.fetch(
        "SELECT * FROM pdp.explain($1, $2, $3, $4, $5, $6)", tenant, user, rtype, rid, action, T0
    )
    assert bool(rows) is expected, why
