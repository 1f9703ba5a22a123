"""The row format the sync layer feeds the engine.

Only decision-relevant columns are carried, in a fixed order per table
(`COLUMNS`); the leading `KEY_WIDTH[entity]` columns are the table's primary key.
Fields are `str`, except `expires_at`, which is float epoch seconds or None; jsonb
columns (`attributes`) are their JSON text, `condition` is text or None. A row may leave
out trailing columns past `REQUIRED[entity]` (they read as NULL / `{}`).
"""

from __future__ import annotations

from dataclasses import dataclass

Field = str | float | None
Row = tuple[Field, ...]

COLUMNS: dict[str, tuple[str, ...]] = {
    "tenants": ("id",),
    "users": ("tenant_id", "id", "status", "attributes"),
    "groups": ("tenant_id", "id"),
    "group_members": ("tenant_id", "group_id", "user_id"),
    "roles": ("tenant_id", "id"),
    "role_inherits": ("tenant_id", "role_id", "inherits_id"),
    "role_permissions": ("tenant_id", "role_id", "permission", "condition"),
    "user_roles": ("tenant_id", "user_id", "role_id", "scope", "expires_at"),
    "group_roles": ("tenant_id", "group_id", "role_id", "scope", "expires_at"),
    "resources": ("tenant_id", "type", "id", "attributes"),
}

# Columns a row must carry; the rest of COLUMNS may be left off (NULL, or `{}` for
# attributes), so rows written before a column existed stay valid.
REQUIRED: dict[str, int] = {
    entity: {"users": 3, "role_permissions": 3, "resources": 3}.get(entity, len(cols))
    for entity, cols in COLUMNS.items()
}

KEY_WIDTH: dict[str, int] = {
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

ENTITIES: tuple[str, ...] = tuple(COLUMNS)


@dataclass(frozen=True, slots=True)
class RowChange:
    """The current state of one row: `row` None means the key no longer exists.

    Applying a change is idempotent: it states what the row is, not what happened.
    """

    entity: str
    key: tuple[str, ...]
    row: Row | None

    @classmethod
    def upsert(cls, entity: str, row: Row) -> RowChange:
        """The change that makes `row` current (its key is its leading columns)."""
        width = KEY_WIDTH[entity]
        return cls(entity, tuple(str(f) for f in row[:width]), row)

    @classmethod
    def delete(cls, entity: str, key: tuple[str, ...]) -> RowChange:
        """The change that removes the row with primary key `key`."""
        return cls(entity, key, None)

    def validate(self) -> None:
        """Raise ValueError unless entity, key and row fit the row format."""
        width = KEY_WIDTH.get(self.entity)
        if width is None:
            raise ValueError(f"unknown entity {self.entity!r}")
        if len(self.key) != width or not all(isinstance(k, str) for k in self.key):
            raise ValueError(f"{self.entity}: key {self.key!r} is not {width} strings")
        if self.row is None:
            return
        if not REQUIRED[self.entity] <= len(self.row) <= len(COLUMNS[self.entity]):
            raise ValueError(
                f"{self.entity}: row {self.row!r} does not match {COLUMNS[self.entity]}"
            )
        if tuple(self.row[:width]) != self.key:
            raise ValueError(
                f"{self.entity}: row {self.row!r} does not start with key {self.key!r}"
            )
