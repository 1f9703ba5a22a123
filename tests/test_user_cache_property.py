"""On-demand mode's core, as a property: a replica holding only the users it has
loaded decides exactly like the engine holding everything.

The lazy replica starts without users, memberships and direct assignments; a check
first loads its user's rows from the model ("the database"); catch-up batches go
through `Replica.apply`, which passes them on for loaded users only; users are
evicted at random (`Engine.forget_user`). The SQL loader itself is checked against
`pdp.check` in tests/test_user_cache.py.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pdp.engine import Engine, RowChange
from pdp.replica import USER_ENTITIES, Replica, user_of
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


class Loaded:
    """The set of loaded users, as `pdp.replica.UserLoads` (loading done by the test)."""

    def __init__(self) -> None:
        self.keys: set[tuple[str, str]] = set()

    def cached(self, tenant: str, user: str) -> bool:
        return (tenant, user) in self.keys

    async def ensure(self, tenant: str, user: str) -> None:
        raise AssertionError("not used")

    def clear(self) -> None:
        self.keys.clear()

    def evict_tenant(self, tenant: str) -> None:
        self.keys = {k for k in self.keys if k[0] != tenant}


_user_of = user_of


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
    replica, loaded = Replica(), Loaded()
    replica.install(lazy, "epoch", 0.0)
    replica.users = loaded
    cached = loaded.keys
    for s in steps:
        if s[0] == "batch":
            batch = s[1]
            apply_to_model(model, batch)
            full.apply(batch, REV)
            replica.apply(batch, REV, 0.0)
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
