"""Conditional grants, the resource inventory, and SQL checks that see conditions.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

- `pdp.role_permissions.condition text NULL`: a CEL expression; NULL is unconditional.
- `pdp.resources (tenant_id, type, id, attributes jsonb)`: the optional resource
  inventory, captured like the other tables.
- `pdp.check` is true when an unconditional grant matches, NULL (undecided) when only
  conditional grants could allow, false otherwise: SQL cannot evaluate CEL, so it
  never silently ignores a condition.
- `pdp.explain` gains a trailing `condition` column (NULL for unconditional grants).
- `pdp.check_candidates` returns the conditional grants that could allow, with their
  condition text, the user's attributes and the resource's inventory attributes: the
  caller evaluates them with `pdp.conditions` (the engine's evaluator).
The shared fragments come from revisions 0001 and 0002, which are frozen.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from pdp.migrations.replaceable import ReplaceableObject, create, drop, replace

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_v1 = importlib.import_module("pdp.migrations.versions.0001_schema")
_v2 = importlib.import_module("pdp.migrations.versions.0002_check_nulls")

_RESOURCES_PK = ("tenant_id", "type", "id")
_NAME = r"[A-Za-z0-9][A-Za-z0-9_./-]{0,255}"

_NO_NULLS = _v2._NO_NULLS
_ARGS = _v1._CHECK_ARGS
_SIG = _v1._CHECK_SIG

# Every matching grant of the live assignments, with the inheritance walk, as explain
# has done since 0001; `rp.condition` now comes along.
_WALK = f"""
    WITH RECURSIVE
    assigned AS ({_v1._LIVE_ASSIGNMENTS}
    ),
    walk(assigned_role, via_group, scope, expires_at, node, path) AS (
        SELECT a.role_id, a.via_group, a.scope, a.expires_at, a.role_id, ARRAY[a.role_id]
        FROM assigned a
        UNION ALL
        SELECT w.assigned_role, w.via_group, w.scope, w.expires_at, ri.inherits_id,
               w.path || ri.inherits_id
        FROM walk w
        JOIN pdp.role_inherits ri ON ri.tenant_id = p_tenant_id AND ri.role_id = w.node
        WHERE NOT ri.inherits_id = ANY (w.path)
    )"""

EXPLAIN = ReplaceableObject(
    f"pdp.explain({_SIG})",
    f"""
CREATE FUNCTION pdp.explain({_ARGS})
RETURNS TABLE (role_id text, path text[], permission text, via_group text, scope text,
               expires_at timestamptz, condition text)
LANGUAGE sql STABLE AS $fn$
    -- Every way the decision may be granted: the assigned role, the inheritance path down
    -- to the role holding the matching grant, the group (NULL for direct), the scope and
    -- the grant's condition (NULL: unconditional). A row with a condition grants only
    -- when the condition is true. Direct before group, shortest path first.
    {_WALK}
    SELECT w.assigned_role, w.path, rp.permission, w.via_group, w.scope, w.expires_at,
           rp.condition
    FROM walk w
    JOIN pdp.role_permissions rp ON rp.tenant_id = p_tenant_id AND rp.role_id = w.node
    WHERE {_v1._MATCHING_PERMISSION}
      AND {_v1._ACTIVE_USER}
      AND {_NO_NULLS}
    ORDER BY w.via_group IS NOT NULL, array_length(w.path, 1), w.assigned_role,
             w.via_group, w.scope, rp.permission
$fn$""",
    f"DROP FUNCTION pdp.explain({_SIG})",
)

CHECK = ReplaceableObject(
    f"pdp.check({_SIG})",
    f"""
CREATE FUNCTION pdp.check({_ARGS}) RETURNS boolean
LANGUAGE sql STABLE AS $fn$
    -- The reference decision (DESIGN.md section 2); the in-memory engine must agree.
    -- true: an unconditional grant matches; NULL: only conditional grants could allow
    -- (evaluate pdp.check_candidates); false: nothing could.
    SELECT CASE
        WHEN bool_or(e.condition IS NULL) THEN true
        WHEN count(*) > 0 THEN NULL
        ELSE false
    END
    FROM pdp.explain(p_tenant_id, p_user_id, p_resource_type, p_resource_id, p_action, p_at) e
$fn$""",
    f"DROP FUNCTION pdp.check({_SIG})",
)

CANDIDATES = ReplaceableObject(
    f"pdp.check_candidates({_SIG})",
    f"""
CREATE FUNCTION pdp.check_candidates({_ARGS})
RETURNS TABLE (role_id text, path text[], permission text, via_group text, scope text,
               expires_at timestamptz, condition text, user_attributes jsonb,
               resource_attributes jsonb)
LANGUAGE sql STABLE AS $fn$
    -- The conditional grants that could allow (in explain's order) with what their
    -- conditions read from the database: the user's attributes and the resource's
    -- inventory attributes (NULL when the resource is not in the inventory).
    SELECT e.role_id, e.path, e.permission, e.via_group, e.scope, e.expires_at, e.condition,
           (SELECT u.attributes FROM pdp.users u
            WHERE u.tenant_id = p_tenant_id AND u.id = p_user_id),
           (SELECT r.attributes FROM pdp.resources r
            WHERE r.tenant_id = p_tenant_id AND r.type = p_resource_type
              AND r.id = p_resource_id)
    FROM pdp.explain(p_tenant_id, p_user_id, p_resource_type, p_resource_id, p_action, p_at) e
    WHERE e.condition IS NOT NULL
$fn$""",
    f"DROP FUNCTION pdp.check_candidates({_SIG})",
)


def _capture() -> list[ReplaceableObject]:
    return [
        _v1._capture_function("resources", _RESOURCES_PK),
        *_v1._capture_triggers("resources"),
    ]


def upgrade() -> None:
    op.add_column(
        "role_permissions", sa.Column("condition", sa.Text(), nullable=True), schema="pdp"
    )
    op.create_table(
        "resources",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column(
            "attributes",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.CheckConstraint(f"type ~ '^{_NAME}$'", name=op.f("resources_type_check")),
        sa.CheckConstraint("id <> '' AND length(id) <= 256", name=op.f("resources_id_check")),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["pdp.tenants.id"],
            name=op.f("resources_tenant_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "type", "id", name=op.f("resources_pkey")),
        schema="pdp",
    )
    create(*_capture())
    # explain's return type changes: drop check (which reads it) first.
    op.execute(_v2.CHECK.drop)
    replace(EXPLAIN, _v2.EXPLAIN)
    create(CHECK, CANDIDATES)


def downgrade() -> None:
    drop(CHECK, CANDIDATES)
    replace(_v2.EXPLAIN, EXPLAIN)
    create(_v2.CHECK)
    drop(*_capture())
    op.drop_table("resources", schema="pdp")
    op.drop_column("role_permissions", "condition", schema="pdp")
