"""`Engine.batch`: many checks at one `now`, one user's work shared, every answer
exactly `Engine.check`'s (random tenants, conditions, large holders, any order)."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdp.conditions import Facts
from pdp.engine import Engine, Row, Snapshot, evaluate
from tests.test_conditions import REVERSE_CONDITIONS
from tests.test_engine_property import ACTIONS, NOWS, TENANTS, USERS, model_of, rows, tables_of

REV = Snapshot(1, 1)
# Ids a grant names (1, 2), ids none does (3), the whole type itself, and an id that
# makes `type:id` look like a type-wide scope.
RIDS = ("1", "2", "3", "*", "1:*")
RTYPES = ("doc", "img")
# Every question over those ids, with resource properties a condition may read.
QUERIES = list(
    itertools.product(
        (*TENANTS, "t9"), (*USERS, "nobody"), RTYPES, RIDS, (*ACTIONS, "zzz"),
        (None, Facts(resource={"a": 1}), Facts(resource={"a": 2})),
    )
)  # fmt: skip


def _big_holder(user: str, n: int) -> list[tuple[str, Row]]:
    """`n` resource-scoped grants for one user: past `grants.SMALL`, a scope index."""
    return [("user_roles", ("t1", user, "r1", f"doc:{i}", None)) for i in range(1, n + 1)]


@settings(deadline=None, max_examples=150)
@given(
    rows(),
    st.lists(st.sampled_from(REVERSE_CONDITIONS), min_size=30, max_size=30),
    st.booleans(),
    st.sampled_from(NOWS),
    st.randoms(use_true_random=False),
)
def test_every_batched_answer_is_checks_answer(
    data: list[tuple[str, Row]], picks: list[str | None], big: bool, now: float,
    rng: random.Random,
) -> None:  # fmt: skip
    conditioned: list[tuple[str, Row]] = []
    for i, (entity, row) in enumerate(data):
        pick = picks[i % len(picks)]
        conditioned.append((entity, (*row[:3], pick) if entity == "role_permissions" else row))
    if big:
        conditioned += _big_holder("u1", 12)
    engine = Engine.build(tables_of(model_of(conditioned)), REV)
    expected = [engine.check(*q[:5], now, q[5]) for q in QUERIES]
    shuffled = list(range(len(QUERIES)))
    rng.shuffle(shuffled)
    # Every question in three orders (a named id before or after the unnamed ones of its
    # type and action), each order one batch.
    for order in (range(len(QUERIES)), range(len(QUERIES) - 1, -1, -1), shuffled):
        batch = engine.batch(now)
        for i in order:
            assert batch.check(*QUERIES[i]) == expected[i], QUERIES[i]


def test_the_same_queries_in_any_order_and_repeated() -> None:
    engine = Engine.build(
        {
            "tenants": [("t",)],
            "users": [("t", "u", "active"), ("t", "v", "disabled")],
            "groups": [("t", "g")],
            "group_members": [("t", "g", "u")],
            "roles": [("t", "reader"), ("t", "writer")],
            "role_permissions": [("t", "reader", "doc:read"), ("t", "writer", "doc:*")],
            "user_roles": [
                ("t", "u", "reader", "doc:*", None),
                ("t", "u", "writer", "doc:7", 20.0),
            ],
            "group_roles": [("t", "g", "writer", "doc:8", None)],
        },
        REV,
    )
    asked = [
        ("t", user, "doc", rid, action)
        for user, rid, action in itertools.product(("u", "v", "w"), "6789", ("read", "write"))
    ]
    for now in (10.0, 30.0):
        expected = {q: engine.check(*q, now) for q in asked}
        for order in (asked, asked[::-1], asked * 2):
            batch = engine.batch(now)
            assert {q: batch.check(*q) for q in order} == expected
    assert engine.batch(10.0).check("t", "u", "doc", "7", "write").expires_at == 20.0
    assert not engine.batch(30.0).check("t", "u", "doc", "7", "write").allowed


def test_one_users_ids_no_grant_names_are_decided_once_per_type_and_action(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = Engine.build(
        {
            "tenants": [("t",)],
            "users": [("t", "u", "active")],
            "roles": [("t", "reader")],
            "role_permissions": [("t", "reader", "doc:read")],
            "user_roles": [
                ("t", "u", "reader", "doc:*", None),
                ("t", "u", "reader", "doc:5", None),
            ],
        },
        REV,
    )
    calls: list[str] = []
    real = evaluate.check

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(str(args[3]))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(evaluate, "check", counted)
    batch = engine.batch(10.0)
    answers = [batch.check("t", "u", "doc", str(i), "read") for i in range(100)]
    assert all(a.allowed for a in answers)
    assert answers[5].scope == "doc:5"
    assert answers[6].scope == "doc:*"
    # One check for the 99 ids no grant names, one for doc:5 (which one names).
    assert sorted(calls) == ["0", "5"]
    denied = [batch.check("t", "u", "doc", str(i), "write") for i in range(100)]
    assert not any(d.allowed for d in denied)
    assert len(calls) == 4  # write: once for the unnamed ids, once for doc:5
