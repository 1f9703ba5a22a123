"""The in-memory engine agrees with the SQL reference `pdp.check` on random tenants.

Hypothesis generates tenants (users, groups, roles with inheritance, wildcard
grants, scoped and expiring assignments, disabled users), writes them to a real
PostgreSQL, and compares every answer of a grid of checks; then it applies random
change batches in SQL (cascades included), feeds the engine the row differences,
and compares again. Grants may carry conditions from a family of realistic expressions
(ownership, property equality, `in` lists, time windows, missing properties, one that
does not compile): where `pdp.check` is undecided (NULL), the SQL side's answer is
`pdp.check_candidates` evaluated by the fallback's evaluator.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdp.conditions import Facts
from pdp.engine import COLUMNS, KEY_WIDTH, Engine, Row, RowChange, Snapshot
from sync import pg_queries as q
from sync.pg_fallback import any_condition_true

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
NOW = T0.timestamp()
# Far-future expiries too, past 2^53 microseconds, where epoch seconds as a float8 no
# longer hold every microsecond (the digest must render what the engine holds, on both
# sides); and the infinities, which asyncpg writes for datetime.max and datetime.min.
FAR = [datetime(9999, 12, 31, 23, 59, 59, 999998, tzinfo=UTC), datetime(2400, 1, 1, 0, 0, 0, 123457, tzinfo=UTC)]
INFINITIES = [datetime.max.replace(tzinfo=UTC), datetime.min.replace(tzinfo=UTC)]
EXPIRIES = [None, None, None, T0 - timedelta(hours=1), T0, T0 + timedelta(hours=1), *FAR, *INFINITIES]
TYPES = ["doc", "folder", "report"]
IDS = ["1", "2"]
ACTIONS = ["read", "write", "delete"]
PERMISSIONS = [f"{t}:{a}" for t in ["doc", "folder", "*"] for a in ["read", "write", "*"]]
SCOPES = ["*", "doc:*", "doc:1", "doc:2", "folder:*", "folder:1", "report:2"]
REVISION = Snapshot(1, 1)

USERS = [f"u{i}" for i in range(5)]
CONDITIONS = [
    None, None, None,
    "resource.properties.owner == subject.attributes.email",  # ownership
    "resource.properties.status == 'draft'",  # property equality
    "subject.attributes.region in ['eu', 'us']",  # an `in` list
    "now < timestamp('2026-06-01T12:30:00Z')",  # a window that is open at T0
    "now >= timestamp('2026-06-02T00:00:00Z')",  # one that is not yet
    "has(resource.properties.level) && resource.properties.level > 2",  # missing properties
    "action.properties.soft == true",
    "resource.properties.owner ==",  # does not compile: never grants
]
ATTRIBUTES = ['{}', '{"email": "u1@t", "region": "eu"}', '{"email": "u2@t", "region": "ap"}']
RESOURCE_ATTRIBUTES = ['{}', '{"owner": "u1@t", "status": "draft"}', '{"owner": "u2@t", "level": 3}']
FACTS = [
    None,
    Facts(resource={"owner": "u2@t", "status": "final"}, action={"soft": True}),
    Facts(resource={"level": 1}, action={"soft": False}, context={"ip": "10.0.0.1"}),
]
GROUPS = ["g0", "g1", "g2"]
ROLES = [f"r{i}" for i in range(6)]


@st.composite
def tenants(draw: st.DrawFn) -> dict[str, list[tuple[object, ...]]]:
    """Rows (without tenant id) of one random tenant."""
    edges = [(a, b) for a, b in itertools.combinations(ROLES, 2)]  # r_i inherits r_j, i < j
    expiry = st.sampled_from(EXPIRIES)
    return {
        "users": [(u, draw(st.sampled_from(["active", "active", "disabled"])), draw(st.sampled_from(ATTRIBUTES))) for u in USERS[:-1]],
        "groups": [(g,) for g in GROUPS],
        "group_members": draw(st.lists(st.tuples(st.sampled_from(GROUPS), st.sampled_from(USERS[:-1])), unique=True, max_size=6)),
        "roles": [(r,) for r in ROLES],
        "role_inherits": draw(st.lists(st.sampled_from(edges), unique=True, max_size=5)),
        "role_permissions": draw(st.lists(st.tuples(st.sampled_from(ROLES), st.sampled_from(PERMISSIONS), st.sampled_from(CONDITIONS)), unique_by=lambda x: x[:2], max_size=8)),
        "user_roles": draw(st.lists(st.tuples(st.sampled_from(USERS[:-1]), st.sampled_from(ROLES), st.sampled_from(SCOPES), expiry), unique_by=lambda x: x[:3], max_size=6)),
        "group_roles": draw(st.lists(st.tuples(st.sampled_from(GROUPS), st.sampled_from(ROLES), st.sampled_from(SCOPES), expiry), unique_by=lambda x: x[:3], max_size=4)),
        "resources": draw(st.lists(st.tuples(st.sampled_from(TYPES), st.sampled_from(IDS), st.sampled_from(RESOURCE_ATTRIBUTES)), unique_by=lambda x: x[:2], max_size=4)),
    }


# A change is a SQL statement over the tenant's rows; cascades happen in the database.
CHANGE_SQL = st.one_of(
    st.tuples(st.just("DELETE FROM pdp.group_members WHERE tenant_id = $1 AND user_id = $2"), st.sampled_from(USERS)),
    st.tuples(st.just("INSERT INTO pdp.group_members SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM pdp.groups WHERE tenant_id = $1 AND id = $2) AND EXISTS (SELECT 1 FROM pdp.users WHERE tenant_id = $1 AND id = $3) ON CONFLICT DO NOTHING"), st.sampled_from(GROUPS), st.sampled_from(USERS[:-1])),
    st.tuples(st.just("DELETE FROM pdp.roles WHERE tenant_id = $1 AND id = $2"), st.sampled_from(ROLES)),
    st.tuples(st.just("DELETE FROM pdp.role_inherits WHERE tenant_id = $1 AND role_id = $2"), st.sampled_from(ROLES)),
    st.tuples(st.just("INSERT INTO pdp.role_permissions SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM pdp.roles WHERE tenant_id = $1 AND id = $2) ON CONFLICT DO NOTHING"), st.sampled_from(ROLES), st.sampled_from(PERMISSIONS)),
    st.tuples(st.just("DELETE FROM pdp.role_permissions WHERE tenant_id = $1 AND permission = $2"), st.sampled_from(PERMISSIONS)),
    st.tuples(st.just("UPDATE pdp.users SET status = CASE status WHEN 'active' THEN 'disabled' ELSE 'active' END WHERE tenant_id = $1 AND id = $2"), st.sampled_from(USERS)),
    st.tuples(st.just("DELETE FROM pdp.users WHERE tenant_id = $1 AND id = $2"), st.sampled_from(USERS)),
    st.tuples(st.just("UPDATE pdp.user_roles SET scope = $2 WHERE ctid = (SELECT ur.ctid FROM pdp.user_roles ur WHERE ur.tenant_id = $1 AND ur.user_id = $3 AND NOT EXISTS (SELECT 1 FROM pdp.user_roles x WHERE x.tenant_id = $1 AND x.user_id = $3 AND x.role_id = ur.role_id AND x.scope = $2) LIMIT 1)"), st.sampled_from(SCOPES), st.sampled_from(USERS)),
    st.tuples(st.just("UPDATE pdp.group_roles SET expires_at = NULL WHERE tenant_id = $1 AND group_id = $2"), st.sampled_from(GROUPS)),
    st.tuples(st.just("DELETE FROM pdp.groups WHERE tenant_id = $1 AND id = $2"), st.sampled_from(GROUPS)),
    st.tuples(st.just("UPDATE pdp.role_permissions SET condition = $2 WHERE tenant_id = $1 AND permission = $3"), st.sampled_from(CONDITIONS), st.sampled_from(PERMISSIONS)),
    st.tuples(st.just("UPDATE pdp.resources SET attributes = $2::jsonb WHERE tenant_id = $1"), st.sampled_from(RESOURCE_ATTRIBUTES)),
)

_counter = itertools.count()


async def _insert(pg: asyncpg.Connection, tenant: str, data: dict[str, list[tuple[object, ...]]]) -> None:
    await pg.execute("INSERT INTO pdp.tenants (id) VALUES ($1)", tenant)
    for entity in ("users", "groups", "group_members", "roles", "role_inherits", "role_permissions", "user_roles", "group_roles", "resources"):
        rows = data[entity]
        if not rows:
            continue
        cols = COLUMNS[entity][1 : 1 + len(rows[0])]
        await pg.copy_records_to_table(entity, schema_name="pdp", columns=["tenant_id", *cols], records=[(tenant, *r) for r in rows])


async def _rows(pg: asyncpg.Connection, tenant: str) -> dict[str, list[Row]]:
    return {entity: [tuple(r) for r in await pg.fetch(sql, tenant)] for entity, sql in q.TENANT_ROWS.items()}


def _diff(before: dict[str, list[Row]], after: dict[str, list[Row]]) -> list[RowChange]:
    changes = []
    for entity in COLUMNS:
        width = KEY_WIDTH[entity]
        old = {r[:width]: r for r in before[entity]}
        new = {r[:width]: r for r in after[entity]}
        changes += [RowChange.delete(entity, tuple(map(str, k))) for k in old.keys() - new.keys()]
        changes += [RowChange.upsert(entity, r) for k, r in new.items() if old.get(k) != r]
    return changes


async def _compare(pg: asyncpg.Connection, engine: Engine, tenant: str) -> None:
    grid = list(itertools.product(USERS, TYPES, IDS, ACTIONS))
    oracle = await pg.fetch(
        "SELECT pdp.check($1, u, t, i, a, $2) FROM unnest($3::text[], $4::text[], $5::text[], $6::text[]) AS g(u, t, i, a)",
        tenant, T0, *(list(col) for col in zip(*grid, strict=True)),
    )
    for (user, rtype, rid, action), (sql,) in zip(grid, oracle, strict=True):
        candidates = None
        for facts in FACTS:
            expected = sql
            if sql is None:  # only conditional grants could allow: evaluate them
                if candidates is None:
                    candidates = await pg.fetch(
                        "SELECT condition, user_attributes::text, resource_attributes::text FROM pdp.check_candidates($1, $2, $3, $4, $5, $6)",
                        tenant, user, rtype, rid, action, T0,
                    )
                    assert candidates
                expected = any_condition_true(candidates, facts, user, rtype, rid, action, NOW)
            decision = engine.check(tenant, user, rtype, rid, action, NOW, facts)
            assert decision.allowed is expected, (user, rtype, rid, action, facts, decision)
    # The verifier's SQL digest and the engine's agree on the same rows.
    total, lines = await pg.fetchrow(q.TENANT_DIGEST, tenant)
    assert engine.digest(tenant) == f"{int(total):016x}:{lines}"


@pytest.fixture
async def oracle_db(pg: asyncpg.Connection) -> asyncpg.Connection:
    return pg


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=tenants(), batches=st.lists(st.lists(CHANGE_SQL, min_size=1, max_size=4), max_size=3))
async def test_engine_agrees_with_sql(oracle_db: asyncpg.Connection, data: dict[str, list[tuple[object, ...]]], batches: list[list[tuple[str, ...]]]) -> None:
    pg = oracle_db
    tenant = f"h{next(_counter)}"
    await _insert(pg, tenant, data)
    rows = await _rows(pg, tenant)
    engine = Engine.build(rows, REVISION)
    await _compare(pg, engine, tenant)
    for batch in batches:
        async with pg.transaction():
            for sql, *args in batch:
                await pg.execute(sql, tenant, *args)
        after = await _rows(pg, tenant)
        engine.apply(_diff(rows, after), REVISION)
        rows = after
        await _compare(pg, engine, tenant)
        assert engine.digest(tenant) == Engine.build(after, REVISION).digest(tenant)


async def test_far_future_expiries_digest_alike_in_sql_and_the_engine(pg: asyncpg.Connection) -> None:
    tenant = f"far{next(_counter)}"
    data: dict[str, list[tuple[object, ...]]] = {entity: [] for entity in COLUMNS if entity != "tenants"}
    data["users"] = [("u1", "active", "{}")]
    data["groups"] = [("g0",)]
    data["roles"] = [("r0",)]
    data["role_permissions"] = [("r0", "doc:read", None)]
    data["user_roles"] = [("u1", "r0", f"doc:{i}", at) for i, at in enumerate([*FAR, *INFINITIES])]
    data["group_roles"] = [("g0", "r0", "*", FAR[0])]
    await _insert(pg, tenant, data)
    await pg.execute(  # "never" as SQL writes it: the last microsecond of 9999
        "INSERT INTO pdp.user_roles VALUES ($1, 'u1', 'r0', 'doc:9', '9999-12-31 23:59:59.999999+00')", tenant
    )
    assert await pg.fetchval("SELECT count(*) FROM pdp.user_roles WHERE tenant_id = $1 AND NOT isfinite(expires_at)", tenant) == 2
    engine = Engine.build(await _rows(pg, tenant), REVISION)
    total, lines = await pg.fetchrow(q.TENANT_DIGEST, tenant)
    assert engine.digest(tenant) == f"{int(total):016x}:{lines}"
    for rid, allowed in (("0", True), ("1", True), ("2", True), ("3", False), ("9", True)):  # 2: infinity, 3: -infinity
        assert engine.check(tenant, "u1", "doc", rid, "read", NOW).allowed is allowed, rid
        assert await pg.fetchval("SELECT pdp.check($1, 'u1', 'doc', $2, 'read', $3)", tenant, rid, T0) is allowed, rid
