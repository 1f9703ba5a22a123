"""Decision table for the pure engine: (rows, request) -> expected decision and reason."""

from __future__ import annotations

import random

import pytest

from pdp.engine import (
    COLUMNS,
    Decision,
    Engine,
    Reason,
    ResourcesResult,
    Row,
    RowChange,
    Snapshot,
)

T = "acme"
NOW = 1000.0
REV = Snapshot(10, 12, frozenset({11}))


def tables(*rows: tuple[str, Row], tenant: bool = True) -> dict[str, list[Row]]:
    """Rows as tables; tenant `acme` and users alice (active) / carol (disabled) included."""
    out: dict[str, list[Row]] = {entity: [] for entity in COLUMNS}
    if tenant:
        out["tenants"].append((T,))
    out["users"] += [(T, "alice", "active"), (T, "carol", "disabled")]
    for entity, row in rows:
        out[entity].append(row)
    return out


def role(rid: str, *perms: str) -> list[tuple[str, Row]]:
    return [("roles", (T, rid))] + [("role_permissions", (T, rid, p)) for p in perms]


def ur(user: str, rid: str, scope: str = "*", expires: float | None = None) -> tuple[str, Row]:
    return ("user_roles", (T, user, rid, scope, expires))


def gr(group: str, rid: str, scope: str = "*", expires: float | None = None) -> tuple[str, Row]:
    return ("group_roles", (T, group, rid, scope, expires))


def group(gid: str, *members: str) -> list[tuple[str, Row]]:
    return [("groups", (T, gid))] + [("group_members", (T, gid, m)) for m in members]


def edge(rid: str, inherits: str) -> tuple[str, Row]:
    return ("role_inherits", (T, rid, inherits))


def granted(
    rid: str,
    perm: str,
    scope: str = "*",
    path: tuple[str, ...] | None = None,
    via: str | None = None,
    expires: float | None = None,
) -> Decision:
    return Decision(True, "granted", rid, path or (rid,), perm, via, scope, expires)


def deny(reason: Reason) -> Decision:
    return Decision(False, reason)


READER = role("reader", "doc:read")
CHAIN = [  # r4 holds the permission; r0 reaches it through 4 edges
    *role("r0"),
    *role("r1"),
    *role("r2"),
    *role("r3"),
    *role("r4", "doc:read"),
    edge("r0", "r1"),
    edge("r1", "r2"),
    edge("r2", "r3"),
    edge("r3", "r4"),
]
DOC1 = ("doc", "1", "read")

CASES = [
    # (id, rows, (tenant, user), (type, id, action), expected)
    (
        "unknown tenant",
        [*READER, ur("alice", "reader")],
        ("other", "alice"),
        DOC1,
        deny("unknown_tenant"),
    ),
    (
        "tenant row missing",
        tables(*READER, ur("alice", "reader"), tenant=False),
        (T, "alice"),
        DOC1,
        deny("unknown_tenant"),
    ),
    ("unknown user", [*READER, ur("bob", "reader")], (T, "bob"), DOC1, deny("unknown_user")),
    ("disabled user", [*READER, ur("carol", "reader")], (T, "carol"), DOC1, deny("user_disabled")),
    ("no assignment", READER, (T, "alice"), DOC1, deny("no_grant")),
    (
        "wrong action",
        [*READER, ur("alice", "reader")],
        (T, "alice"),
        ("doc", "1", "write"),
        deny("no_grant"),
    ),
    (
        "wrong type",
        [*READER, ur("alice", "reader")],
        (T, "alice"),
        ("img", "1", "read"),
        deny("no_grant"),
    ),
    (
        "expired",
        [*READER, ur("alice", "reader", expires=NOW - 1)],
        (T, "alice"),
        DOC1,
        deny("expired"),
    ),
    (
        "expires exactly now",
        [*READER, ur("alice", "reader", expires=NOW)],
        (T, "alice"),
        DOC1,
        deny("expired"),
    ),
    (
        "expires later",
        [*READER, ur("alice", "reader", expires=NOW + 0.5)],
        (T, "alice"),
        DOC1,
        granted("reader", "doc:read", expires=NOW + 0.5),
    ),
    (
        "scope *",
        [*READER, ur("alice", "reader")],
        (T, "alice"),
        DOC1,
        granted("reader", "doc:read"),
    ),
    (
        "scope R:*",
        [*READER, ur("alice", "reader", "doc:*")],
        (T, "alice"),
        DOC1,
        granted("reader", "doc:read", "doc:*"),
    ),
    (
        "scope R:I",
        [*READER, ur("alice", "reader", "doc:1")],
        (T, "alice"),
        DOC1,
        granted("reader", "doc:read", "doc:1"),
    ),
    ("scope R:J", [*READER, ur("alice", "reader", "doc:2")], (T, "alice"), DOC1, deny("no_grant")),
    ("scope S:*", [*READER, ur("alice", "reader", "img:*")], (T, "alice"), DOC1, deny("no_grant")),
    (
        "via group",
        [*READER, *group("eng", "alice"), gr("eng", "reader", "doc:*")],
        (T, "alice"),
        DOC1,
        granted("reader", "doc:read", "doc:*", via="eng"),
    ),
    (
        "group, not a member",
        [*READER, *group("eng"), gr("eng", "reader")],
        (T, "alice"),
        DOC1,
        deny("no_grant"),
    ),
    (
        "missing group",
        [*READER, ("group_members", (T, "ghost", "alice")), gr("ghost", "reader")],
        (T, "alice"),
        DOC1,
        deny("no_grant"),
    ),
    (
        "group expired",
        [*READER, *group("eng", "alice"), gr("eng", "reader", expires=NOW)],
        (T, "alice"),
        DOC1,
        deny("expired"),
    ),
    (
        "direct expired, group live",
        [*READER, ur("alice", "reader", expires=1.0), *group("eng", "alice"), gr("eng", "reader")],
        (T, "alice"),
        DOC1,
        granted("reader", "doc:read", via="eng"),
    ),
    (
        "direct over group",
        [
            *READER,
            *role("a", "doc:read"),
            ur("alice", "reader"),
            *group("eng", "alice"),
            gr("eng", "a", "doc:1"),
        ],
        (T, "alice"),
        DOC1,
        granted("reader", "doc:read"),
    ),
    (
        "narrowest scope first",
        [*READER, *role("a", "doc:read"), ur("alice", "a"), ur("alice", "reader", "doc:1")],
        (T, "alice"),
        DOC1,
        granted("reader", "doc:read", "doc:1"),
    ),
    (
        "then type scope",
        [*READER, *role("a", "doc:read"), ur("alice", "a"), ur("alice", "reader", "doc:*")],
        (T, "alice"),
        DOC1,
        granted("reader", "doc:read", "doc:*"),
    ),
    (
        "then role id",
        [*READER, *role("a", "*:*"), ur("alice", "reader"), ur("alice", "a")],
        (T, "alice"),
        DOC1,
        granted("a", "*:*"),
    ),
    (
        "group: narrowest scope, then group id",
        [
            *READER,
            *group("zz", "alice"),
            *group("mm", "alice"),
            *group("aa", "alice"),
            gr("aa", "reader"),
            gr("mm", "reader", "doc:*"),
            gr("zz", "reader", "doc:*"),
        ],
        (T, "alice"),
        DOC1,
        granted("reader", "doc:read", "doc:*", via="mm"),
    ),
    (
        "missing role",
        [("role_permissions", (T, "ghost", "doc:read")), ur("alice", "ghost")],
        (T, "alice"),
        DOC1,
        deny("no_grant"),
    ),
    (
        "edge to a missing role",
        [
            *role("r"),
            edge("r", "ghost"),
            ("role_permissions", (T, "ghost", "*:*")),
            ur("alice", "r"),
        ],
        (T, "alice"),
        DOC1,
        deny("no_grant"),
    ),
    (
        "wildcard R:*",
        [*role("w", "doc:*"), ur("alice", "w")],
        (T, "alice"),
        DOC1,
        granted("w", "doc:*"),
    ),
    (
        "wildcard *:A",
        [*role("w", "*:read"), ur("alice", "w")],
        (T, "alice"),
        DOC1,
        granted("w", "*:read"),
    ),
    (
        "wildcard *:*",
        [*role("w", "*:*"), ur("alice", "w")],
        (T, "alice"),
        DOC1,
        granted("w", "*:*"),
    ),
    (
        "wildcard *:A other action",
        [*role("w", "*:write"), ur("alice", "w")],
        (T, "alice"),
        DOC1,
        deny("no_grant"),
    ),
    (
        "most specific permission",
        [*role("w", "*:*", "*:read", "doc:*", "doc:read"), ur("alice", "w")],
        (T, "alice"),
        DOC1,
        granted("w", "doc:read"),
    ),
    (
        "R:* before *:A",
        [*role("w", "*:*", "*:read", "doc:*"), ur("alice", "w")],
        (T, "alice"),
        DOC1,
        granted("w", "doc:*"),
    ),
    *[
        (
            f"inheritance depth {d}",
            [*CHAIN, ur("alice", f"r{4 - d}")],
            (T, "alice"),
            DOC1,
            granted(f"r{4 - d}", "doc:read", path=tuple(f"r{i}" for i in range(4 - d, 5))),
        )
        for d in range(5)
    ],
    (
        "shortest path reported",
        [*CHAIN, edge("r0", "r4"), ur("alice", "r0")],
        (T, "alice"),
        DOC1,
        granted("r0", "doc:read", path=("r0", "r4")),
    ),
    (
        "inherited through group",
        [*CHAIN, *group("eng", "alice"), gr("eng", "r2", "doc:1")],
        (T, "alice"),
        DOC1,
        granted("r2", "doc:read", "doc:1", path=("r2", "r3", "r4"), via="eng"),
    ),
    (
        "cycle grants once",
        [*role("x"), *role("y", "doc:read"), edge("x", "y"), edge("y", "x"), ur("alice", "x")],
        (T, "alice"),
        DOC1,
        granted("x", "doc:read", path=("x", "y")),
    ),
    (
        "cycle without grant terminates",
        [*role("x"), *role("y"), edge("x", "y"), edge("y", "x"), ur("alice", "x")],
        (T, "alice"),
        DOC1,
        deny("no_grant"),
    ),
]


@pytest.mark.parametrize(
    ("rows", "who", "what", "expected"),
    [pytest.param(rows, who, what, exp, id=name) for name, rows, who, what, exp in CASES],
)
def test_check_table(
    rows: list[tuple[str, Row]] | dict[str, list[Row]],
    who: tuple[str, str],
    what: tuple[str, str, str],
    expected: Decision,
) -> None:
    data = rows if isinstance(rows, dict) else tables(*rows)
    engine = Engine.build(data, REV)
    assert engine.check(*who, *what, NOW) == expected
    # the same answer with rows loaded in another order, and through apply
    shuffled = {k: random.Random(7).sample(v, len(v)) for k, v in data.items()}
    assert Engine.build(shuffled, REV).check(*who, *what, NOW) == expected
    applied = Engine.build({}, REV)
    changes = [RowChange.upsert(e, r) for e, rs in data.items() for r in rs]
    assert applied.apply(changes, REV) == len(changes)
    assert applied.check(*who, *what, NOW) == expected


def test_many_scoped_assignments_use_the_index_form() -> None:
    rows = [*READER, *[ur("alice", "reader", f"doc:{i}") for i in range(50)]]
    engine = Engine.build(tables(*rows), REV)
    assert engine.check(T, "alice", "doc", "7", "read", NOW) == granted(
        "reader", "doc:read", "doc:7"
    )
    assert engine.check(T, "alice", "doc", "77", "read", NOW) == deny("no_grant")
    assert engine.resources(T, "alice", "doc", "read", NOW) == ResourcesResult(
        tuple(sorted(str(i) for i in range(50))), False
    )
