"""Admin tokens in PostgreSQL (pdp.admin_tokens): create, list, revoke, look up.

The operator's commands (`pdp admin token ...`) run as the owner; the admin API,
connected as pdp_admin, can only call pdp.admin_token_lookup() and never reads
the table. Nothing here logs a token or a digest.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from pdp.admin.tokens import NewToken, StoredToken, new_token
from pdp.errors import UserError


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A token as `list` shows it: everything but its digest."""

    id: str
    name: str
    scopes: tuple[str, ...]
    tenant_id: str | None
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None

    def line(self) -> str:
        def shown(value: datetime | None) -> str:
            return "-" if value is None else value.isoformat(timespec="seconds")

        state = "revoked" if self.revoked_at is not None else "active"
        return (
            f"{self.name}\tid={self.id}\tscopes={','.join(self.scopes)}"
            f"\ttenant={self.tenant_id or '*'}\tcreated={shown(self.created_at)}"
            f"\texpires={shown(self.expires_at)}\tlast_used={shown(self.last_used_at)}\t{state}"
        )


async def create(
    conn: asyncpg.Connection,
    name: str,
    scopes: tuple[str, ...],
    tenant_id: str | None = None,
    expires_in: timedelta | None = None,
) -> NewToken:
    """Store a new token's digest; UserError for a taken name or an unknown tenant."""
    token = new_token()
    try:
        await conn.execute(
            "INSERT INTO pdp.admin_tokens (id, name, secret_sha256, scopes, tenant_id, expires_at)"
            " VALUES ($1, $2, $3, $4, $5, now() + $6::interval)",
            token.id, name, token.secret_sha256, list(scopes), tenant_id, expires_in,
        )  # fmt: skip
    except asyncpg.UniqueViolationError:
        raise UserError(
            f"an admin token named {name!r} exists (revoke it or pick another name)"
        ) from None
    except asyncpg.ForeignKeyViolationError:
        raise UserError(f"unknown tenant {tenant_id!r}") from None
    except asyncpg.CheckViolationError:
        raise UserError(
            f"bad token name {name!r}: letters, digits and _.@- (up to 128, starting alphanumeric)"
        ) from None
    return token


async def list_all(conn: asyncpg.Connection) -> list[TokenInfo]:
    rows = await conn.fetch(
        "SELECT id, name, scopes, tenant_id, created_at, expires_at, last_used_at, revoked_at"
        " FROM pdp.admin_tokens ORDER BY name"
    )
    return [TokenInfo(**{**dict(r), "scopes": tuple(r["scopes"])}) for r in rows]


async def revoke(conn: asyncpg.Connection, name: str) -> None:
    """Mark the token revoked (kept for the record); UserError when there is none active."""
    done = await conn.fetchval(
        "UPDATE pdp.admin_tokens SET revoked_at = now()"
        " WHERE name = $1 AND revoked_at IS NULL RETURNING id",
        name,
    )
    if done is None:
        raise UserError(f"no active admin token named {name!r}")


async def lookup(conn: asyncpg.Connection, token_id: str) -> StoredToken | None:
    """The stored token with this public id, through the SECURITY DEFINER function."""
    row = await conn.fetchrow("SELECT * FROM pdp.admin_token_lookup($1)", token_id)
    if row is None:
        return None
    return StoredToken(
        row["name"], bytes(row["secret_sha256"]), tuple(row["scopes"]),
        row["tenant_id"], row["expires_at"], row["revoked_at"],
    )  # fmt: skip


async def any_active(conn: asyncpg.Connection) -> bool:
    """Whether the admin API has anyone to serve (it stays off otherwise)."""
    return bool(await conn.fetchval("SELECT pdp.admin_tokens_active()"))
