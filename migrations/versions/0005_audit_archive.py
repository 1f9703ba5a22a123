"""The audit archive: change-log rows kept for audit after sync no longer needs them.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

Sync needs the change log for hours (PDP_CHANGE_RETENTION); auditors need it for months
or years (PDP_AUDIT_RETENTION). `pdp prune` therefore moves a row it removes from
pdp.change_log into pdp.audit_archive in the same statement (a row is in one table or
the other, never neither, never both), and deletes archive rows only once they are
older than the audit retention. The audit surfaces read the union of the two tables.

The archive has the change log's columns, names and types; `id` is the change log's
id (not a new sequence), so an audit record keeps its identity when it moves. It is
indexed by (tenant_id, id) for the audit trail's keyset pages and by changed_at for
retention. Row-Level Security: the policies of the change log, from revision 0004's
helper, so an admin token reads its own tenant's archive only; the sidecar role gets
no grant (sync never reads the archive).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_v1 = importlib.import_module("pdp.migrations.versions.0001_schema")
_v4 = importlib.import_module("pdp.migrations.versions.0004_roles_rls_admin_tokens")


def upgrade() -> None:
    op.create_table(
        "audit_archive",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("txid", _v1.XID8(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=True),
        sa.Column("entity", sa.Text(), nullable=False),
        sa.Column("op", sa.Text(), nullable=False),
        sa.Column("key", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("old", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("new", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("actor", sa.Text(), nullable=True),
        sa.Column("changed_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.CheckConstraint(
            "op IN ('insert', 'update', 'delete', 'truncate', 'bulk_load')",
            name=op.f("audit_archive_op_check"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("audit_archive_pkey")),
        schema="pdp",
    )
    op.create_index("audit_archive_changed_at_idx", "audit_archive", ["changed_at"], schema="pdp")
    op.create_index(
        "audit_archive_tenant_id_idx", "audit_archive", ["tenant_id", "id"], schema="pdp"
    )
    # Erasure rewrites archived rows (the owner does; the admin role only reads).
    op.execute(f"GRANT SELECT ON pdp.audit_archive TO {_v4.ADMIN}")
    for statement in _v4.tenant_policies("audit_archive"):
        op.execute(statement)


def downgrade() -> None:
    for statement in _v4.drop_tenant_policies("audit_archive"):
        op.execute(statement)
    op.execute(f"REVOKE ALL ON pdp.audit_archive FROM {_v4.ADMIN}")
    op.drop_index("audit_archive_tenant_id_idx", table_name="audit_archive", schema="pdp")
    op.drop_index("audit_archive_changed_at_idx", table_name="audit_archive", schema="pdp")
    op.drop_table("audit_archive", schema="pdp")
