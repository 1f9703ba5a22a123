"""Property tests: random tenants and change batches against a naive reference rule.

The reference (`oracle`) restates the rule the SQL check implements, straight from the
rows, with no precomputation; the engine must give the same decision, reason fields
included, whether it was built fresh or brought there by applying change batches.
"""

from __future__ import annotations

import itertools
from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st

from pdp.engine import COLUMNS, KEY_WIDTH, Decision, Engine, Row, RowChange, Snapshot

TENANTS = ("t1", "t2")
USERS = ("u1", "u2", "u3")
GROUPS = ("g1", "g2", "g3")
ROLES = ("r1", "r2", "r3", "r4")
PERMS = ("doc:read", "doc:write", "doc:*", "*:read", "*:*", "img:read")
SCOPES = ("*", "doc:*", "doc:1", "doc:2", "img:*", "img:1")
EXPIRES = (None, 10.0, 20.0)
NOWS = (10.0, 15.0)
RESOURCES = (("doc", "1"), ("doc", "2"), ("img", "1"))
ACTIONS = ("read", "write")
REV = Snapshot(1, 1, frozenset())
Model = dict[str, dict[tuple[str, ...], Row]]

_s = st.sampled_from
ROW = {
    "tenants": st.tuples(_s(TENANTS)),
    "users": st.tuples(_s(TENANTS), _s(USERS), _s(("active", "disabled"))),
    "groups": st.tuples(_s(TENANTS), _s(GROUPS)),
    "group_members": st.tuples(_s(TENANTS), _s(GROUPS), _s(USERS)),
    "roles": st.tuples(_s(TENANTS), _s(ROLES)),
    "role_inherits": st.tuples(_s(TENANTS), _s(ROLES), _s(ROLES)),
    "role_permissions": st.tuples(_s(TENANTS), _s(ROLES), _s(PERMS)),
    "user_roles": st.tuples(_s(TENANTS), _s(USERS), _s(ROLES), _s(SCOPES), _s(EXPIRES)),
    "group_roles": st.tuples(_s(TENANTS), _s(GROUPS), _s(ROLES), _s(SCOPES), _s(EXPIRES)),
    "resources": st.tuples(_s(TENANTS), _s(("doc", "img")), _s(("1", "2")), _s(("{}", '{"a": 1}'))),
}
# Mostly tenant-1 rows, so that tenants are dense enough to grant things.
ROW_CHOICE = st.sampled_from([e for e in COLUMNS for _ in range(1 if e == "tenants" else 3)])


def _maybe(draw: st.DrawFn, p_out_of_8: int) -> bool:
    return draw(st.integers(0, 7)) < p_out_of_8


def _pairs(
    draw: st.DrawFn, a: tuple[str, ...], b: tuple[str, ...], n: int
) -> list[tuple[str, str]]:
    return draw(st.lists(st.tuples(_s(a), _s(b)), min_size=n // 3, max_size=n))


@st.composite
def tenant_rows(draw: st.DrawFn, tenant: str) -> list[tuple[str, Row]]:
    """A dense tenant: most users, roles and groups exist, so that many checks grant."""
    out: list[tuple[str, Row]] = [("tenants", (tenant,))] if _maybe(draw, 7) else []
    status = _s(("active", "active", "active", "disabled"))
    out += [("users", (tenant, u, draw(status))) for u in USERS if _maybe(draw, 7)]
    out += [("roles", (tenant, r)) for r in ROLES if _maybe(draw, 7)]
    out += [("groups", (tenant, g)) for g in GROUPS if _maybe(draw, 6)]
    out += [("role_permissions", (tenant, *p)) for p in _pairs(draw, ROLES, PERMS, 8)]
    out += [("role_inherits", (tenant, *p)) for p in _pairs(draw, ROLES, ROLES, 5)]
    out += [("group_members", (tenant, *p)) for p in _pairs(draw, GROUPS, USERS, 6)]
    grant = st.tuples(_s(ROLES), _s(SCOPES), _s(EXPIRES))
    for holder, ids, n in (("user_roles", USERS, 8), ("group_roles", GROUPS, 6)):
        holders = st.lists(st.tuples(_s(ids), grant), min_size=n // 3, max_size=n)
        for who, (role, scope, expires) in draw(holders):
            out.append((holder, (tenant, who, role, scope, expires)))
    return out


@st.composite
def rows(draw: st.DrawFn) -> list[tuple[str, Row]]:
    """Tenant t1 dense, t2 sometimes, plus stray rows of any kind (missing parents)."""
    out = draw(tenant_rows("t1"))
    if _maybe(draw, 4):
        out += draw(tenant_rows("t2"))
    for entity in draw(st.lists(ROW_CHOICE, max_size=6)):
        out.append((entity, draw(ROW[entity])))
    return out


@st.composite
def change(draw: st.DrawFn) -> RowChange:
    entity = draw(ROW_CHOICE)
    row = draw(ROW[entity])
    if draw(st.integers(0, 2)) == 0:
        return RowChange.delete(entity, tuple(str(f) for f in row[: KEY_WIDTH[entity]]))
    return RowChange.upsert(entity, row)


def model_of(data: list[tuple[str, Row]]) -> Model:
    model: Model = {e: {} for e in COLUMNS}
    for entity, row in data:
        model[entity][tuple(str(f) for f in row[: KEY_WIDTH[entity]])] = row
    return model


def apply_to_model(model: Model, batch: list[RowChange]) -> None:
    for c in batch:
        if c.row is not None:
            model[c.entity][c.key] = c.row
        elif c.entity == "tenants":  # ON DELETE CASCADE
            for table in model.values():
                for key in [k for k in table if k[0] == c.key[0]]:
                    del table[key]
        else:
            model[c.entity].pop(c.key, None)


def tables_of(model: Model) -> dict[str, list[Row]]:
    return {e: list(t.values()) for e, t in model.items()}


def built_then_changed(
    data: list[tuple[str, Row]], batches: list[list[RowChange]]
) -> tuple[Engine, Model]:
    """An engine built from `data`, then given `batches` (at revisions 2, 3, ...), and
    the model of the rows it must then hold."""
    model = model_of(data)
    engine = Engine.build(tables_of(model), REV)
    for i, batch in enumerate(batches):
        engine.apply(batch, Snapshot(2 + i, 2 + i))
        apply_to_model(model, batch)
    return engine, model


def _rank(scope: str) -> int:
    return 2 if scope == "*" else 1 if scope.endswith(":*") else 0


def _path(rows: list[Row], roles: set[str], start: str, perm: str) -> tuple[str, ...] | None:
    """BFS (children in sorted order) from `start` to a role holding `perm` directly."""
    held = {(r[1], r[2]) for r in rows if r[0] == "perm"}
    edges = {(r[1], r[2]) for r in rows if r[0] == "edge"}
    came: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if (node, perm) in held:
            chain = [node]
            while (prev := came[chain[-1]]) is not None:
                chain.append(prev)
            return tuple(reversed(chain))
        for child in sorted(c for (p, c) in edges if p == node and c in roles):
            if child not in came:
                came[child] = node
                queue.append(child)
    return None


def oracle(
    model: Model, tenant: str, user: str, rtype: str, rid: str, action: str, now: float
) -> Decision:
    """The rule as the SQL check states it, over raw rows, no precomputation."""
    if (tenant,) not in model["tenants"]:
        return Decision(False, "unknown_tenant")
    user_row = model["users"].get((tenant, user))
    if user_row is None:
        return Decision(False, "unknown_user")
    if user_row[2] != "active":
        return Decision(False, "user_disabled")
    roles = {k[1] for k in model["roles"] if k[0] == tenant}
    groups = {k[1] for k in model["groups"] if k[0] == tenant}
    graph: list[Row] = [("perm", k[1], k[2]) for k in model["role_permissions"] if k[0] == tenant]
    graph += [("edge", k[1], k[2]) for k in model["role_inherits"] if k[0] == tenant]
    mine = {k[1] for k in model["group_members"] if k[0] == tenant and k[2] == user}
    assigned: list[tuple[int, str, str, float | None, str | None]] = [
        (0, str(r[2]), str(r[3]), _float(r[4]), None)
        for k, r in model["user_roles"].items()
        if k[0] == tenant and k[1] == user
    ]
    assigned += [
        (1, str(r[2]), str(r[3]), _float(r[4]), str(r[1]))
        for k, r in model["group_roles"].items()
        if k[0] == tenant and k[1] in mine and k[1] in groups
    ]
    scopes = (f"{rtype}:{rid}", f"{rtype}:*", "*")
    wanted = (f"{rtype}:{action}", f"{rtype}:*", f"*:{action}", "*:*")
    live: list[tuple[tuple[int, int, str, str], Decision]] = []
    expired = False
    for source, role, scope, expires, via in assigned:
        if scope not in scopes or role not in roles:
            continue
        paths = [(p, _path(graph, roles, role, p)) for p in wanted]
        hits = [(p, path) for p, path in paths if path is not None]
        if not hits:
            continue
        if expires is not None and expires <= now:
            expired = True
            continue
        perm, path = hits[0]
        decision = Decision(True, "granted", role, path, perm, via, scope, expires)
        live.append(((source, _rank(scope), role, via or ""), decision))
    if not live:
        return Decision(False, "expired" if expired else "no_grant")
    return min(live, key=lambda x: x[0])[1]


def _float(value: object) -> float | None:
    assert value is None or isinstance(value, float)
    return value


GRID = list(itertools.product((*TENANTS, "t9"), (*USERS, "u9"), RESOURCES, ACTIONS, NOWS))


def assert_matches(engine: Engine, model: Model) -> None:
    for tenant, user, (rtype, rid), action, now in GRID:
        expected = oracle(model, tenant, user, rtype, rid, action, now)
        assert engine.check(tenant, user, rtype, rid, action, now) == expected


def assert_reverse_agrees(engine: Engine) -> None:
    """Reverse queries return exactly what check allows (flags stand for the unbounded)."""
    for tenant, now in itertools.product((*TENANTS, "t9"), NOWS):
        for (rtype, rid), action in itertools.product(RESOURCES, ACTIONS):
            allowed = {u for u in USERS if engine.check(tenant, u, rtype, rid, action, now).allowed}
            assert set(engine.subjects(tenant, rtype, rid, action, now)) == allowed
        for user, (rtype, rid) in itertools.product(USERS, RESOURCES):
            result = engine.actions(tenant, user, rtype, rid, now)
            for action in (*ACTIONS, "zzz"):
                ok = engine.check(tenant, user, rtype, rid, action, now).allowed
                assert ok == (action in result.actions or result.all_actions)
        for user, rtype, action in itertools.product(USERS, ("doc", "img"), ACTIONS):
            found = engine.resources(tenant, user, rtype, action, now)
            for rid in ("1", "2", "zzz"):
                ok = engine.check(tenant, user, rtype, rid, action, now).allowed
                assert ok == (rid in found.ids or found.all_resources)


@settings(deadline=None, max_examples=150)
@given(rows())
def test_fresh_build_matches_oracle(data: list[tuple[str, Row]]) -> None:
    model = model_of(data)
    engine = Engine.build(tables_of(model), REV)
    assert_matches(engine, model)
    assert_reverse_agrees(engine)


@settings(deadline=None, max_examples=120)
@given(rows(), st.lists(st.lists(change(), max_size=12), min_size=1, max_size=4))
def test_applied_batches_match_fresh_build(
    data: list[tuple[str, Row]], batches: list[list[RowChange]]
) -> None:
    model = model_of(data)
    engine = Engine.build(tables_of(model), REV)
    for i, batch in enumerate(batches):
        assert engine.apply(batch, Snapshot(i + 2, i + 2, frozenset())) == len(batch)
        apply_to_model(model, batch)
    fresh = Engine.build(tables_of(model), engine.revision)
    for tenant in (*TENANTS, "t9"):
        assert engine.digest(tenant) == fresh.digest(tenant)
    assert engine.counts() == fresh.counts()
    assert engine.tenants() == fresh.tenants()
    for tenant, user, (rtype, rid), action, now in GRID:
        decision = engine.check(tenant, user, rtype, rid, action, now)
        assert decision == fresh.check(tenant, user, rtype, rid, action, now)
    assert_matches(engine, model)
    assert_reverse_agrees(engine)
