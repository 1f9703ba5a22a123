"""Versioned SQL objects (functions, triggers), after alembic's "Replaceable Objects" recipe.

A revision that changes a function or trigger holds its whole new body as a
`ReplaceableObject` and keeps the previous one for its downgrade; nothing here
is generated from live code, so an old revision always replays the same SQL.
"""

from __future__ import annotations

from dataclasses import dataclass

from alembic import op


@dataclass(frozen=True, slots=True)
class ReplaceableObject:
    """A named SQL object: `create` is the full CREATE statement, `drop` removes it."""

    name: str
    create: str
    drop: str


def create(*objects: ReplaceableObject) -> None:
    for obj in objects:
        op.execute(obj.create)


def drop(*objects: ReplaceableObject) -> None:
    for obj in reversed(objects):
        op.execute(obj.drop)


def replace(new: ReplaceableObject, old: ReplaceableObject) -> None:
    """Swap `old` for `new` (used by upgrade; its downgrade calls replace(old, new))."""
    op.execute(old.drop)
    op.execute(new.create)
