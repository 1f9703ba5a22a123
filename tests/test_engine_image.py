"""`pdp.engine.image`: the state as held, dumped and loaded back without rebuilding.

The snapshot file's body. A loaded image must be the engine it was taken from: the
same fields in the same order, the same running digests (equal to a full recompute),
the same decisions, the same objects shared; a capture must not see changes applied
after it; and a stream that names a class must be refused without running anything.
"""

from __future__ import annotations

import io
import pickle
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdp.engine import Engine, Row, RowChange, Snapshot, image
from pdp.engine.digest import recompute_digest
from pdp.engine.grants import SMALL
from pdp.engine.tenant import TenantState
from tests.test_engine_export import _rows
from tests.test_engine_property import (
    REV,
    assert_matches,
    built_then_changed,
    change,
    rows,
)


def _round_trip(engine: Engine) -> Engine:
    out = io.BytesIO()
    image.dump(engine, out)
    return image.load(io.BytesIO(out.getvalue()), engine.revision)


def _assert_same(back: Engine, engine: Engine) -> None:
    assert back.revision == engine.revision
    assert [s.tenant_id for s in back.states()] == [s.tenant_id for s in engine.states()]
    for held, state in zip(back.states(), engine.states(), strict=True):
        assert held.exists == state.exists
        assert held.count == state.count
        assert held.digest() == state.digest() == recompute_digest(held)
        for field in image.FIELDS:
            assert getattr(held, field) == getattr(state, field), field
            if field != "groups":  # a set: no order to keep
                assert list(getattr(held, field)) == list(getattr(state, field)), field
    assert _rows(back.tables()) == _rows(engine.tables())


def _big_tables(users: int = 120, seed: int = 7) -> dict[str, list[Row]]:
    """A tenant whose indexes need several pieces at PIECE = 5: big groups, a user with
    more than SMALL resource-scoped grants (a scope index), a group with one too (held
    in group_grants and live_groups), conditions, expiry, attributes, the inventory, and
    a second tenant without its tenants row."""
    rng = random.Random(seed)
    ids = [f"u{i}" for i in range(users)]
    members: list[Row] = [("t", f"g{i % 4}", u) for i, u in enumerate(ids)]
    members += [("t", "g0", u) for u in ids[1::4]]  # g0 is big
    user_roles: list[Row] = [("t", u, rng.choice(("viewer", "editor")), "*", None) for u in ids]
    user_roles += [("t", "u0", "editor", f"doc:{d}", 2.0e9 + d) for d in range(SMALL + 4)]
    user_roles += [("t", u, "owner", "doc:*", None) for u in ids[::5]]
    tables: dict[str, list[Row]] = {
        "tenants": [("t",)],
        "users": [
            ("t", u, rng.choice(("active", "disabled")), f'{{"n": {i}}}' if i % 3 else "{}")
            for i, u in enumerate(ids)
        ],
        "groups": [("t", f"g{i}") for i in range(4)],
        "group_members": members,
        "roles": [("t", "viewer"), ("t", "editor"), ("t", "owner")],
        "role_inherits": [("t", "editor", "viewer")],
        "role_permissions": [
            ("t", "viewer", "doc:read", None),
            ("t", "editor", "doc:write", None),
            ("t", "owner", "doc:delete", "resource.attributes.owner == subject.id"),
        ],
        "user_roles": user_roles,
        "group_roles": [("t", "g1", "viewer", f"doc:{d}", None) for d in range(SMALL + 9)]
        + [("t", "g2", "editor", "*", 1.9e9), ("t", "nogroup", "viewer", "*", None)],
        "resources": [("t", "doc", str(d), f'{{"owner": "u{d}"}}') for d in range(30)],
    }
    tables["users"].append(("other", "x", "active", "{}"))  # no tenants row for "other"
    return tables


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image, "PIECE", 5)


@settings(deadline=None, max_examples=120)
@given(rows(), st.lists(st.lists(change(), max_size=12), max_size=4))
def test_an_image_loads_back_the_engine_it_was_taken_from(
    data: list[tuple[str, Row]], batches: list[list[RowChange]]
) -> None:
    engine, model = built_then_changed(data, batches)
    back = _round_trip(engine)
    _assert_same(back, engine)
    assert_matches(back, model)


def test_pieces_split_big_indexes_and_keep_shared_objects_shared(small_pieces: None) -> None:
    engine = Engine.build(_big_tables(), REV)
    back = _round_trip(engine)
    _assert_same(back, engine)
    state = back.states()[0]
    # A group's scope index is one object in group_grants and live_groups, as held.
    assert state.group_grants["g1"].__class__ is dict
    assert state.live_groups["g1"] is state.group_grants["g1"]
    # Ids are shared between the users dict and the indexes, as held (one memo).
    keys = {uid: uid for uid in state.users}
    members = state.members["g0"]
    assert isinstance(members, dict)
    assert len(members) > image.PIECE
    assert all(keys[uid] is uid for uid in members)
    for now in (1.0e9, 1.95e9, 2.5e9):
        for user in ("u0", "u1", "u5", "u10", "nobody"):
            for rid in ("0", "3", "10", "99"):
                for action in ("read", "write", "delete"):
                    assert back.check("t", user, "doc", rid, action, now) == engine.check(
                        "t", user, "doc", rid, action, now
                    )


def test_a_loaded_image_takes_changes_like_the_engine_it_came_from(small_pieces: None) -> None:
    engine = Engine.build(_big_tables(), REV)
    back = _round_trip(engine)
    changes = [
        RowChange("user_roles", ("t", "u0", "editor", "doc:1"), None),  # in a scope index
        RowChange(
            "user_roles", ("t", "u0", "owner", "doc:77"), ("t", "u0", "owner", "doc:77", None)
        ),
        RowChange("group_roles", ("t", "g1", "viewer", "doc:2"), None),  # shared index
        RowChange("group_members", ("t", "g0", "u1"), None),
        RowChange("groups", ("t", "g1"), None),
        RowChange("users", ("t", "u7"), ("t", "u7", "active", '{"x": 1}')),
    ]
    for target in (engine, back):
        target.apply(changes, Snapshot(5, 5))
    _assert_same(back, engine)


def test_a_capture_is_not_changed_by_what_is_applied_after_it(small_pieces: None) -> None:
    engine = Engine.build(_big_tables(), REV)
    before = Engine.build(engine.tables(), REV)
    held = image.capture(engine)
    engine.apply(
        [
            RowChange("user_roles", ("t", "u0", "editor", "doc:2"), None),  # scope index, in place
            RowChange("group_roles", ("t", "g1", "viewer", "doc:3"), None),  # in place too
            RowChange("group_members", ("t", "g0", "u1"), None),  # a members dict, in place
            RowChange(
                "user_roles", ("t", "u2", "owner", "doc:*"), ("t", "u2", "owner", "doc:*", None)
            ),
            RowChange("resources", ("t", "doc", "0"), None),
            RowChange("users", ("t", "u3"), None),
        ],
        Snapshot(9, 9),
    )
    out = io.BytesIO()
    image.dump(held, out)
    back = image.load(io.BytesIO(out.getvalue()), REV)
    assert _rows(back.tables()) == _rows(before.tables())
    assert [s.digest() for s in back.states()] == [s.digest() for s in before.states()]
    assert _rows(back.tables()) != _rows(engine.tables())


RAN: list[str] = []


def _record(what: str) -> None:
    RAN.append(what)


class _Payload:
    """What a forged file would carry: loading it would call `_record`."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_record, ("ran",))


def _stream(*pieces: object) -> io.BytesIO:
    out = io.BytesIO()
    pickler = pickle.Pickler(out, 5)
    for piece in pieces:
        pickler.dump(piece)
    out.seek(0)
    return out


def test_a_stream_that_names_a_class_is_refused_and_runs_nothing() -> None:
    engine = Engine.build(_big_tables(users=10), REV)
    good = io.BytesIO()
    image.dump(engine, good)
    forged = _stream(
        ("pdp-engine-image", image.LAYOUT, 1),
        ("tenant", "t", True, dict(engine.states()[0].count), 0, []),
        ("fill", "users", (), ["eve"], [_Payload()]),
        ("end",),
    )
    RAN.clear()
    with pytest.raises(image.BadImage, match=r"names tests\.test_engine_image\._record"):
        image.load(forged, REV)
    assert RAN == []
    assert _round_trip(engine).digest("t") == engine.digest("t")  # the real one loads


@pytest.mark.parametrize(
    ("pieces", "message"),
    [
        ((("pdp-engine-image", image.LAYOUT + 1, 0), ("end",)), "engine layout"),
        ((("something else",),), "does not start as an engine image"),
        ((("pdp-engine-image", image.LAYOUT, 2), ("end",)), "holds 0 tenants"),
        (
            (("pdp-engine-image", image.LAYOUT, 1), ("fill", "users", (), [], [])),
            "where it is not expected",
        ),
        (
            (
                ("pdp-engine-image", image.LAYOUT, 1),
                ("tenant", "t", True, dict.fromkeys(TenantState("t").count, 0), 0, []),
                ("fill", "_decisions", (), [], []),
            ),
            "not a field of the state",
        ),
        ((("pdp-engine-image", image.LAYOUT, 1),), "does not load"),  # ends early
    ],
)
def test_a_stream_that_is_not_an_image_is_refused(pieces: tuple[object, ...], message: str) -> None:
    with pytest.raises(image.BadImage, match=message):
        image.load(_stream(*pieces), REV)


def test_the_layout_is_what_layout_names() -> None:
    """Changing what a tenant state holds changes what an image must hold: bump LAYOUT
    (a file of the old layout is then refused, not misread) and update this pin."""
    assert image.LAYOUT == 1
    assert TenantState.__slots__ == (
        "_decisions", "_sum", "count", "exists", "group_grants", "group_holders", "groups",
        "live_groups", "members", "resources", "roles", "tenant_id", "user_attributes",
        "user_holders", "users",
    )  # fmt: skip
    held = set(image.FIELDS) | {"_decisions", "_sum", "count", "exists", "roles", "tenant_id"}
    assert held == set(TenantState.__slots__)
