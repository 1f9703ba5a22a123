"""State kept incrementally equals the same state recomputed from the held rows.

The running digest must equal `recompute_digest` (a pass over every row) and the
reverse indexes of the subject search (`pdp.engine.holders`) must equal indexes
rebuilt from the user and group records, after builds, change batches (applied twice,
deletes of absent keys, tenant deletes) and `replace_tenant`; and `subjects` must give
the same answer whether it walks the indexes or scans the users.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import NoReturn

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdp.engine import Engine, Row, RowChange, Snapshot, digest, evaluate
from pdp.engine import holders as h
from pdp.engine.grants import iter_grants
from pdp.engine.tenant import TenantState, UserRec
from tests.test_engine import NOW, REV, T, edge, gr, group, role, tables, ur
from tests.test_engine_api import expected_digest
from tests.test_engine_property import (
    ACTIONS,
    NOWS,
    RESOURCES,
    TENANTS,
    apply_to_model,
    change,
    model_of,
    rows,
    tables_of,
)

Flat = dict[str, dict[str, set[str]]]


def flat(index: h.Holders) -> Flat:
    return {role: flat_ids(by_scope) for role, by_scope in index.items()}


def flat_ids(ids: h.Ids) -> dict[str, set[str]]:
    out = {}
    for key, held in ids.items():
        assert isinstance(held, str) or len(held) >= 2, "one holder is kept as a bare id"
        out[key] = {held} if isinstance(held, str) else set(held)
    return out


def rebuilt(state: TenantState) -> tuple[Flat, Flat, dict[str, set[str]]]:
    """The three reverse indexes computed from scratch from the records."""
    users: Flat = {}
    groups: Flat = {}
    members: dict[str, set[str]] = {}
    for uid, (_status, grants, member_of) in state.users.items():
        for role_id, scope, _expires in iter_grants(grants):
            users.setdefault(role_id, {}).setdefault(scope, set()).add(uid)
        for gid in member_of:
            members.setdefault(gid, set()).add(uid)
    for gid, grants in state.group_grants.items():
        for role_id, scope, _expires in iter_grants(grants):
            groups.setdefault(role_id, {}).setdefault(scope, set()).add(gid)
    return users, groups, members


def states(engine: Engine) -> Iterator[TenantState]:
    yield from engine._tenants.values()


def assert_consistent(engine: Engine) -> None:
    for state in states(engine):
        assert state.digest() == digest.recompute_digest(state), state.tenant_id
        assert engine.digest(state.tenant_id) == state.digest()
        users, groups, members = rebuilt(state)
        assert flat(state.user_holders) == users
        assert flat(state.group_holders) == groups
        assert flat_ids(state.members) == members


def scanned(
    engine: Engine, tenant: str, rtype: str, rid: str, action: str, now: float
) -> tuple[str, ...]:
    """The subject search as a scan of every user asking `check` (the definition)."""
    state = engine._tenants.get(tenant)
    if state is None or not state.exists:
        return ()
    return tuple(
        sorted(u for u in state.users if engine.check(tenant, u, rtype, rid, action, now).allowed)
    )


def assert_subjects_both_ways(engine: Engine, tenants: tuple[str, ...] = (*TENANTS, "t9")) -> None:
    queries = itertools.product(tenants, RESOURCES, (*ACTIONS, "zzz"), NOWS)
    for tenant, (rtype, rid), action, now in queries:
        expected = scanned(engine, tenant, rtype, rid, action, now)
        for share in (0, 10**9):  # 0: always through the indexes; huge: always a scan
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(evaluate, "_SCAN_SHARE", share)
                got = engine.subjects(tenant, rtype, rid, action, now)
            assert got == expected, (tenant, rtype, rid, action, now, share)


@settings(deadline=None, max_examples=150)
@given(rows(), st.lists(st.tuples(st.lists(change(), max_size=12), st.booleans()), max_size=4))
def test_incremental_state_equals_recomputed(
    data: list[tuple[str, Row]], batches: list[tuple[list[RowChange], bool]]
) -> None:
    model = model_of(data)
    engine = Engine.build(tables_of(model), REV)
    assert_consistent(engine)
    for i, (batch, twice) in enumerate(batches):
        revision = Snapshot(i + 20, i + 20, frozenset())
        engine.apply(batch, revision)
        if twice:  # idempotent: the same batch again changes nothing
            engine.apply(batch, revision)
        apply_to_model(model, batch)
        assert_consistent(engine)
    fresh = Engine.build(tables_of(model), REV)
    for tenant in (*TENANTS, "t9"):
        assert (
            engine.digest(tenant)
            == fresh.digest(tenant)
            == expected_digest(tables_of(model), tenant)
        )
    assert_subjects_both_ways(engine)
    # A tenant reloaded from its rows, then changed again, stays consistent too.
    t1 = {e: [r for r in rows_ if r[0] == "t1"] for e, rows_ in tables_of(model).items()}
    engine.replace_tenant("t1", t1)
    assert_consistent(engine)
    engine.apply([RowChange.upsert("users", ("t1", "u1", "disabled"))], REV)
    assert_consistent(engine)


def up(entity: str, *row: str | float | None) -> RowChange:
    return RowChange.upsert(entity, row)


def rm(entity: str, *key: str) -> RowChange:
    return RowChange.delete(entity, key)


BASE = tables(
    *role("viewer", "doc:read"),
    *role("owner", "doc:*"),
    edge("owner", "viewer"),
    *group("eng", "alice", "carol"),
    gr("eng", "viewer", "doc:*", NOW + 10),
    ur("alice", "owner", "doc:1", NOW + 0.25),
    ("user_roles", (T, "dave", "viewer", "*", None)),  # no users row: held, counted
    ("group_members", (T, "ghost", "alice")),  # no groups row: held, counted
)

# (batch, how many lines it adds to the digest)
DIGEST_CASES = {
    "identical re-upsert": ([up("users", T, "alice", "active")], 0),
    "status change": ([up("users", T, "alice", "disabled")], 0),
    "NULL status": ([up("users", T, "alice", None)], 0),
    "new user": ([up("users", T, "dave", "active")], 1),
    "delete user keeps assignments": ([rm("users", T, "alice")], -1),
    "delete missing user": ([rm("users", T, "zed")], 0),
    "expiry change": ([up("user_roles", T, "alice", "owner", "doc:1", NOW + 5)], 0),
    "expiry dropped": ([up("user_roles", T, "alice", "owner", "doc:1", None)], 0),
    "same expiry again": ([up("user_roles", T, "alice", "owner", "doc:1", NOW + 0.25)], 0),
    "expiry rendering the same microsecond": (
        [up("user_roles", T, "alice", "owner", "doc:1", NOW + 0.25 + 1e-9)],
        0,
    ),
    "second scope": ([up("user_roles", T, "alice", "owner", "doc:2", None)], 1),
    "delete assignment": ([rm("user_roles", T, "alice", "owner", "doc:1")], -1),
    "delete missing assignment": ([rm("user_roles", T, "alice", "owner", "doc:9")], 0),
    "group expiry change": ([up("group_roles", T, "eng", "viewer", "doc:*", None)], 0),
    "delete group keeps its rows": ([rm("groups", T, "eng")], -1),
    "orphan membership removed": ([rm("group_members", T, "ghost", "alice")], -1),
    "membership twice": (
        [up("group_members", T, "eng", "bob"), up("group_members", T, "eng", "bob")],
        1,
    ),
    "role rows": (
        [
            up("roles", T, "admin"),
            up("role_permissions", T, "admin", "*:*"),
            rm("roles", T, "viewer"),
        ],
        1,
    ),
    "edge to a missing role": ([up("role_inherits", T, "viewer", "nobody")], 1),
    "delete missing edge": ([rm("role_inherits", T, "viewer", "nobody")], 0),
    "tenant upsert again": ([up("tenants", T)], 0),
    "rows of a tenant without a tenants row": ([up("users", "nope", "alice", "active")], 0),
}


@pytest.mark.parametrize(("batch", "lines"), DIGEST_CASES.values(), ids=DIGEST_CASES.keys())
def test_digest_moves_with_each_row(batch: list[RowChange], lines: int) -> None:
    model = model_of([(e, r) for e, rows_ in BASE.items() for r in rows_])
    engine = Engine.build(tables_of(model), REV)
    before = int(engine.digest(T).split(":")[1])
    engine.apply(batch, REV)
    apply_to_model(model, batch)
    for tenant in (T, "nope"):
        assert engine.digest(tenant) == expected_digest(tables_of(model), tenant)
    assert int(engine.digest(T).split(":")[1]) == before + lines
    assert_consistent(engine)


def test_digest_reads_no_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine.build(BASE, REV)
    expected = expected_digest(BASE, T)

    def no_pass(state: TenantState) -> Iterator[str]:
        raise AssertionError("digest() walked the rows")

    monkeypatch.setattr(digest, "tenant_lines", no_pass)
    assert engine.digest(T) == expected  # summed during the build
    engine.apply([up("users", T, "alice", "disabled"), up("users", T, "alice", "active")], REV)
    assert engine.digest(T) == expected
    # A pass over the rows is caught while patched: the two answers above read none.
    with pytest.raises(AssertionError, match="walked the rows"):
        digest.recompute_digest(engine._tenants[T])


def test_digest_deferred_while_loading() -> None:
    state = TenantState(T, loading=True)
    state.upsert("tenants", (T,))
    state.upsert("users", (T, "alice", "active"))
    state.upsert("users", (T, "alice", "disabled"))  # not tallied while loading
    assert state.digest() == digest.recompute_digest(state)
    state.upsert("users", (T, "alice", "active"))  # tallied from now on
    assert state.digest() == digest.recompute_digest(state)
    assert Engine.build({}, REV).digest(T) == digest.EMPTY == digest.recompute_digest(None)


class NoScan(dict[str, UserRec]):
    """A users dict that fails the test if the subject search iterates it."""

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("subjects() scanned the users")

    def items(self) -> NoReturn:
        raise AssertionError("subjects() scanned the users")


def test_subjects_follow_the_answer_not_the_tenant() -> None:
    crowd = [ur(f"user{i:03d}", "viewer", f"doc:{1000 + i}") for i in range(300)]
    crowd += [("users", (T, f"user{i:03d}", "active")) for i in range(300)]
    data = tables(
        *role("viewer", "doc:read"),
        *role("owner", "doc:*"),
        *crowd,
        ur("alice", "owner", "doc:7"),
        ur("carol", "owner", "doc:7"),  # disabled
        ur("user005", "owner", "doc:*"),
        ur("user006", "owner", "doc:*", NOW),  # expired
        *group("eng", "user010", "user011"),
        gr("eng", "viewer", "doc:7"),
        *group("ops", "user012"),
        gr("ops", "viewer", "doc:8"),
    )
    engine = Engine.build(data, REV)
    state = engine._tenants[T]
    users = state.users
    state.users = NoScan(users)
    assert engine.subjects(T, "doc", "7", "read", NOW) == ("alice", "user005", "user010", "user011")
    assert engine.subjects(T, "doc", "1042", "read", NOW) == ("user005", "user042")
    assert engine.subjects(T, "doc", "8", "write", NOW) == ("user005",)
    assert engine.subjects(T, "img", "7", "read", NOW) == ()
    state.users = users
    # With about as many candidates as users (expired ones included), it scans instead.
    engine.apply([up("user_roles", T, f"user{i:03d}", "viewer", "*", NOW) for i in range(300)], REV)
    state.users = NoScan(users)
    with pytest.raises(AssertionError, match="scanned"):
        engine.subjects(T, "doc", "7", "read", NOW)
    state.users = users
    assert engine.subjects(T, "doc", "7", "read", NOW) == ("alice", "user005", "user010", "user011")
    assert len(engine.subjects(T, "doc", "7", "read", NOW - 1)) == 301  # alice + crowd


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([("+", "a")], "a"),
        ([("+", "a"), ("+", "a")], "a"),
        ([("+", "a"), ("+", "b")], {"a", "b"}),
        ([("+", "a"), ("+", "b"), ("-", "a")], "b"),
        ([("+", "a"), ("-", "a")], None),
        ([("-", "a")], None),
        ([("+", "a"), ("-", "b")], "a"),
        ([("+", "a"), ("+", "b"), ("+", "c"), ("-", "b")], {"a", "c"}),
    ],
)
def test_holder_sets(steps: list[tuple[str, str]], expected: str | set[str] | None) -> None:
    index: h.Holders = {}
    for op, who in steps:
        (h.hold if op == "+" else h.release)(index, "viewer", "doc:1", who)
    held = index.get("viewer", {}).get("doc:1")
    assert (set(held) if isinstance(held, dict) else held) == expected
    assert ("viewer" in index) is (expected is not None)
    found = h.pools(index, ["viewer", "owner"], ["doc:1", "*"])
    assert h.union(found) == ({expected} if isinstance(expected, str) else expected or set())
    assert h.size(found) == len(h.union(found))
