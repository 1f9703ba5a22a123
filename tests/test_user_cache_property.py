"""PROTOTYPE property test (issue 14 item 5): an engine holding only the users it has
loaded decides exactly like the engine holding everything.

The lazy engine starts without users, memberships and direct assignments; a check
first loads its user's rows from the model ("the database"); catch-up batches reach it
only for loaded users; users are evicted at random (`Engine.forget_user`).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pdp.engine import Engine, RowChange
from tests.test_engine_property import (
    ACTIONS,
    NOWS,
    RESOURCES,
    REV,
    TENANTS,
    USERS,
    Model,
    apply_to_model,
    change,
    model_of,
    rows,
    tables_of,
)

USER_ENTITIES = ("users", "group_members", "user_roles")


def _user_of(c: RowChange) -> tuple[str, str] | None:
    if c.entity == "group_members":
        return c.key[0], c.key[2]
    if c.entity in ("users", "user_roles"):
        return c.key[0], c.key[1]
    return None


def _load(lazy: Engine, model: Model, tenant: str, user: str) -> None:
    found = [
        RowChange.upsert(entity, row)
        for entity in USER_ENTITIES
        for key, row in model[entity].items()
        if _user_of(RowChange(entity, key, row)) == (tenant, user)
    ]
    lazy.apply(found, lazy.revision)


step = st.one_of(
    st.tuples(st.just("batch"), st.lists(change(), max_size=6)),
    st.tuples(st.just("evict"), st.sampled_from(TENANTS), st.sampled_from(USERS)),
    st.tuples(
        st.just("check"),
        st.sampled_from(TENANTS),
        st.sampled_from(USERS),
        st.sampled_from(RESOURCES),
        st.sampled_from(ACTIONS),
        st.sampled_from(NOWS),
    ),
)


@settings(max_examples=300, deadline=None)
@given(rows(), st.lists(step, max_size=25))
def test_lazy_engine_decides_like_full(data: list, steps: list) -> None:  # type: ignore[type-arg]
    model = model_of(data)
    full = Engine.build(tables_of(model), REV)
    lazy = Engine.build({e: r for e, r in tables_of(model).items() if e not in USER_ENTITIES}, REV)
    cached: set[tuple[str, str]] = set()
    for s in steps:
        if s[0] == "batch":
            batch = s[1]
            apply_to_model(model, batch)
            full.apply(batch, REV)
            lazy.apply([c for c in batch if _user_of(c) in (None, *cached)], REV)
        elif s[0] == "evict":
            cached.discard((s[1], s[2]))
            lazy.forget_user(s[1], s[2])
        else:
            _, tenant, user, (rtype, rid), action, now = s
            if (tenant, user) not in cached:
                _load(lazy, model, tenant, user)
                cached.add((tenant, user))
            want = full.check(tenant, user, rtype, rid, action, now)
            assert lazy.check(tenant, user, rtype, rid, action, now) == want

    # Rows held: everything but users' rows, and all rows of the loaded users.
    def held(table: dict[str, list]) -> dict[str, set]:  # type: ignore[type-arg]
        return {
            e: {r for r in rs if _user_of(RowChange.upsert(e, r)) in (None, *cached)}
            for e, rs in table.items()
        }

    assert held(lazy.tables()) == held(full.tables())
    assert {e: set(r) for e, r in lazy.tables().items()} == held(full.tables())
