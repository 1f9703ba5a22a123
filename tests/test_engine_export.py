"""`Engine.tables()`: the rows an engine holds, exactly, after builds and applied batches.

What the snapshot file writes: rebuilding from it must hold the same rows (the same
digest per tenant) and answer the same decisions.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pdp.engine import COLUMNS, Engine, Row, RowChange
from tests.test_engine_property import (
    REV,
    assert_matches,
    built_then_changed,
    change,
    rows,
    tables_of,
)

# What a column left off reads as (pdp.engine.rows): attributes `{}`, the rest NULL.
_DEFAULTS = {"attributes": "{}"}


def _full(entity: str, row: Row) -> Row:
    cols = COLUMNS[entity]
    return tuple(row) + tuple(_DEFAULTS.get(c) for c in cols[len(row) :])


def _rows(tables: dict[str, list[Row]]) -> set[tuple[str, Row]]:
    return {(entity, _full(entity, row)) for entity, held in tables.items() for row in held}


def _digests(engine: Engine) -> dict[str, str]:
    return {tenant: engine.digest(tenant) for tenant in engine.tenants()}


@settings(deadline=None, max_examples=120)
@given(rows(), st.lists(st.lists(change(), max_size=12), max_size=4))
def test_tables_are_the_rows_held_and_rebuild_the_same_engine(
    data: list[tuple[str, Row]], batches: list[list[RowChange]]
) -> None:
    engine, model = built_then_changed(data, batches)
    exported = engine.tables()
    assert _rows(exported) == _rows(tables_of(model))
    again = Engine.build(exported, engine.revision)
    assert _digests(again) == _digests(engine)
    assert_matches(again, model)


def test_conditions_expiry_attributes_and_the_inventory_survive() -> None:
    tables: dict[str, list[Row]] = {
        "tenants": [("t",)],
        "users": [("t", "alice", "active", '{"dept": "eng"}'), ("t", "bob", "disabled")],
        "roles": [("t", "viewer")],
        "role_permissions": [
            ("t", "viewer", "doc:read", "resource.attributes.owner == subject.id"),
            ("t", "viewer", "doc:list", None),
        ],
        "user_roles": [("t", "alice", "viewer", "doc:*", 1.5e9), ("t", "bob", "viewer", "*", None)],
        "resources": [("t", "doc", "1", '{"owner": "alice"}'), ("t", "doc", "2", "{}")],
        # Rows whose parents do not exist are held as given, and exported as such.
        "group_members": [("t", "nogroup", "carol")],
        "group_roles": [("t", "nogroup", "viewer", "*", None)],
    }
    engine = Engine.build(tables, REV)
    exported = engine.tables()
    assert _rows(exported) == _rows(tables)
    again = Engine.build(exported, REV)
    assert _digests(again) == _digests(engine)
    for now in (1.0e9, 2.0e9):
        for user in ("alice", "bob", "carol"):
            for rid in ("1", "2"):
                assert again.check("t", user, "doc", rid, "read", now) == engine.check(
                    "t", user, "doc", rid, "read", now
                )
