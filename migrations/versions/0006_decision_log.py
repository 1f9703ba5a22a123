"""The decision log: one row per logged decision, partitioned by day on `time`.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01

Sidecars started with PDP_DECISION_LOG=postgres COPY their decisions into
pdp.decision_log (`id` is the decision id the answer carried). The table is
partitioned by range on `time`, one partition a UTC day named
`decision_log_pYYYYMMDD`. Partitions are created and dropped by
`pdp.decision_log_maintain(ahead_days, retention)`, which the writer calls at start and
hourly: it creates the partitions of yesterday to `ahead_days` from today that are
missing and drops those whose whole day is older than `retention`
(PDP_DECISION_LOG_RETENTION). Only a table's owner may add or drop partitions, so the
function is SECURITY DEFINER (the owner's) and EXECUTE is granted to `pdp_sidecar` alone.

Roles: `pdp_sidecar` gets INSERT (COPY checks INSERT on the parent only) and nothing
else: a sidecar writes decisions but cannot read anyone's. No Row-Level Security: COPY
FROM refuses a table with RLS for a role it applies to, and no role but the owner
(auditors, through the operator) may read the table at all; `pdp_admin` gets no grant.
`pdp erase-subject` (as the owner) pseudonymises `subject_id`.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_v4 = importlib.import_module("pdp.migrations.versions.0004_roles_rls_admin_tokens")

MAINTAIN = """
CREATE FUNCTION pdp.decision_log_maintain(ahead_days integer, retention interval,
                                          OUT created text[], OUT dropped text[])
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    day date;
    name text;
    part record;
BEGIN
    created := '{}';
    dropped := '{}';
    IF ahead_days NOT BETWEEN 0 AND 31 THEN
        RAISE EXCEPTION 'ahead_days must be 0 to 31, got %', ahead_days;
    END IF;
    IF retention < interval '1 day' THEN
        RAISE EXCEPTION 'retention must be at least 1 day, got %', retention;
    END IF;
    FOR i IN -1..ahead_days LOOP
        day := today + i;
        name := 'decision_log_p' || to_char(day, 'YYYYMMDD');
        IF to_regclass('pdp.' || name) IS NULL THEN
            BEGIN
                EXECUTE format(
                    'CREATE TABLE pdp.%I PARTITION OF pdp.decision_log FOR VALUES FROM (%L) TO (%L)',
                    name, day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC');
                created := created || name;
            EXCEPTION WHEN duplicate_table THEN
                NULL;  -- another sidecar created it meanwhile
            END;
        END IF;
    END LOOP;
    FOR part IN
        SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'pdp.decision_log'::regclass
          AND c.relname ~ '^decision_log_p[0-9]{8}$'
        ORDER BY c.relname
    LOOP
        -- the partition's upper bound (the next day, UTC) is past the retention
        IF (to_date(substr(part.relname, 15), 'YYYYMMDD') + 1)::timestamp AT TIME ZONE 'UTC'
                <= now() - retention THEN
            EXECUTE format('DROP TABLE IF EXISTS pdp.%I', part.relname);
            dropped := dropped || part.relname::text;
        END IF;
    END LOOP;
END
$fn$"""


def upgrade() -> None:
    op.create_table(
        "decision_log",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("time", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("endpoint", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("subject_type", sa.Text(), nullable=False),
        sa.Column("subject_id", sa.Text(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("resource_type", sa.Text(), nullable=False),
        sa.Column("resource_id", sa.Text(), nullable=False),
        sa.Column("decision", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("revision", sa.Text(), nullable=True),
        sa.Column("latency_ms", sa.Double(), nullable=False),
        schema="pdp",
        postgresql_partition_by="RANGE (time)",
    )
    op.create_index("decision_log_id_idx", "decision_log", ["id"], schema="pdp")
    op.create_index(
        "decision_log_subject_idx", "decision_log", ["tenant_id", "subject_id"], schema="pdp"
    )
    op.execute(MAINTAIN)
    op.execute("REVOKE ALL ON FUNCTION pdp.decision_log_maintain(integer, interval) FROM PUBLIC")
    op.execute(
        f"GRANT EXECUTE ON FUNCTION pdp.decision_log_maintain(integer, interval) TO {_v4.SIDECAR}"
    )
    op.execute(f"GRANT INSERT ON pdp.decision_log TO {_v4.SIDECAR}")


def downgrade() -> None:
    op.execute(f"REVOKE ALL ON pdp.decision_log FROM {_v4.SIDECAR}")
    op.execute("DROP FUNCTION pdp.decision_log_maintain(integer, interval)")
    op.drop_index("decision_log_subject_idx", table_name="decision_log", schema="pdp")
    op.drop_index("decision_log_id_idx", table_name="decision_log", schema="pdp")
    op.drop_table("decision_log", schema="pdp")  # its partitions go with it
