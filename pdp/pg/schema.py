"""The `pdp` schema: the public contract applications write to with their own SQL.

Defined once here as SQLAlchemy Core metadata; the Alembic migrations create it and
use it as `target_metadata`. Table and column names must not change: applications
and the change-capture triggers depend on them.

Constraints live in the database so that they hold whoever writes:
ids are non-empty and at most 256 characters, `status` is 'active' or 'disabled',
permissions are `type:action` and scopes `*` | `type:*` | `type:id`.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Double,
    ForeignKeyConstraint,
    Index,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, TIMESTAMP, UUID
from sqlalchemy.dialects.postgresql.base import ischema_names
from sqlalchemy.types import LargeBinary, UserDefinedType

SCHEMA = "pdp"
MAX_ID_LENGTH = 256

# A name is a resource type or an action: letters, digits and `_ . - /`, not starting
# with punctuation, at most 256 characters. `*` stands for any. A scope's id part is
# any non-empty text of at most 256 characters.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_./-]{0,255}"
PERMISSION_PATTERN = rf"^({NAME_PATTERN}|\*):({NAME_PATTERN}|\*)$"
SCOPE_PATTERN = rf"^(\*|{NAME_PATTERN}:.+)$"


class Xid8(UserDefinedType[int]):
    """PostgreSQL's 64-bit transaction id type."""

    cache_ok = True

    def get_col_spec(self, **kw: object) -> str:
        return "xid8"


# Let reflection (alembic's compare) recognise the type instead of warning.
ischema_names["xid8"] = Xid8


metadata = MetaData(
    schema=SCHEMA,
    naming_convention={
        "pk": "%(table_name)s_pkey",
        "fk": "%(table_name)s_%(column_0_N_name)s_fkey",
        "ck": "%(table_name)s_%(constraint_name)s_check",
        "ix": "%(table_name)s_%(column_0_N_name)s_idx",
    },
)


def _now() -> Column[object]:
    return Column(
        "created_at", TIMESTAMP(timezone=True), nullable=False, server_default=text("now()")
    )


def _id_check(*columns: str) -> list[CheckConstraint]:
    return [
        CheckConstraint(f"{c} <> '' AND length({c}) <= {MAX_ID_LENGTH}", name=c) for c in columns
    ]


def _tenant_fk(table: str) -> ForeignKeyConstraint:
    return ForeignKeyConstraint(["tenant_id"], ["pdp.tenants.id"], ondelete="CASCADE")


tenants = Table(
    "tenants",
    metadata,
    Column("id", Text, nullable=False),
    Column("name", Text, nullable=False, server_default=""),
    _now(),
    PrimaryKeyConstraint("id"),
    *_id_check("id"),
)

users = Table(
    "users",
    metadata,
    Column("tenant_id", Text, nullable=False),
    Column("id", Text, nullable=False),
    Column("status", Text, nullable=False, server_default="active"),
    Column("attributes", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    _now(),
    Column("updated_at", TIMESTAMP(timezone=True), nullable=False, server_default=text("now()")),
    PrimaryKeyConstraint("tenant_id", "id"),
    _tenant_fk("users"),
    CheckConstraint("status IN ('active', 'disabled')", name="status"),
    *_id_check("id"),
)

groups = Table(
    "groups",
    metadata,
    Column("tenant_id", Text, nullable=False),
    Column("id", Text, nullable=False),
    Column("description", Text, nullable=False, server_default=""),
    PrimaryKeyConstraint("tenant_id", "id"),
    _tenant_fk("groups"),
    *_id_check("id"),
)

group_members = Table(
    "group_members",
    metadata,
    Column("tenant_id", Text, nullable=False),
    Column("group_id", Text, nullable=False),
    Column("user_id", Text, nullable=False),
    PrimaryKeyConstraint("tenant_id", "group_id", "user_id"),
    ForeignKeyConstraint(
        ["tenant_id", "group_id"], ["pdp.groups.tenant_id", "pdp.groups.id"], ondelete="CASCADE"
    ),
    ForeignKeyConstraint(
        ["tenant_id", "user_id"], ["pdp.users.tenant_id", "pdp.users.id"], ondelete="CASCADE"
    ),
    Index(None, "tenant_id", "user_id"),
)

roles = Table(
    "roles",
    metadata,
    Column("tenant_id", Text, nullable=False),
    Column("id", Text, nullable=False),
    Column("description", Text, nullable=False, server_default=""),
    PrimaryKeyConstraint("tenant_id", "id"),
    _tenant_fk("roles"),
    *_id_check("id"),
)

role_inherits = Table(
    "role_inherits",
    metadata,
    Column("tenant_id", Text, nullable=False),
    Column("role_id", Text, nullable=False),
    Column("inherits_id", Text, nullable=False),
    PrimaryKeyConstraint("tenant_id", "role_id", "inherits_id"),
    ForeignKeyConstraint(
        ["tenant_id", "role_id"], ["pdp.roles.tenant_id", "pdp.roles.id"], ondelete="CASCADE"
    ),
    ForeignKeyConstraint(
        ["tenant_id", "inherits_id"], ["pdp.roles.tenant_id", "pdp.roles.id"], ondelete="CASCADE"
    ),
    Index(None, "tenant_id", "inherits_id"),
)

role_permissions = Table(
    "role_permissions",
    metadata,
    Column("tenant_id", Text, nullable=False),
    Column("role_id", Text, nullable=False),
    Column("permission", Text, nullable=False),
    # A CEL expression (pdp.conditions) that must be true for the grant to apply;
    # NULL: unconditional.
    Column("condition", Text, nullable=True),
    PrimaryKeyConstraint("tenant_id", "role_id", "permission"),
    ForeignKeyConstraint(
        ["tenant_id", "role_id"], ["pdp.roles.tenant_id", "pdp.roles.id"], ondelete="CASCADE"
    ),
    CheckConstraint(
        f"permission ~ '{PERMISSION_PATTERN}'",
        name="permission",
    ),
)


def _assignment(name: str, holder: str, holder_table: str) -> Table:
    return Table(
        name,
        metadata,
        Column("tenant_id", Text, nullable=False),
        Column(holder, Text, nullable=False),
        Column("role_id", Text, nullable=False),
        Column("scope", Text, nullable=False, server_default="*"),
        Column("expires_at", TIMESTAMP(timezone=True), nullable=True),
        PrimaryKeyConstraint("tenant_id", holder, "role_id", "scope"),
        ForeignKeyConstraint(
            ["tenant_id", holder],
            [f"pdp.{holder_table}.tenant_id", f"pdp.{holder_table}.id"],
            ondelete="CASCADE",
        ),
        ForeignKeyConstraint(
            ["tenant_id", "role_id"], ["pdp.roles.tenant_id", "pdp.roles.id"], ondelete="CASCADE"
        ),
        CheckConstraint(
            f"scope ~ '{SCOPE_PATTERN}' AND length(scope) - strpos(scope, ':') <= {MAX_ID_LENGTH}",
            name="scope",
        ),
        Index(None, "tenant_id", "role_id"),
    )


user_roles = _assignment("user_roles", "user_id", "users")
group_roles = _assignment("group_roles", "group_id", "groups")

# The optional resource inventory: conditions read `resource.attributes`; resource
# search lists the inventory's resources that wildcard grants cover.
resources = Table(
    "resources",
    metadata,
    Column("tenant_id", Text, nullable=False),
    Column("type", Text, nullable=False),
    Column("id", Text, nullable=False),
    Column("attributes", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    PrimaryKeyConstraint("tenant_id", "type", "id"),
    _tenant_fk("resources"),
    CheckConstraint(f"type ~ '^{NAME_PATTERN}$'", name="type"),
    *_id_check("id"),
)

change_log = Table(
    "change_log",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("txid", Xid8(), nullable=False, server_default=text("pg_current_xact_id()")),
    Column("tenant_id", Text, nullable=True),
    Column("entity", Text, nullable=False),
    Column("op", Text, nullable=False),
    Column("key", JSONB, nullable=True),
    Column("old", JSONB, nullable=True),
    Column("new", JSONB, nullable=True),
    Column("actor", Text, nullable=True),
    Column(
        "changed_at",
        TIMESTAMP(timezone=True),
        nullable=False,
        server_default=text("clock_timestamp()"),
    ),
    CheckConstraint("op IN ('insert', 'update', 'delete', 'truncate', 'bulk_load')", name="op"),
    Index("change_log_txid_idx", "txid"),
    Index("change_log_changed_at_idx", "changed_at"),
)

sync_meta = Table(
    "sync_meta",
    metadata,
    Column("singleton", Boolean, nullable=False, server_default=text("true")),
    Column("epoch", UUID(as_uuid=True), nullable=False, server_default=text("gen_random_uuid()")),
    Column("purged_max_xid", Xid8(), nullable=True),
    Column("purged_at", TIMESTAMP(timezone=True), nullable=True),
    PrimaryKeyConstraint("singleton"),
    CheckConstraint("singleton", name="singleton"),
)

# The audit archive (revision 0005): change-log rows `pdp prune` removed from the sync
# window, kept until PDP_AUDIT_RETENTION; same columns, `id` the change log's own.
audit_archive = Table(
    "audit_archive",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("txid", Xid8(), nullable=False),
    Column("tenant_id", Text, nullable=True),
    Column("entity", Text, nullable=False),
    Column("op", Text, nullable=False),
    Column("key", JSONB, nullable=True),
    Column("old", JSONB, nullable=True),
    Column("new", JSONB, nullable=True),
    Column("actor", Text, nullable=True),
    Column("changed_at", TIMESTAMP(timezone=True), nullable=False),
    CheckConstraint("op IN ('insert', 'update', 'delete', 'truncate', 'bulk_load')", name="op"),
    Index("audit_archive_changed_at_idx", "changed_at"),
    Index("audit_archive_tenant_id_idx", "tenant_id", "id"),
)

# Decision logs (revision 0006): one row per logged decision, written by the sidecars'
# decision-log worker with COPY, partitioned by day on `time` (partitions
# pdp.decision_log_pYYYYMMDD are created ahead and dropped past PDP_DECISION_LOG_RETENTION
# by pdp.decision_log_maintain). `id` is the X-PDP-Decision-Id / context.decision_id.
decision_log = Table(
    "decision_log",
    metadata,
    Column("id", Text, nullable=False),
    Column("time", TIMESTAMP(timezone=True), nullable=False),
    Column("endpoint", Text, nullable=False),
    Column("tenant_id", Text, nullable=False),
    Column("subject_type", Text, nullable=False),
    Column("subject_id", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("resource_type", Text, nullable=False),
    Column("resource_id", Text, nullable=False),
    Column("decision", Boolean, nullable=False),
    Column("reason", Text, nullable=False),
    Column("revision", Text, nullable=True),
    Column("latency_ms", Double, nullable=False),
    Index("decision_log_id_idx", "id"),
    Index("decision_log_subject_idx", "tenant_id", "subject_id"),
    postgresql_partition_by="RANGE (time)",
)

# The admin API's tokens (revision 0004): the SHA-256 of each secret, never the secret.
# Not replicated and not captured; neither pdp_sidecar nor pdp_admin may read it (the
# admin API calls the SECURITY DEFINER function pdp.admin_token_lookup(id)).
admin_tokens = Table(
    "admin_tokens",
    metadata,
    Column("id", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("secret_sha256", LargeBinary, nullable=False),
    Column("scopes", ARRAY(Text), nullable=False),
    Column("tenant_id", Text, nullable=True),
    _now(),
    Column("expires_at", TIMESTAMP(timezone=True), nullable=True),
    Column("last_used_at", TIMESTAMP(timezone=True), nullable=True),
    Column("revoked_at", TIMESTAMP(timezone=True), nullable=True),
    PrimaryKeyConstraint("id"),
    UniqueConstraint("name", name="admin_tokens_name_key"),
    _tenant_fk("admin_tokens"),
)

# The tables applications write, parents before children; change capture covers each.
DATA_TABLES: tuple[Table, ...] = (
    tenants,
    users,
    groups,
    group_members,
    roles,
    role_inherits,
    role_permissions,
    user_roles,
    group_roles,
    resources,
)


def primary_key(table: Table) -> tuple[str, ...]:
    """Primary-key column names of `table`, in order."""
    return tuple(c.name for c in table.primary_key.columns)
