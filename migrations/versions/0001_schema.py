"""Schema, change capture, cycle guard and the SQL reference check.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

Creates the `pdp` tables (the public contract), statement-level change-capture
triggers that append to `pdp.change_log` and send one constant `pdp_changes`
notification per writing transaction, the role-inheritance cycle guard, and the
reference decision functions `pdp.check` and `pdp.explain`.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql
from sqlalchemy.types import UserDefinedType

from pdp.migrations.replaceable import ReplaceableObject, create, drop

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


class XID8(UserDefinedType[int]):
    cache_ok = True

    def get_col_spec(self, **kw: object) -> str:
        return "xid8"


# Primary keys of the captured tables, frozen as of this revision.
CAPTURED: dict[str, tuple[str, ...]] = {
    "tenants": ("id",),
    "users": ("tenant_id", "id"),
    "groups": ("tenant_id", "id"),
    "group_members": ("tenant_id", "group_id", "user_id"),
    "roles": ("tenant_id", "id"),
    "role_inherits": ("tenant_id", "role_id", "inherits_id"),
    "role_permissions": ("tenant_id", "role_id", "permission"),
    "user_roles": ("tenant_id", "user_id", "role_id", "scope"),
    "group_roles": ("tenant_id", "group_id", "role_id", "scope"),
}

ACTOR = "nullif(current_setting('pdp.actor', true), '')"


def _key(alias: str, pk: tuple[str, ...]) -> str:
    return "jsonb_build_object(" + ", ".join(f"'{c}', {alias}.{c}" for c in pk) + ")"


def _capture_function(table: str, pk: tuple[str, ...]) -> ReplaceableObject:
    # One function per table, three statement-level triggers (a trigger with transition
    # tables takes a single event). Each statement appends one change_log row per row
    # it touched; the constant payload makes every notification of a transaction
    # collapse into one. `pdp.capture = off` is the bulk loader's switch: it must end
    # with pdp.mark_bulk_load(), which tells every sidecar to reload.
    tenant = "id" if table == "tenants" else "tenant_id"
    join = " AND ".join(f"o.{c} = n.{c}" for c in pk)
    body = f"""
CREATE FUNCTION pdp.capture_{table}() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF current_setting('pdp.capture', true) = 'off' THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        INSERT INTO pdp.change_log (tenant_id, entity, op, key, old, new, actor)
        SELECT n.{tenant}, '{table}', 'insert', {_key("n", pk)}, NULL, to_jsonb(n), {ACTOR}
        FROM new_rows n;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO pdp.change_log (tenant_id, entity, op, key, old, new, actor)
        SELECT o.{tenant}, '{table}', 'delete', {_key("o", pk)}, to_jsonb(o), NULL, {ACTOR}
        FROM old_rows o;
    ELSE
        -- Rows are paired by primary key; an update that changes the key logs the
        -- old key (new NULL) and the new key (old NULL), so both get re-read.
        INSERT INTO pdp.change_log (tenant_id, entity, op, key, old, new, actor)
        SELECT coalesce(n.{tenant}, o.{tenant}), '{table}', 'update',
               CASE WHEN n.{pk[0]} IS NULL THEN {_key("o", pk)} ELSE {_key("n", pk)} END,
               CASE WHEN o.{pk[0]} IS NULL THEN NULL ELSE to_jsonb(o) END,
               CASE WHEN n.{pk[0]} IS NULL THEN NULL ELSE to_jsonb(n) END,
               {ACTOR}
        FROM old_rows o FULL JOIN new_rows n ON {join};
    END IF;
    IF FOUND THEN
        PERFORM pg_notify('pdp_changes', '');
    END IF;
    RETURN NULL;
END
$fn$"""
    return ReplaceableObject(f"pdp.capture_{table}()", body, f"DROP FUNCTION pdp.capture_{table}()")


def _capture_triggers(table: str) -> list[ReplaceableObject]:
    refs = {
        "INSERT": "REFERENCING NEW TABLE AS new_rows",
        "UPDATE": "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
        "DELETE": "REFERENCING OLD TABLE AS old_rows",
    }
    objs = [
        ReplaceableObject(
            f"capture_{event.lower()}",
            f"CREATE TRIGGER capture_{event.lower()} AFTER {event} ON pdp.{table} {ref} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION pdp.capture_{table}()",
            f"DROP TRIGGER capture_{event.lower()} ON pdp.{table}",
        )
        for event, ref in refs.items()
    ]
    objs.append(
        ReplaceableObject(
            "capture_truncate",
            f"CREATE TRIGGER capture_truncate AFTER TRUNCATE ON pdp.{table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION pdp.capture_truncate()",
            f"DROP TRIGGER capture_truncate ON pdp.{table}",
        )
    )
    return objs


CAPTURE_TRUNCATE = ReplaceableObject(
    "pdp.capture_truncate()",
    f"""
CREATE FUNCTION pdp.capture_truncate() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    -- A reset marker: sidecars reload everything when they see it.
    INSERT INTO pdp.change_log (tenant_id, entity, op, actor)
    VALUES (NULL, TG_TABLE_NAME, 'truncate', {ACTOR});
    PERFORM pg_notify('pdp_changes', '');
    RETURN NULL;
END
$fn$""",
    "DROP FUNCTION pdp.capture_truncate()",
)

MARK_BULK_LOAD = ReplaceableObject(
    "pdp.mark_bulk_load(text)",
    f"""
CREATE FUNCTION pdp.mark_bulk_load(p_tenant_id text) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    -- Ends a load done with pdp.capture = off: sidecars reload this tenant
    -- instead of replaying millions of rows.
    INSERT INTO pdp.change_log (tenant_id, entity, op, actor)
    VALUES (p_tenant_id, 'tenants', 'bulk_load', {ACTOR});
    PERFORM pg_notify('pdp_changes', '');
END
$fn$""",
    "DROP FUNCTION pdp.mark_bulk_load(text)",
)

NO_CYCLE = ReplaceableObject(
    "pdp.role_inherits_no_cycle()",
    """
CREATE FUNCTION pdp.role_inherits_no_cycle() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    t text;
    cycle text[];
BEGIN
    -- Serialize inheritance writers per tenant, so that two transactions cannot each
    -- add half of a cycle; under READ COMMITTED the walk below then sees the other's
    -- committed edges (each statement of a volatile function takes a new snapshot).
    FOR t IN SELECT DISTINCT tenant_id FROM new_rows ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(hashtextextended('pdp.role_inherits:' || t, 0));
    END LOOP;
    WITH RECURSIVE walk(tenant_id, start_role, node, path) AS (
        SELECT n.tenant_id, n.role_id, n.inherits_id, ARRAY[n.role_id, n.inherits_id]
        FROM new_rows n
        UNION ALL
        SELECT w.tenant_id, w.start_role, ri.inherits_id, w.path || ri.inherits_id
        FROM walk w
        JOIN pdp.role_inherits ri ON ri.tenant_id = w.tenant_id AND ri.role_id = w.node
        WHERE w.node <> w.start_role AND NOT ri.inherits_id = ANY (w.path[2:])
    )
    SELECT w.tenant_id, w.path INTO t, cycle
    FROM walk w WHERE w.node = w.start_role
    ORDER BY array_length(w.path, 1) LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'role inheritance cycle in tenant "%": %', t, array_to_string(cycle, ' -> ')
            USING ERRCODE = 'check_violation',
                  HINT = 'role_inherits must stay acyclic: a role cannot inherit from itself, directly or through other roles';
    END IF;
    RETURN NULL;
END
$fn$""",
    "DROP FUNCTION pdp.role_inherits_no_cycle()",
)

NO_CYCLE_TRIGGERS = [
    ReplaceableObject(
        f"role_inherits_no_cycle_{event.lower()}",
        f"CREATE TRIGGER role_inherits_no_cycle_{event.lower()} AFTER {event} ON pdp.role_inherits "
        "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT "
        "EXECUTE FUNCTION pdp.role_inherits_no_cycle()",
        f"DROP TRIGGER role_inherits_no_cycle_{event.lower()} ON pdp.role_inherits",
    )
    for event in ("INSERT", "UPDATE")
]

# The assignments (direct and through groups) that are live at p_at and whose scope
# covers the resource. Shared text of check and explain.
_LIVE_ASSIGNMENTS = """
    SELECT ur.role_id, NULL::text AS via_group, ur.scope, ur.expires_at
    FROM pdp.user_roles ur
    WHERE ur.tenant_id = p_tenant_id AND ur.user_id = p_user_id
      AND (ur.expires_at IS NULL OR ur.expires_at > p_at)
      AND ur.scope IN ('*', p_resource_type || ':*', p_resource_type || ':' || p_resource_id)
    UNION ALL
    SELECT gr.role_id, gr.group_id, gr.scope, gr.expires_at
    FROM pdp.group_members gm
    JOIN pdp.group_roles gr ON gr.tenant_id = gm.tenant_id AND gr.group_id = gm.group_id
    WHERE gm.tenant_id = p_tenant_id AND gm.user_id = p_user_id
      AND (gr.expires_at IS NULL OR gr.expires_at > p_at)
      AND gr.scope IN ('*', p_resource_type || ':*', p_resource_type || ':' || p_resource_id)"""

_MATCHING_PERMISSION = """rp.permission IN (
          p_resource_type || ':' || p_action, p_resource_type || ':*', '*:' || p_action, '*:*')"""

_ACTIVE_USER = """EXISTS (
        SELECT 1 FROM pdp.users u
        WHERE u.tenant_id = p_tenant_id AND u.id = p_user_id AND u.status = 'active')"""

_CHECK_ARGS = (
    "p_tenant_id text, p_user_id text, p_resource_type text, p_resource_id text, "
    "p_action text, p_at timestamptz DEFAULT now()"
)
_CHECK_SIG = "text, text, text, text, text, timestamptz"

CHECK = ReplaceableObject(
    f"pdp.check({_CHECK_SIG})",
    f"""
CREATE FUNCTION pdp.check({_CHECK_ARGS}) RETURNS boolean
LANGUAGE sql STABLE AS $fn$
    -- The reference decision (DESIGN.md section 2); the in-memory engine must agree.
    WITH RECURSIVE
    assigned AS ({_LIVE_ASSIGNMENTS}
    ),
    reach(role_id) AS (
        SELECT role_id FROM assigned
        UNION
        SELECT ri.inherits_id
        FROM reach r
        JOIN pdp.role_inherits ri ON ri.tenant_id = p_tenant_id AND ri.role_id = r.role_id
    )
    SELECT coalesce({_ACTIVE_USER}
      AND EXISTS (
        SELECT 1 FROM reach r
        JOIN pdp.role_permissions rp ON rp.tenant_id = p_tenant_id AND rp.role_id = r.role_id
        WHERE {_MATCHING_PERMISSION}), false)
$fn$""",
    f"DROP FUNCTION pdp.check({_CHECK_SIG})",
)

EXPLAIN = ReplaceableObject(
    f"pdp.explain({_CHECK_SIG})",
    f"""
CREATE FUNCTION pdp.explain({_CHECK_ARGS})
RETURNS TABLE (role_id text, path text[], permission text, via_group text, scope text,
               expires_at timestamptz)
LANGUAGE sql STABLE AS $fn$
    -- Every way the decision is granted: the assigned role, the inheritance path down to
    -- the role holding the matching grant, the group (NULL for direct) and the scope.
    -- No rows means pdp.check is false. Direct before group, shortest path first.
    WITH RECURSIVE
    assigned AS ({_LIVE_ASSIGNMENTS}
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
    )
    SELECT w.assigned_role, w.path, rp.permission, w.via_group, w.scope, w.expires_at
    FROM walk w
    JOIN pdp.role_permissions rp ON rp.tenant_id = p_tenant_id AND rp.role_id = w.node
    WHERE {_MATCHING_PERMISSION}
      AND {_ACTIVE_USER}
    ORDER BY w.via_group IS NOT NULL, array_length(w.path, 1), w.assigned_role,
             w.via_group, w.scope, rp.permission
$fn$""",
    f"DROP FUNCTION pdp.explain({_CHECK_SIG})",
)


def _sql_objects() -> list[ReplaceableObject]:
    objs = [CAPTURE_TRUNCATE]
    for table, pk in CAPTURED.items():
        objs.append(_capture_function(table, pk))
        objs.extend(_capture_triggers(table))
    objs += [MARK_BULK_LOAD, NO_CYCLE, *NO_CYCLE_TRIGGERS, CHECK, EXPLAIN]
    return objs


def upgrade() -> None:
    op.create_table(
        "change_log",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("txid", XID8(), server_default=sa.text("pg_current_xact_id()"), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=True),
        sa.Column("entity", sa.Text(), nullable=False),
        sa.Column("op", sa.Text(), nullable=False),
        sa.Column("key", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("old", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("new", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("actor", sa.Text(), nullable=True),
        sa.Column(
            "changed_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("clock_timestamp()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "op IN ('insert', 'update', 'delete', 'truncate', 'bulk_load')",
            name=op.f("change_log_op_check"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("change_log_pkey")),
        schema="pdp",
    )
    op.create_index(
        "change_log_changed_at_idx", "change_log", ["changed_at"], unique=False, schema="pdp"
    )
    op.create_index("change_log_txid_idx", "change_log", ["txid"], unique=False, schema="pdp")
    op.create_table(
        "sync_meta",
        sa.Column("singleton", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("epoch", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("purged_max_xid", XID8(), nullable=True),
        sa.Column("purged_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.CheckConstraint("singleton", name=op.f("sync_meta_singleton_check")),
        sa.PrimaryKeyConstraint("singleton", name=op.f("sync_meta_pkey")),
        schema="pdp",
    )
    op.create_table(
        "tenants",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), server_default="", nullable=False),
        sa.Column(
            "created_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("id <> '' AND length(id) <= 256", name=op.f("tenants_id_check")),
        sa.PrimaryKeyConstraint("id", name=op.f("tenants_pkey")),
        schema="pdp",
    )
    op.create_table(
        "groups",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.CheckConstraint("id <> '' AND length(id) <= 256", name=op.f("groups_id_check")),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["pdp.tenants.id"],
            name=op.f("groups_tenant_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("groups_pkey")),
        schema="pdp",
    )
    op.create_table(
        "roles",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.CheckConstraint("id <> '' AND length(id) <= 256", name=op.f("roles_id_check")),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["pdp.tenants.id"], name=op.f("roles_tenant_id_fkey"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("roles_pkey")),
        schema="pdp",
    )
    op.create_table(
        "users",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), server_default="active", nullable=False),
        sa.Column(
            "attributes",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("id <> '' AND length(id) <= 256", name=op.f("users_id_check")),
        sa.CheckConstraint("status IN ('active', 'disabled')", name=op.f("users_status_check")),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["pdp.tenants.id"], name=op.f("users_tenant_id_fkey"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("users_pkey")),
        schema="pdp",
    )
    op.create_table(
        "group_members",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("group_id", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id", "group_id"],
            ["pdp.groups.tenant_id", "pdp.groups.id"],
            name=op.f("group_members_tenant_id_group_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id", "user_id"],
            ["pdp.users.tenant_id", "pdp.users.id"],
            name=op.f("group_members_tenant_id_user_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "tenant_id", "group_id", "user_id", name=op.f("group_members_pkey")
        ),
        schema="pdp",
    )
    op.create_index(
        op.f("group_members_tenant_id_user_id_idx"),
        "group_members",
        ["tenant_id", "user_id"],
        unique=False,
        schema="pdp",
    )
    op.create_table(
        "group_roles",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("group_id", sa.Text(), nullable=False),
        sa.Column("role_id", sa.Text(), nullable=False),
        sa.Column("scope", sa.Text(), server_default="*", nullable=False),
        sa.Column("expires_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.CheckConstraint(
            "scope ~ '^(\\*|[A-Za-z0-9][A-Za-z0-9_./-]{0,255}:.+)$' AND length(scope) - strpos(scope, ':') <= 256",
            name=op.f("group_roles_scope_check"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id", "group_id"],
            ["pdp.groups.tenant_id", "pdp.groups.id"],
            name=op.f("group_roles_tenant_id_group_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id", "role_id"],
            ["pdp.roles.tenant_id", "pdp.roles.id"],
            name=op.f("group_roles_tenant_id_role_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "tenant_id", "group_id", "role_id", "scope", name=op.f("group_roles_pkey")
        ),
        schema="pdp",
    )
    op.create_index(
        op.f("group_roles_tenant_id_role_id_idx"),
        "group_roles",
        ["tenant_id", "role_id"],
        unique=False,
        schema="pdp",
    )
    op.create_table(
        "role_inherits",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("role_id", sa.Text(), nullable=False),
        sa.Column("inherits_id", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id", "inherits_id"],
            ["pdp.roles.tenant_id", "pdp.roles.id"],
            name=op.f("role_inherits_tenant_id_inherits_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id", "role_id"],
            ["pdp.roles.tenant_id", "pdp.roles.id"],
            name=op.f("role_inherits_tenant_id_role_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "tenant_id", "role_id", "inherits_id", name=op.f("role_inherits_pkey")
        ),
        schema="pdp",
    )
    op.create_index(
        op.f("role_inherits_tenant_id_inherits_id_idx"),
        "role_inherits",
        ["tenant_id", "inherits_id"],
        unique=False,
        schema="pdp",
    )
    op.create_table(
        "role_permissions",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("role_id", sa.Text(), nullable=False),
        sa.Column("permission", sa.Text(), nullable=False),
        sa.CheckConstraint(
            "permission ~ '^([A-Za-z0-9][A-Za-z0-9_./-]{0,255}|\\*):([A-Za-z0-9][A-Za-z0-9_./-]{0,255}|\\*)$'",
            name=op.f("role_permissions_permission_check"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id", "role_id"],
            ["pdp.roles.tenant_id", "pdp.roles.id"],
            name=op.f("role_permissions_tenant_id_role_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "tenant_id", "role_id", "permission", name=op.f("role_permissions_pkey")
        ),
        schema="pdp",
    )
    op.create_table(
        "user_roles",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("role_id", sa.Text(), nullable=False),
        sa.Column("scope", sa.Text(), server_default="*", nullable=False),
        sa.Column("expires_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.CheckConstraint(
            "scope ~ '^(\\*|[A-Za-z0-9][A-Za-z0-9_./-]{0,255}:.+)$' AND length(scope) - strpos(scope, ':') <= 256",
            name=op.f("user_roles_scope_check"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id", "role_id"],
            ["pdp.roles.tenant_id", "pdp.roles.id"],
            name=op.f("user_roles_tenant_id_role_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id", "user_id"],
            ["pdp.users.tenant_id", "pdp.users.id"],
            name=op.f("user_roles_tenant_id_user_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "tenant_id", "user_id", "role_id", "scope", name=op.f("user_roles_pkey")
        ),
        schema="pdp",
    )
    op.create_index(
        op.f("user_roles_tenant_id_role_id_idx"),
        "user_roles",
        ["tenant_id", "role_id"],
        unique=False,
        schema="pdp",
    )
    op.execute("INSERT INTO pdp.sync_meta DEFAULT VALUES")
    create(*_sql_objects())


def downgrade() -> None:
    drop(*_sql_objects())
    op.drop_index(op.f("user_roles_tenant_id_role_id_idx"), table_name="user_roles", schema="pdp")
    op.drop_table("user_roles", schema="pdp")
    op.drop_table("role_permissions", schema="pdp")
    op.drop_index(
        op.f("role_inherits_tenant_id_inherits_id_idx"), table_name="role_inherits", schema="pdp"
    )
    op.drop_table("role_inherits", schema="pdp")
    op.drop_index(op.f("group_roles_tenant_id_role_id_idx"), table_name="group_roles", schema="pdp")
    op.drop_table("group_roles", schema="pdp")
    op.drop_index(
        op.f("group_members_tenant_id_user_id_idx"), table_name="group_members", schema="pdp"
    )
    op.drop_table("group_members", schema="pdp")
    op.drop_table("users", schema="pdp")
    op.drop_table("roles", schema="pdp")
    op.drop_table("groups", schema="pdp")
    op.drop_table("tenants", schema="pdp")
    op.drop_table("sync_meta", schema="pdp")
    op.drop_index("change_log_txid_idx", table_name="change_log", schema="pdp")
    op.drop_index("change_log_changed_at_idx", table_name="change_log", schema="pdp")
    op.drop_table("change_log", schema="pdp")
