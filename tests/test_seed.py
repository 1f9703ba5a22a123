"""`pdp seed`: the pure generator, the COPY loader and the command, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime
from typing import TypedDict

import asyncpg
import pytest

from pdp.cli import main
from pdp.errors import UserError
from pdp.pg import seed, seed_data
from pdp.pg.seed_data import COLUMNS, TABLES, Row, SeedSpec

from .conftest import DatabaseFactory


def materialize(dataset: seed_data.Dataset) -> dict[str, list[Row]]:
    rows: dict[str, list[Row]] = {table: [] for table in TABLES}
    for tenant_id in dataset.tenant_ids:
        for table, it in dataset.tables(tenant_id).items():
            rows[table].extend(it)
    return rows


async def counts(pg: asyncpg.Connection) -> dict[str, int]:
    return {table: await pg.fetchval(f"SELECT count(*) FROM pdp.{table}") for table in TABLES}


async def digest(url: str) -> dict[str, str]:
    """md5 of each table's loaded columns, rows in a stable order."""
    conn = await asyncpg.connect(url)
    try:
        result = {}
        for table, columns in COLUMNS.items():
            row = f"row({', '.join(columns)})::text"
            result[table] = await conn.fetchval(
                f"SELECT md5(coalesce(string_agg({row}, E'\\n' ORDER BY {row}), ''))"
                f" FROM pdp.{table}"
            )
        return result
    finally:
        await conn.close()


# --- the pure generator --------------------------------------------------------------


def test_generator_is_deterministic_per_seed() -> None:
    spec = SeedSpec(tenants=2, users=300, seed=7)
    first = materialize(seed_data.synthetic(spec))
    assert first == materialize(seed_data.synthetic(spec))
    other = materialize(seed_data.synthetic(SeedSpec(tenants=2, users=300, seed=8)))
    assert other != first
    assert other["user_roles"] != first["user_roles"]


def test_tables_are_independent_iterators() -> None:
    # Any order of consumption gives the same rows: each table has its own stream.
    spec = SeedSpec(users=200)
    forward = {t: list(it) for t, it in seed_data.tenant_tables(spec, "tenant-1").items()}
    tables = seed_data.tenant_tables(spec, "tenant-1")
    backward = {t: list(tables[t]) for t in reversed(TABLES)}
    assert all(forward[t] for t in TABLES)  # two empty streams would be equal too
    assert forward == backward


def test_roles_inherit_only_lower_levels() -> None:
    plan = seed_data.role_plan(SeedSpec(roles=40), "tenant-1")
    level = dict(zip(plan.ids, plan.levels, strict=True))
    assert all(level[parent] < level[role] for role, parent in plan.inherits)
    assert max(plan.levels) == seed_data.MAX_DEPTH
    grants = {grant for _, grant in plan.permissions}
    assert {"*:*", "*:read"} <= grants
    assert any(g.endswith(":*") and not g.startswith("*") for g in grants)
    assert sum(grant == "*:*" for _, grant in plan.permissions) == 1


def test_group_sizes_are_skewed() -> None:
    rows = list(seed_data.tenant_tables(SeedSpec(users=5000), "tenant-1")["group_members"])
    sizes = sorted(Counter(r[1] for r in rows).values())
    assert sizes[-1] > 10 * sizes[len(sizes) // 2]


class SpecArgs(TypedDict, total=False):
    users: int
    tenants: int
    groups: int
    tenant_prefix: str


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"users": 0}, "--users must be at least 1"),
        ({"tenants": -1}, "--tenants must be at least 1"),
        ({"groups": 0}, "--groups must be at least 1"),
        ({"tenant_prefix": ""}, "--tenant-prefix"),
        ({"tenant_prefix": "x" * 300}, "--tenant-prefix"),
    ],
)
def test_bad_sizes_are_user_errors(spec: SpecArgs, message: str) -> None:
    with pytest.raises(UserError, match=message):
        SeedSpec(**spec)


# --- loading -------------------------------------------------------------------------


async def test_load_is_deterministic(make_db: DatabaseFactory) -> None:
    spec = SeedSpec(tenants=2, users=400, seed=3)
    urls = [await make_db.create(), await make_db.create()]
    for url in urls:
        await seed.load(url, seed_data.synthetic(spec))
    first, second = [await digest(url) for url in urls]
    empty = hashlib.md5(b"").hexdigest()  # noqa: S324 -- what digest() gives an empty table
    assert empty not in first.values()  # every table loaded: equal digests mean equal rows
    assert first == second


async def test_counts_and_shares(db_url: str, pg: asyncpg.Connection) -> None:
    spec = SeedSpec(tenants=2, users=2000, roles=40, as_of=date(2026, 6, 1))
    summaries = await seed.load(db_url, seed_data.synthetic(spec))

    loaded = await counts(pg)
    assert [s.tenant_id for s in summaries] == ["tenant-1", "tenant-2"]
    assert {t: sum(dict(s.counts)[t] for s in summaries) for t in TABLES} == loaded
    assert loaded["tenants"] == 2
    assert loaded["users"] == 2 * 2000
    assert loaded["groups"] == 2 * 40
    assert loaded["roles"] == 2 * 40
    assert 2000 < loaded["user_roles"] < 4 * 2000
    assert loaded["group_members"] > 2000
    assert summaries[0].line().startswith("tenant-1: users=2000 groups=40 ")

    disabled = await pg.fetchval("SELECT avg((status = 'disabled')::int) FROM pdp.users")
    assert 0.015 < disabled < 0.05
    as_of = datetime(2026, 6, 1, tzinfo=UTC)
    expiring, expired = await pg.fetchrow(
        "SELECT avg((expires_at IS NOT NULL)::int), "
        "       avg((expires_at < $1)::int) FILTER (WHERE expires_at IS NOT NULL)"
        " FROM (SELECT expires_at FROM pdp.user_roles"
        "       UNION ALL SELECT expires_at FROM pdp.group_roles) a",
        as_of,
    )
    assert 0.035 < expiring < 0.065
    assert 0.15 < expired < 0.45  # some in the past, most in the future

    scopes = await pg.fetchrow(
        "SELECT avg((scope = '*')::int) AS tenant_wide,"
        "       avg((scope LIKE '%:*')::int) AS type_wide,"
        "       avg((scope ~ '^(document|project):[0-9]+$')::int) AS doc_or_project"
        " FROM pdp.user_roles"
    )
    assert scopes["tenant_wide"] > 0.05
    assert scopes["type_wide"] > 0.05
    assert scopes["doc_or_project"] > 0.3
    per_user = await pg.fetch(
        "SELECT n, count(*) FROM (SELECT count(ur.role_id) AS n FROM pdp.users u"
        " LEFT JOIN pdp.user_roles ur ON ur.tenant_id = u.tenant_id AND ur.user_id = u.id"
        " GROUP BY u.tenant_id, u.id) c GROUP BY n"
    )
    histogram = {r["n"]: r["count"] for r in per_user}
    assert max(histogram) <= 3
    assert sum(histogram.get(n, 0) for n in (1, 2, 3)) > 0.8 * 4000


async def test_inheritance_is_acyclic_and_at_most_four_deep(
    db_url: str, pg: asyncpg.Connection
) -> None:
    await seed.load(db_url, seed_data.synthetic(SeedSpec(tenants=3, users=50, roles=60)))
    walk = """
        WITH RECURSIVE walk(tenant_id, node, depth, path, cyclic) AS (
            SELECT tenant_id, id, 0, ARRAY[id], false FROM pdp.roles
            UNION ALL
            SELECT w.tenant_id, ri.inherits_id, w.depth + 1, w.path || ri.inherits_id,
                   ri.inherits_id = ANY (w.path)
            FROM walk w
            JOIN pdp.role_inherits ri ON ri.tenant_id = w.tenant_id AND ri.role_id = w.node
            WHERE NOT w.cyclic
        )
        SELECT max(depth), bool_or(cyclic) FROM walk"""
    depth, cyclic = await pg.fetchrow(walk)
    assert depth == 4
    assert cyclic is False


# --- change capture ------------------------------------------------------------------


async def test_load_writes_one_bulk_load_marker_per_tenant_and_notifies(
    db_url: str, pg: asyncpg.Connection
) -> None:
    listener = await asyncpg.connect(db_url)
    notified = asyncio.Event()
    try:
        await listener.add_listener("pdp_changes", lambda *_: notified.set())
        await seed.load(db_url, seed_data.synthetic(SeedSpec(tenants=2, users=100)))
        await asyncio.wait_for(notified.wait(), 5)
    finally:
        await listener.close()
    log = await pg.fetch(
        "SELECT tenant_id, entity, op, actor, key FROM pdp.change_log ORDER BY tenant_id"
    )
    assert [tuple(r) for r in log] == [
        ("tenant-1", "tenants", "bulk_load", "pdp seed", None),
        ("tenant-2", "tenants", "bulk_load", "pdp seed", None),
    ]


async def test_existing_tenant_needs_replace(db_url: str, pg: asyncpg.Connection) -> None:
    await pg.execute("INSERT INTO pdp.tenants (id, name) VALUES ('tenant-2', 'mine')")
    last = await pg.fetchval("SELECT max(id) FROM pdp.change_log")
    dataset = seed_data.synthetic(SeedSpec(tenants=3, users=30))

    with pytest.raises(UserError, match=r"tenant already exists: tenant-2 \(use --replace"):
        await seed.load(db_url, dataset)
    assert await counts(pg) == {t: int(t == "tenants") for t in TABLES}
    assert await pg.fetchval("SELECT max(id) FROM pdp.change_log") == last

    await seed.load(db_url, dataset, replace=True)
    name = await pg.fetchval("SELECT name FROM pdp.tenants WHERE id = 'tenant-2'")
    assert name == "Synthetic tenant tenant-2"
    assert (await counts(pg))["users"] == 3 * 30
    new = await pg.fetch(
        "SELECT tenant_id, op, actor FROM pdp.change_log WHERE id > $1 ORDER BY id", last
    )
    # The delete is captured like any write; the load itself only by its markers.
    assert [tuple(r) for r in new] == [
        ("tenant-2", "delete", "pdp seed"),
        ("tenant-1", "bulk_load", "pdp seed"),
        ("tenant-2", "bulk_load", "pdp seed"),
        ("tenant-3", "bulk_load", "pdp seed"),
    ]


async def test_missing_schema_is_a_user_error(empty_db_url: str) -> None:
    with pytest.raises(UserError, match=r"^pdp schema not found: run `pdp migrate` first$"):
        await seed.load(empty_db_url, seed_data.demo())


# --- the demo tenant -----------------------------------------------------------------

DEMO_DECISIONS = [
    ("alice", "document", "roadmap", "delete", True),
    ("alice", "invoice", "q3", "read", True),
    ("alice", "invoice", "q3", "write", False),
    ("bob", "document", "roadmap", "write", True),
    ("bob", "folder", "specs", "read", True),
    ("bob", "document", "roadmap", "delete", False),
    ("carol", "document", "roadmap", "read", True),
    ("carol", "document", "roadmap", "write", False),
    ("carol", "document", "budget", "read", False),
    ("dave", "document", "roadmap", "read", False),
    ("erin", "document", "roadmap", "read", False),
    ("mallory", "document", "roadmap", "read", False),
]


async def test_demo_tenant(db_url: str, pg: asyncpg.Connection) -> None:
    (summary,) = await seed.load(db_url, seed_data.demo())
    assert summary.line() == (
        "demo: users=5 groups=1 group_members=1 roles=3 role_inherits=2 role_permissions=7"
        " user_roles=4 group_roles=1"
    )
    answers = [
        await pg.fetchval("SELECT pdp.check('demo', $1, $2, $3, $4)", user, kind, rid, action)
        for user, kind, rid, action, _ in DEMO_DECISIONS
    ]
    assert answers == [expected for *_, expected in DEMO_DECISIONS]


# --- the command ---------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """main() configures the root logger (force=True); put the test runner's back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
async def test_cli_seed(
    db_url: str,
    pg: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PDP_DATABASE_URL", db_url)
    # main() runs its own event loop: give it a thread.
    assert await asyncio.to_thread(main, ["seed", "--users", "50"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tenant-1: users=50 groups=1 group_members=")
    assert out.count("\n") == 1
    assert await pg.fetchval("SELECT count(*) FROM pdp.users WHERE tenant_id = 'tenant-1'") == 50

    assert await asyncio.to_thread(main, ["seed", "--users", "50"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (
        "pdp: error: tenant already exists: tenant-1 (use --replace to delete and reload it)"
    )

    assert await asyncio.to_thread(main, ["seed", "--demo", "--users", "5"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "pdp: error: --demo takes no --users"

    assert await asyncio.to_thread(main, ["seed", "--demo"]) == 0
    assert capsys.readouterr().out.startswith("demo: users=5 ")


@pytest.mark.usefixtures("restore_logging")
def test_cli_unknown_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["seed", "--bogus"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "unrecognized arguments: --bogus" in err


def test_cli_help_lists_demo_users(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["seed", "--help"])
    out = capsys.readouterr().out
    for name in ("alice", "bob", "carol", "dave", "erin", "engineering", "document:roadmap"):
        assert name in out
