"""Engine API around the decision: values, snapshots, row format, digest, reverse queries."""

from __future__ import annotations

import hashlib
import itertools

import pytest

from pdp.engine import (
    COLUMNS,
    KEY_WIDTH,
    ActionsResult,
    Engine,
    ResourcesResult,
    Row,
    RowChange,
    Snapshot,
)
from tests.test_engine import (
    CHAIN,
    NOW,
    READER,
    REV,
    T,
    deny,
    edge,
    gr,
    granted,
    group,
    role,
    tables,
    ur,
)


def test_to_context_is_json_ready_and_omits_none() -> None:
    decision = granted("r0", "doc:read", "doc:1", path=("r0", "r1"), via="eng", expires=5.0)
    assert decision.to_context() == {
        "reason": "granted",
        "role": "r0",
        "path": ["r0", "r1"],
        "permission": "doc:read",
        "via_group": "eng",
        "scope": "doc:1",
        "expires_at": 5.0,
    }
    assert granted("r", "*:*").to_context() == {
        "reason": "granted",
        "role": "r",
        "path": ["r"],
        "permission": "*:*",
        "scope": "*",
    }
    assert deny("expired").to_context() == {"reason": "expired"}


@pytest.mark.parametrize(
    ("text", "xid", "visible"),
    [
        ("10:20:", 9, True),
        ("10:20:", 10, True),
        ("10:20:", 19, True),
        ("10:20:", 20, False),
        ("10:20:12,15", 12, False),
        ("10:20:12,15", 13, True),
        ("10:20:12,15", 15, False),
        ("10:20:12,15", 25, False),
    ],
)
def test_snapshot_visible(text: str, xid: int, visible: bool) -> None:
    snap = Snapshot.parse(text)
    assert snap.visible(xid) is visible
    assert str(snap) == text
    assert Snapshot.parse(str(snap)) == snap


@pytest.mark.parametrize("text", ["", "1:2", "a:b:", "5:3:", "10:20:25", "10:20:x"])
def test_snapshot_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"pg_snapshot|invalid literal"):
        Snapshot.parse(text)


def test_row_format_table() -> None:
    assert KEY_WIDTH == {
        "tenants": 1,
        "users": 2,
        "groups": 2,
        "group_members": 3,
        "roles": 2,
        "role_inherits": 3,
        "role_permissions": 3,
        "user_roles": 4,
        "group_roles": 4,
        "resources": 3,
    }
    assert COLUMNS["role_permissions"] == ("tenant_id", "role_id", "permission", "condition")
    assert COLUMNS["resources"] == ("tenant_id", "type", "id", "attributes")
    assert COLUMNS["user_roles"] == ("tenant_id", "user_id", "role_id", "scope", "expires_at")
    assert all(KEY_WIDTH[e] <= len(cols) for e, cols in COLUMNS.items())


@pytest.mark.parametrize(
    "change",
    [
        RowChange("nope", (T,), None),
        RowChange("users", (T,), None),
        RowChange("users", (T, "alice"), (T, "bob", "active")),
        RowChange("users", (T, "alice"), (T, "alice")),
    ],
)
def test_malformed_batch_applies_nothing(change: RowChange) -> None:
    engine = Engine.build(tables(*READER, ur("alice", "reader")), REV)
    before = engine.digest(T)
    ok = RowChange.delete("users", (T, "alice"))
    with pytest.raises(ValueError, match=r"entity|key|row"):
        engine.apply([ok, change], Snapshot(20, 20, frozenset()))
    assert engine.digest(T) == before
    assert engine.revision == REV
    # On its own the valid change does move the digest and the revision.
    engine.apply([ok], Snapshot(20, 20, frozenset()))
    assert engine.digest(T) != before
    assert engine.revision == Snapshot(20, 20, frozenset())


def expected_digest(data: dict[str, list[Row]], tenant: str) -> str:
    """The digest exactly as the module docstring words it, written independently."""
    total, n = 0, 0
    for entity, rows in data.items():
        for row in rows:
            if row[0] != tenant:
                continue
            fields = []
            # Left-off trailing columns are NULL, attributes then the default `{}`.
            defaults = {"attributes": "{}"}
            full = (*row, *(defaults.get(c) for c in COLUMNS[entity][len(row) :]))
            for name, value in zip(COLUMNS[entity], full, strict=True):
                if value is None:
                    fields.append("")
                elif name == "expires_at":
                    assert isinstance(value, float)
                    fields.append(str(round(value * 1_000_000)))
                else:
                    fields.append(str(value))
            line = entity + "|" + "|".join(fields)
            total += int(hashlib.md5(line.encode("utf-8")).hexdigest()[:16], 16)  # noqa: S324
            n += 1
    return f"{total % 2**64:016x}:{n}"


def test_digest_follows_its_definition() -> None:
    data = tables(
        *CHAIN,
        *group("eng", "alice", "carol"),
        gr("eng", "r1", "doc:1", 1_700_000_000.123456),
        ur("alice", "r0", "*", 0.5),
        ur("carol", "r2", "doc:*"),
    )
    data["tenants"].append(("other",))
    data["users"].append(("other", "zed", "active"))
    engine = Engine.build(data, REV)
    assert engine.digest(T) == expected_digest(data, T)
    assert engine.digest("other") == expected_digest(data, "other")
    assert engine.digest("other").endswith(":2")
    assert engine.digest("nobody") == "0000000000000000:0"
    one = hashlib.md5(b"tenants|solo").hexdigest()[:16]  # noqa: S324
    assert Engine.build({"tenants": [("solo",)]}, REV).digest("solo") == f"{one}:1"


def test_counts_and_tenants() -> None:
    data = tables(*CHAIN, *group("eng", "alice"), gr("eng", "r1"), ur("alice", "r0"))
    data["tenants"].append(("beta",))
    engine = Engine.build(data, REV)
    assert engine.tenants() == ("acme", "beta")
    assert engine.counts() == {
        "tenants": 2,
        "users": 2,
        "groups": 1,
        "group_members": 1,
        "roles": 5,
        "role_inherits": 4,
        "role_permissions": 1,
        "user_roles": 1,
        "group_roles": 1,
        "resources": 0,
        "assignments": 2,
    }
    assert engine.revision == REV


def test_replace_tenant() -> None:
    data = tables(*READER, ur("alice", "reader"))
    data["tenants"].append(("beta",))
    engine = Engine.build(data, REV)
    fresh = tables(*role("reader", "doc:write"), ur("alice", "reader"))
    engine.replace_tenant(T, fresh)
    assert engine.check(T, "alice", "doc", "1", "write", NOW).allowed
    assert not engine.check(T, "alice", "doc", "1", "read", NOW).allowed
    assert engine.digest(T) == Engine.build(fresh, REV).digest(T)
    engine.replace_tenant(T, {"tenants": []})
    assert engine.tenants() == ("beta",)
    assert engine.check(T, "alice", "doc", "1", "write", NOW) == deny("unknown_tenant")
    with pytest.raises(ValueError, match="not for tenant"):
        engine.replace_tenant("beta", data)


REVERSE_ROLES = [
    *role("viewer", "doc:read", "*:list"),
    *role("editor", "doc:write", "img:*"),
    *role("admin", "*:*"),
    edge("editor", "viewer"),
]
REVERSE = tables(
    *REVERSE_ROLES,
    ur("alice", "viewer", "doc:1"),
    ur("alice", "editor", "doc:2"),
    ur("alice", "admin", "img:9", expires=NOW),
    *group("eng", "alice", "bob", "carol"),
    ("users", (T, "bob", "active")),
    gr("eng", "viewer", "doc:*"),
    ur("bob", "admin", "img:*"),
)


@pytest.mark.parametrize(
    ("user", "rtype", "rid", "expected"),
    [
        ("alice", "doc", "1", ActionsResult(("list", "read"), False)),
        ("alice", "doc", "2", ActionsResult(("list", "read", "write"), False)),
        ("alice", "img", "9", ActionsResult((), False)),
        ("bob", "img", "3", ActionsResult((), True)),
        ("bob", "doc", "3", ActionsResult(("list", "read"), False)),
        ("carol", "doc", "1", ActionsResult((), False)),
        ("nobody", "doc", "1", ActionsResult((), False)),
    ],
)
def test_actions(user: str, rtype: str, rid: str, expected: ActionsResult) -> None:
    engine = Engine.build(REVERSE, REV)
    assert engine.actions(T, user, rtype, rid, NOW) == expected
    for action in expected.actions:
        assert engine.check(T, user, rtype, rid, action, NOW).allowed
    assert engine.check(T, user, rtype, rid, "anything", NOW).allowed is expected.all_actions


def test_reverse_queries_on_the_scope_index_form() -> None:
    many = [ur("alice", "viewer", f"doc:{i}") for i in range(20)]
    many += [gr("eng", "editor", f"doc:{i}", NOW + (i % 2)) for i in range(20)]
    data = tables(
        *REVERSE_ROLES,
        *many,
        ur("alice", "admin", "img:*"),
        ur("alice", "editor", "doc:5", NOW - 1),
        *group("eng", "alice", "bob"),
        ("users", (T, "bob", "active")),
    )
    engine = Engine.build(data, REV)
    for user, rtype, rid in itertools.product(
        ("alice", "bob"), ("doc", "img"), ("1", "2", "5", "99")
    ):
        result = engine.actions(T, user, rtype, rid, NOW)
        for action in ("read", "list", "write", "delete", "zzz"):
            ok = engine.check(T, user, rtype, rid, action, NOW).allowed
            assert ok == (action in result.actions or result.all_actions), (
                user,
                rtype,
                rid,
                action,
            )
    assert engine.actions(T, "alice", "doc", "3", NOW) == ActionsResult(
        ("list", "read", "write"), False
    )
    assert engine.actions(T, "bob", "doc", "2", NOW) == ActionsResult((), False)
    assert engine.resources(T, "bob", "doc", "write", NOW).ids == tuple(
        sorted(str(i) for i in range(1, 20, 2))
    )
    assert engine.subjects(T, "doc", "3", "write", NOW) == ("alice", "bob")
    assert engine.subjects(T, "doc", "2", "read", NOW) == ("alice",)


def test_resources_and_subjects() -> None:
    engine = Engine.build(REVERSE, REV)
    assert engine.resources(T, "alice", "doc", "write", NOW) == ResourcesResult(("2",), False)
    assert engine.resources(T, "alice", "doc", "read", NOW) == ResourcesResult(("1", "2"), True)
    assert engine.resources(T, "alice", "img", "read", NOW) == ResourcesResult((), False)
    assert engine.resources(T, "alice", "doc", "list", NOW) == ResourcesResult(("1", "2"), True)
    assert engine.resources(T, "bob", "img", "drop", NOW) == ResourcesResult((), True)
    assert engine.resources(T, "carol", "doc", "read", NOW) == ResourcesResult((), False)
    assert engine.subjects(T, "doc", "2", "write", NOW) == ("alice",)
    assert engine.subjects(T, "doc", "5", "read", NOW) == ("alice", "bob")
    assert engine.subjects(T, "img", "9", "drop", NOW) == ("bob",)
    assert engine.subjects("other", "doc", "5", "read", NOW) == ()
    assert engine.actions("other", "alice", "doc", "1", NOW) == ActionsResult((), False)
    assert engine.resources("other", "alice", "doc", "read", NOW) == ResourcesResult((), False)
