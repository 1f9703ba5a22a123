"""Applying change batches gives the same engine as building from the resulting rows."""

from __future__ import annotations

import itertools

import pytest

from pdp.engine import COLUMNS, KEY_WIDTH, Engine, Row, RowChange, Snapshot
from pdp.engine.roles import RoleGraph

T = "acme"
REV0 = Snapshot(100, 100, frozenset())
REV1 = Snapshot(105, 107, frozenset({105}))
Model = dict[str, dict[tuple[str, ...], Row]]


def model_of(rows: list[tuple[str, Row]]) -> Model:
    model: Model = {entity: {} for entity in COLUMNS}
    for entity, row in rows:
        model[entity][key_of(entity, row)] = row
    return model


def key_of(entity: str, row: Row) -> tuple[str, ...]:
    return tuple(str(f) for f in row[: KEY_WIDTH[entity]])


def tables_of(model: Model) -> dict[str, list[Row]]:
    return {entity: list(rows.values()) for entity, rows in model.items()}


def apply_to_model(model: Model, changes: list[RowChange]) -> None:
    """What the database holds after the changes (a tenant delete cascades)."""
    for change in changes:
        if change.row is not None:
            model[change.entity][change.key] = change.row
        elif change.entity == "tenants":
            for rows in model.values():
                for key in [k for k in rows if k[0] == change.key[0]]:
                    del rows[key]
        else:
            model[change.entity].pop(change.key, None)


GRID_USERS = ("alice", "bob", "carol", "dave", "nobody")
GRID_RESOURCES = (("doc", "1"), ("doc", "2"), ("img", "1"))
GRID_ACTIONS = ("read", "write", "delete")
GRID_NOWS = (50.0, 150.0)


def assert_same(engine: Engine, model: Model, tenants: tuple[str, ...] = (T, "beta")) -> None:
    """Every check on the grid, every digest and the counts match a fresh build."""
    fresh = Engine.build(tables_of(model), REV1)
    for tenant, user, (rtype, rid), action, now in itertools.product(
        (*tenants, "nope"), GRID_USERS, GRID_RESOURCES, GRID_ACTIONS, GRID_NOWS
    ):
        got = engine.check(tenant, user, rtype, rid, action, now)
        assert got == fresh.check(tenant, user, rtype, rid, action, now), (
            tenant,
            user,
            rtype,
            rid,
            action,
            now,
        )
    for tenant in tenants:
        assert engine.digest(tenant) == fresh.digest(tenant)
    assert engine.counts() == fresh.counts()
    assert engine.tenants() == fresh.tenants()


def up(entity: str, *row: str | float | None) -> RowChange:
    return RowChange.upsert(entity, row)


def rm(entity: str, *key: str) -> RowChange:
    return RowChange.delete(entity, key)


BASE = [
    ("tenants", (T,)),
    ("tenants", ("beta",)),
    ("users", (T, "alice", "active")),
    ("users", (T, "bob", "active")),
    ("users", (T, "carol", "disabled")),
    ("users", ("beta", "alice", "active")),
    ("roles", (T, "viewer")),
    ("roles", (T, "editor")),
    ("roles", (T, "owner")),
    ("roles", (T, "admin")),
    ("role_permissions", (T, "viewer", "doc:read")),
    ("role_permissions", (T, "editor", "doc:write")),
    ("role_permissions", (T, "owner", "doc:*")),
    ("role_permissions", (T, "admin", "*:*")),
    ("role_inherits", (T, "editor", "viewer")),
    ("role_inherits", (T, "owner", "editor")),
    ("groups", (T, "eng")),
    ("groups", (T, "ops")),
    ("group_members", (T, "eng", "alice")),
    ("group_members", (T, "eng", "bob")),
    ("group_members", (T, "ops", "carol")),
    ("group_roles", (T, "eng", "viewer", "doc:*", None)),
    ("group_roles", (T, "ops", "admin", "*", 100.0)),
    ("user_roles", (T, "alice", "owner", "doc:1", None)),
    ("user_roles", (T, "bob", "editor", "doc:2", 100.0)),
    ("roles", ("beta", "viewer")),
    ("role_permissions", ("beta", "viewer", "*:read")),
    ("user_roles", ("beta", "alice", "viewer", "*", None)),
]

BATCHES = {
    "tenant upsert is idempotent": [up("tenants", T)],
    "new tenant": [up("tenants", "gamma"), up("users", "gamma", "alice", "active")],
    "delete tenant": [rm("tenants", T)],
    "delete tenant, children deleted too": [rm("tenants", "beta"), rm("users", "beta", "alice")],
    "disable user": [up("users", T, "alice", "disabled")],
    "delete user": [rm("users", T, "bob")],
    "add user": [up("users", T, "dave", "active"), up("user_roles", T, "dave", "admin", "*", None)],
    "child before parent": [up("user_roles", T, "dave", "viewer", "*", None)],
    "parent after child": [
        up("user_roles", T, "dave", "viewer", "*", None),
        up("users", T, "dave", "active"),
    ],
    "delete inherited role's permission": [rm("role_permissions", T, "viewer", "doc:read")],
    "add permission at the bottom": [up("role_permissions", T, "viewer", "img:read")],
    "remove inheritance edge": [rm("role_inherits", T, "owner", "editor")],
    "add inheritance edge": [up("role_inherits", T, "viewer", "admin")],
    "create a cycle": [up("role_inherits", T, "viewer", "owner")],
    "delete inherited role": [rm("roles", T, "viewer")],
    "delete and re-create role": [rm("roles", T, "editor"), up("roles", T, "editor")],
    "delete group membership": [rm("group_members", T, "eng", "alice")],
    "add group membership": [up("group_members", T, "ops", "alice")],
    "delete group": [rm("groups", T, "eng")],
    "re-create group": [rm("groups", T, "eng"), up("groups", T, "eng")],
    "group role to a new group": [up("group_roles", T, "qa", "admin", "*", None)],
    "group role then group": [
        up("group_roles", T, "qa", "admin", "*", None),
        up("group_members", T, "qa", "bob"),
        up("groups", T, "qa"),
    ],
    "change group role expiry": [up("group_roles", T, "ops", "admin", "*", None)],
    "delete group role": [rm("group_roles", T, "eng", "viewer", "doc:*")],
    "change user role expiry": [up("user_roles", T, "bob", "editor", "doc:2", None)],
    "delete user role": [rm("user_roles", T, "alice", "owner", "doc:1")],
    "delete absent rows": [
        rm("users", T, "zed"),
        rm("user_roles", T, "zed", "x", "*"),
        rm("group_members", T, "zz", "alice"),
        rm("group_roles", T, "zz", "x", "*"),
        rm("role_permissions", T, "zz", "x:y"),
        rm("role_inherits", T, "zz", "yy"),
        rm("roles", T, "zz"),
        rm("groups", T, "zz"),
        rm("tenants", "zz"),
        rm("users", "zz", "alice"),
    ],
    "upsert then delete in one batch": [
        up("user_roles", T, "carol", "admin", "*", None),
        up("users", T, "carol", "active"),
        rm("user_roles", T, "carol", "admin", "*"),
    ],
    "many scoped assignments": [
        up("user_roles", T, "bob", "viewer", f"doc:{i}", None) for i in range(1, 20)
    ],
}


@pytest.mark.parametrize("batch", BATCHES.values(), ids=BATCHES.keys())
def test_batch_equals_fresh_build(batch: list[RowChange]) -> None:
    model = model_of(BASE)
    engine = Engine.build(tables_of(model), REV0)
    assert engine.apply(batch, REV1) == len(batch)
    apply_to_model(model, batch)
    assert engine.revision == REV1
    assert_same(engine, model)
    engine.apply(batch, REV1)  # idempotent: the same batch again changes nothing
    assert_same(engine, model)


def test_changes_are_visible_in_decisions() -> None:
    engine = Engine.build(tables_of(model_of(BASE)), REV0)
    assert engine.check(T, "alice", "doc", "1", "read", 50.0).path == ("owner", "editor", "viewer")
    engine.apply([rm("role_inherits", T, "owner", "editor")], REV1)
    decision = engine.check(T, "alice", "doc", "1", "read", 50.0)
    assert (decision.role, decision.path, decision.permission) == ("owner", ("owner",), "doc:*")
    engine.apply([rm("role_permissions", T, "owner", "doc:*")], REV1)
    assert engine.check(T, "alice", "doc", "1", "read", 50.0).via_group == "eng"
    engine.apply([rm("group_members", T, "eng", "alice")], REV1)
    assert engine.check(T, "alice", "doc", "1", "read", 50.0).reason == "no_grant"
    engine.apply([rm("tenants", T)], REV1)
    assert engine.check(T, "alice", "doc", "1", "read", 50.0).reason == "unknown_tenant"
    assert engine.digest(T) == "0000000000000000:0"
    assert engine.tenants() == ("beta",)


def test_scoped_assignments_shrink_back() -> None:
    model = model_of(BASE)
    engine = Engine.build(tables_of(model), REV0)
    grow = [up("user_roles", T, "bob", "viewer", f"doc:{i}", None) for i in range(30)]
    shrink = [rm("user_roles", T, "bob", "viewer", f"doc:{i}") for i in range(1, 30)]
    for batch in (grow, shrink):
        engine.apply(batch, REV1)
        apply_to_model(model, batch)
        assert_same(engine, model)
    assert engine.resources(T, "bob", "doc", "read", 50.0).ids == ("0", "2")


def test_role_change_recomputes_only_roles_that_reach_it() -> None:
    graph = RoleGraph()
    for r in ("a", "b", "c", "d", "e"):
        graph.add_role(r)
        graph.add_perm(r, f"x:{r}")
    graph.add_edge("a", "b")
    graph.add_edge("b", "c")
    graph.add_edge("d", "e")
    assert graph.settle()
    before = dict(graph.closure)
    assert not graph.add_perm("b", "x:b")  # no change, nothing to do
    assert not graph.settle()
    graph.add_perm("b", "y:new")
    graph.settle()
    assert graph.closure["a"] == {"x:a", "x:b", "x:c", "y:new"}
    assert graph.closure["b"] == {"x:b", "x:c", "y:new"}
    for untouched in ("c", "d", "e"):
        assert graph.closure[untouched] is before[untouched]
    graph.remove_role("c")
    graph.settle()
    assert graph.closure["a"] == {"x:a", "x:b", "y:new"}
    assert "c" not in graph.closure
    assert graph.closure["d"] is before["d"]
