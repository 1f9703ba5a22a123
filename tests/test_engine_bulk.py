"""A bulk load (`pdp.engine.Loader`, its loops in `pdp.engine.bulk`) leaves exactly the
state that row-by-row upserts leave, dict order included, and starts the running digest
at what a pass over the held rows computes, with or without repeated keys in the rows.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pdp.engine import ENTITIES, Loader, Row, digest
from pdp.engine.tenant import TenantState
from tests.test_engine_property import rows

Tables = dict[str, list[Row]]


def tables_in_order(data: list[tuple[str, Row]]) -> Tables:
    out: Tables = {entity: [] for entity in ENTITIES}
    for entity, row in data:
        out[entity].append(row)
    return out


def upserted(tables: Tables) -> dict[str, TenantState]:
    """The states `TenantState.upsert` leaves, row by row in the Loader's entity order."""
    states: dict[str, TenantState] = {}
    for entity in ENTITIES:
        for row in tables[entity]:
            tenant = str(row[0])
            state = states.setdefault(tenant, TenantState(tenant, loading=True))
            state.upsert(entity, row)
    for state in states.values():
        state.settle()
    return states


def loaded(tables: Tables, piece: int) -> dict[str, TenantState]:
    loader = Loader()
    for entity in ENTITIES:
        held = tables[entity]
        for at in range(0, len(held), piece):
            loader.add(entity, held[at : at + piece])
    return loader.finish()


def shape(state: TenantState) -> str:
    """Everything a check, a search, a digest or an export reads, with dict order."""
    return repr((
        state.exists, list(state.users.items()), state.user_attributes, state.user_holders,
        state.members, state.groups, state.group_grants, state.live_groups,
        state.group_holders, state.count, state.resources, state.roles.closure,
    ))  # fmt: skip


def assert_same(tables: Tables, piece: int) -> None:
    expected = upserted(tables)
    got = loaded(tables, piece)
    assert list(got) == list(expected)
    for tenant, state in got.items():
        assert shape(state) == shape(expected[tenant]), tenant
        assert state.digest() == digest.recompute_digest(state) == expected[tenant].digest()


@settings(max_examples=200, deadline=None)
@given(rows(), st.integers(1, 7))
def test_bulk_load_equals_row_by_row_upserts(data: list[tuple[str, Row]], piece: int) -> None:
    assert_same(tables_in_order(data), piece)


def test_repeated_and_replaced_rows() -> None:
    t = "t1"
    tables = tables_in_order([
        ("tenants", (t,)),
        ("users", (t, "alice", "active", '{"a": 1}')),
        ("users", (t, "alice", "disabled")),  # replaces: attributes back to {}
        ("users", (t, "bob", "active")),
        ("group_members", (t, "g1", "alice")),
        ("group_members", (t, "g1", "alice")),  # the same row again
        ("group_members", (t, "g0", "carol")),  # no users row
        ("user_roles", (t, "bob", "viewer", "*", None)),
        ("user_roles", (t, "bob", "viewer", "*", 1_900_000_000.5)),  # replaces
        ("user_roles", (t, "bob", "editor", "doc:1", None)),
        ("user_roles", (t, "carol", "viewer", "*", None)),
    ])  # fmt: skip
    for piece in (1, 2, 100):
        assert_same(tables, piece)
    state = loaded(tables, 100)[t]
    assert state.users["bob"][1] == (("editor", "doc:1", None), ("viewer", "*", 1_900_000_000.5))
    assert state.count["users"] == 2
    assert state.count["group_members"] == 2
    assert state.count["user_roles"] == 3


def test_many_grants_of_one_user_become_a_scope_index() -> None:
    t = "t1"
    grants = [("user_roles", (t, "alice", f"r{i % 3}", f"doc:{i}", None)) for i in range(20)]
    tables = tables_in_order([("tenants", (t,)), ("users", (t, "alice", "active")), *grants])
    assert_same(tables, 7)
    assert isinstance(loaded(tables, 7)[t].users["alice"][1], dict)
