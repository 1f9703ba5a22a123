"""Database roles, tenant isolation by Row-Level Security, and the admin API's tokens.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

Three kinds of connection, three roles:

- the owner (whoever runs `pdp migrate`): owns the tables, bypasses RLS (tables are
  not FORCE'd), used only by migrations and the operator's commands;
- `pdp_sidecar`: what a sidecar and the relay need and nothing else: SELECT on the
  replicated tables, the change log and sync_meta; no write, no token;
- `pdp_admin`: the admin API's role. Not the owner, so every row it reads or writes
  passes the policies below, keyed on settings its transaction sets with SET LOCAL:
  `pdp.tenant` (the one tenant a request may touch) and `pdp.platform` = 'on' (a
  token without a tenant: it may see and manage the tenants table itself). With
  neither set it sees nothing. TRUNCATE, which RLS does not cover, is not granted.

Roles are cluster-wide: they are created when missing (two migrations racing on one
cluster both succeed) and never dropped by a downgrade, which only revokes what this
revision granted in this database. Login roles are the operator's: e.g.
`CREATE ROLE pdp_admin_api LOGIN PASSWORD '...' IN ROLE pdp_admin`.

Tokens live in pdp.admin_tokens, which neither role can read: the admin API looks a
token up by its public id through pdp.admin_token_lookup(), a SECURITY DEFINER
function that returns the stored SHA-256 of the secret and records last_used_at.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SIDECAR = "pdp_sidecar"
ADMIN = "pdp_admin"

# Tables holding one tenant's rows (keyed by tenant_id), and the tenants table itself.
TENANT_TABLES = (
    "users",
    "groups",
    "group_members",
    "roles",
    "role_inherits",
    "role_permissions",
    "user_roles",
    "group_roles",
    "resources",
)
# Frozen at this revision; a later table gets its own grants and policies in its own
# revision, through the same two helpers below.
REPLICATED = ("tenants", *TENANT_TABLES)

_TENANT = "current_setting('pdp.tenant', true)"
_PLATFORM = "current_setting('pdp.platform', true) = 'on'"


def _create_role(name: str) -> str:
    # CREATE ROLE has no IF NOT EXISTS; concurrent creators meet a unique violation.
    return f"""
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{name}') THEN
        CREATE ROLE {name} NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$"""


def tenant_policies(table: str, tenant_column: str = "tenant_id") -> list[str]:
    """RLS on one table: the sidecar reads all, the admin role only its tenant's rows."""
    visible = f"{tenant_column} = {_TENANT}"
    if table == "tenants":
        visible = f"({visible} OR {_PLATFORM})"
    return [
        f"ALTER TABLE pdp.{table} ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY sidecar_read ON pdp.{table} FOR SELECT TO {SIDECAR} USING (true)",
        # Permissive: the admin role's base access; restrictive: the tenant bound, which
        # any permissive policy added later is still ANDed with.
        f"CREATE POLICY admin_base ON pdp.{table} TO {ADMIN} USING (true) WITH CHECK (true)",
        f"CREATE POLICY admin_tenant ON pdp.{table} AS RESTRICTIVE TO {ADMIN} "
        f"USING ({visible}) WITH CHECK ({visible})",
    ]


def drop_tenant_policies(table: str) -> list[str]:
    return [
        *(
            f"DROP POLICY {p} ON pdp.{table}"
            for p in ("admin_tenant", "admin_base", "sidecar_read")
        ),
        f"ALTER TABLE pdp.{table} DISABLE ROW LEVEL SECURITY",
    ]


TOKENS = """
CREATE TABLE pdp.admin_tokens (
    id text PRIMARY KEY CHECK (id ~ '^[0-9a-f]{12}$'),
    name text NOT NULL CONSTRAINT admin_tokens_name_key UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$'),
    secret_sha256 bytea NOT NULL CHECK (length(secret_sha256) = 32),
    scopes text[] NOT NULL
        CHECK (cardinality(scopes) > 0 AND scopes <@ ARRAY['read', 'write', 'admin']),
    tenant_id text REFERENCES pdp.tenants (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz,
    last_used_at timestamptz,
    revoked_at timestamptz
)"""

LOOKUP = """
CREATE FUNCTION pdp.admin_token_lookup(p_id text)
RETURNS TABLE (name text, secret_sha256 bytea, scopes text[], tenant_id text,
               expires_at timestamptz, revoked_at timestamptz)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    -- last_used_at at most once a minute per token: no write per request.
    UPDATE pdp.admin_tokens t SET last_used_at = now()
    WHERE t.id = p_id AND t.revoked_at IS NULL
      AND (t.last_used_at IS NULL OR t.last_used_at < now() - interval '1 minute');
    SELECT t.name, t.secret_sha256, t.scopes, t.tenant_id, t.expires_at, t.revoked_at
    FROM pdp.admin_tokens t WHERE t.id = p_id;
$fn$"""


ACTIVE = """
CREATE FUNCTION pdp.admin_tokens_active() RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT count(*) FROM pdp.admin_tokens
    WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now());
$fn$"""


def upgrade() -> None:
    op.execute(_create_role(SIDECAR))
    op.execute(_create_role(ADMIN))
    op.execute(f"GRANT USAGE ON SCHEMA pdp TO {SIDECAR}, {ADMIN}")
    tables = ", ".join(f"pdp.{t}" for t in REPLICATED)
    op.execute(f"GRANT SELECT ON {tables}, pdp.change_log, pdp.sync_meta TO {SIDECAR}")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {tables} TO {ADMIN}")
    # Change capture runs as the writer: the admin role appends (and may read) its
    # tenant's change-log rows, through the same policies.
    op.execute(f"GRANT SELECT, INSERT ON pdp.change_log TO {ADMIN}")
    op.execute(f"GRANT USAGE ON SEQUENCE pdp.change_log_id_seq TO {ADMIN}")
    for table in REPLICATED:
        for statement in tenant_policies(table, "id" if table == "tenants" else "tenant_id"):
            op.execute(statement)
    for statement in tenant_policies("change_log"):
        op.execute(statement)
    op.execute(TOKENS)
    op.execute(LOOKUP)
    op.execute("REVOKE ALL ON FUNCTION pdp.admin_token_lookup(text) FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION pdp.admin_token_lookup(text) TO {ADMIN}")
    op.execute(ACTIVE)
    op.execute("REVOKE ALL ON FUNCTION pdp.admin_tokens_active() FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION pdp.admin_tokens_active() TO {ADMIN}")


def downgrade() -> None:
    op.execute("DROP FUNCTION pdp.admin_tokens_active()")
    op.execute("DROP FUNCTION pdp.admin_token_lookup(text)")
    op.execute("DROP TABLE pdp.admin_tokens")
    for table in (*REPLICATED, "change_log"):
        for statement in drop_tenant_policies(table):
            op.execute(statement)
    tables = ", ".join(f"pdp.{t}" for t in REPLICATED)
    op.execute(f"REVOKE ALL ON SEQUENCE pdp.change_log_id_seq FROM {ADMIN}")
    op.execute(f"REVOKE ALL ON {tables}, pdp.change_log, pdp.sync_meta FROM {SIDECAR}, {ADMIN}")
    op.execute(f"REVOKE USAGE ON SCHEMA pdp FROM {SIDECAR}, {ADMIN}")
