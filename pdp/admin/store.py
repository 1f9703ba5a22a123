"""The admin API's database side: every request is one transaction in the pdp_admin role.

Each transaction starts with `SET LOCAL ROLE pdp_admin` and sets `pdp.tenant` (the
tenant of the request), `pdp.platform` (a platform token on the tenants table) and
`pdp.actor` (the token's name, which change capture records). Row-Level Security
then bounds every statement to that tenant, whatever the query says: the
application's own `tenant_id = $1` is the second wall, not the only one. A write
returns its transaction id, the revision a caller passes as `X-PDP-Min-Revision`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from pdp.admin.kinds import AdminError, Kind, unprocessable
from pdp.admin.tokens import Principal
from pdp.errors import RequestError
from pdp.pg import schema

Row = dict[str, Any]


def _references() -> dict[str, tuple[str, str]]:
    """Foreign-key constraint name -> (the referencing column that names, the table)."""
    out = {}
    for table in schema.metadata.tables.values():
        for fk in table.foreign_key_constraints:
            columns = [c.name for c in fk.columns if c.name != "tenant_id"] or ["tenant_id"]
            out[str(fk.name)] = (columns[-1], fk.referred_table.name)
    return out


_REFERENCES = _references()
_SINGULAR = {
    "users": "user", "groups": "group", "roles": "role", "tenants": "tenant",
}  # fmt: skip


def to_json(row: asyncpg.Record | Row) -> Row:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in dict(row).items()}


def etag(row: Row) -> str:
    canonical = json.dumps(row, sort_keys=True, separators=(",", ":"), default=str)
    return '"' + hashlib.sha256(canonical.encode()).hexdigest()[:32] + '"'


def page_token(key: Sequence[str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode().rstrip("=")


def parse_page_token(token: str, width: int) -> tuple[str, ...]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        key = json.loads(raw)
    except (binascii.Error, ValueError):
        key = None
    if not isinstance(key, list) or len(key) != width or not all(isinstance(k, str) for k in key):
        raise RequestError(
            "after: not a page token of this list (use the 'next' it returned)", "after"
        )
    return tuple(key)


async def _init(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def connect(url: str) -> asyncpg.Connection:
    """One connection with the admin side's codecs (jsonb as Python objects)."""
    conn = await asyncpg.connect(url)
    await _init(conn)
    return conn


async def create_pool(url: str) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(url, min_size=1, max_size=8, init=_init)
    assert pool is not None
    return pool


@dataclass(frozen=True, slots=True)
class Written:
    row: Row | None
    revision: str


class AdminStore:
    """Queries of the managed tables, each within `transaction(...)`."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @contextlib.asynccontextmanager
    async def transaction(
        self,
        principal: Principal | None,
        tenant: str | None,
        *,
        platform: bool = False,
        isolation: str | None = None,
    ) -> AsyncIterator[asyncpg.Connection]:
        """One transaction as pdp_admin, bounded to `tenant`'s rows.

        `platform`: the tenants table itself is visible too (only for a platform token).
        `isolation`: e.g. "repeatable_read" for several reads of one snapshot.
        """
        platform = platform and principal is not None and principal.tenant_id is None
        async with self._pool.acquire() as conn, conn.transaction(isolation=isolation):
            # One round trip: set_config('role', ...) is SET LOCAL ROLE.
            await conn.execute(
                "SELECT set_config('role', 'pdp_admin', true), set_config('pdp.tenant', $1, true),"
                " set_config('pdp.platform', $2, true), set_config('pdp.actor', $3, true)",
                tenant or "", "on" if platform else "", principal.name if principal else "",
            )  # fmt: skip
            try:
                yield conn
            except asyncpg.PostgresError as exc:
                raise database_error(exc) from None

    # --- tokens -----------------------------------------------------------------------

    async def lookup_token(self, token_id: str) -> Any:
        from pdp.admin import token_store  # noqa: PLC0415

        # One statement, no transaction: the function is SECURITY DEFINER, and the
        # login (a pdp_admin member, or the owner) may execute it.
        async with self._pool.acquire() as conn:
            return await token_store.lookup(conn, token_id)

    # --- rows -------------------------------------------------------------------------

    async def tenant_visible(self, conn: asyncpg.Connection, tenant: str) -> bool:
        return bool(
            await conn.fetchval("SELECT EXISTS (SELECT FROM pdp.tenants WHERE id = $1)", tenant)
        )

    async def rows(
        self, conn: asyncpg.Connection, kind: Kind, tenant: str, *, filters: dict[str, str],
        after: tuple[str, ...] | None, limit: int,
    ) -> tuple[list[Row], str | None]:  # fmt: skip
        """One page of `kind` in key order, and the token of the next (None: the last)."""
        where: list[str] = ["tenant_id = $1"]
        args: list[object] = [tenant]
        for column, value in filters.items():
            args.append(value)
            where.append(f"{column} = ${len(args)}")
        keys = ", ".join(kind.key)
        if after is not None:
            marks = []
            for value in after:
                args.append(value)
                marks.append(f"${len(args)}")
            where.append(f"({keys}) > ({', '.join(marks)})")
        args.append(limit + 1)
        rows = await conn.fetch(
            f"SELECT {', '.join(self._select(kind))} FROM pdp.{kind.table}"
            f" WHERE {' AND '.join(where)} ORDER BY {keys} LIMIT ${len(args)}",
            *args,
        )
        page = [to_json(r) for r in rows[:limit]]
        following = page_token([page[-1][k] for k in kind.key]) if len(rows) > limit else None
        return page, following

    async def get(
        self,
        conn: asyncpg.Connection,
        kind: Kind,
        tenant: str,
        key: dict[str, str],
        *,
        lock: bool = False,
    ) -> Row | None:
        where, args = self._key_where(tenant, key)
        row = await conn.fetchrow(
            f"SELECT {', '.join(self._select(kind))} FROM pdp.{kind.table} WHERE {where}"
            + (" FOR UPDATE" if lock else ""),
            *args,
        )
        return None if row is None else to_json(row)

    async def create(
        self, conn: asyncpg.Connection, kind: Kind, tenant: str, key: dict[str, str], fields: Row
    ) -> Written:
        values = {"tenant_id": tenant, **key, **fields}
        marks = ", ".join(f"${i}" for i in range(1, len(values) + 1))
        try:
            row = await conn.fetchrow(
                f"INSERT INTO pdp.{kind.table} ({', '.join(values)}) VALUES ({marks})"
                f" RETURNING {', '.join(self._select(kind))}",
                *values.values(),
            )
        except asyncpg.ForeignKeyViolationError as exc:
            raise database_error(exc, values) from None
        return Written(to_json(row), await revision(conn))

    async def update(
        self, conn: asyncpg.Connection, kind: Kind, tenant: str, key: dict[str, str],
        fields: Row, *, if_match: str | None,
    ) -> Written:  # fmt: skip
        await self._current(conn, kind, tenant, key, if_match=if_match)
        where, args = self._key_where(tenant, key)
        sets = ", ".join(f"{c} = ${len(args) + i}" for i, c in enumerate(fields, start=1))
        touched = ", updated_at = now()" if kind.table == "users" else ""
        row = await conn.fetchrow(
            f"UPDATE pdp.{kind.table} SET {sets}{touched} WHERE {where}"
            f" RETURNING {', '.join(self._select(kind))}",
            *args,
            *fields.values(),
        )
        return Written(to_json(row), await revision(conn))

    async def delete(
        self, conn: asyncpg.Connection, kind: Kind, tenant: str, key: dict[str, str],
        *, if_match: str | None,
    ) -> Written:  # fmt: skip
        await self._current(conn, kind, tenant, key, if_match=if_match)
        where, args = self._key_where(tenant, key)
        await conn.execute(f"DELETE FROM pdp.{kind.table} WHERE {where}", *args)
        return Written(None, await revision(conn))

    async def _current(
        self, conn: asyncpg.Connection, kind: Kind, tenant: str, key: dict[str, str],
        *, if_match: str | None,
    ) -> Row:  # fmt: skip
        row = await self.get(conn, kind, tenant, key, lock=True)
        if row is None:
            raise not_found(kind, key)
        if if_match is not None and if_match.strip() not in ("*", etag(row)):
            raise AdminError(
                412, "precondition_failed",
                f"{kind.name} {_shown(key)} changed since that ETag was read (now {etag(row)})",
            )  # fmt: skip
        return row

    @staticmethod
    def _select(kind: Kind) -> tuple[str, ...]:
        extra = ("created_at", "updated_at") if kind.table == "users" else ()
        return (*kind.columns, *extra)

    @staticmethod
    def _key_where(tenant: str, key: dict[str, str]) -> tuple[str, list[str]]:
        args = [tenant, *key.values()]
        where = " AND ".join(
            ["tenant_id = $1", *(f"{c} = ${i}" for i, c in enumerate(key, start=2))]
        )
        return where, args


async def revision(conn: asyncpg.Connection) -> str:
    return str(await conn.fetchval("SELECT pg_current_xact_id()::text"))


def _shown(key: dict[str, str]) -> str:
    return " ".join(f"{k}={v!r}" for k, v in key.items())


def not_found(kind: Kind, key: dict[str, str]) -> AdminError:
    return AdminError(404, "not_found", f"no {kind.name} with {_shown(key)}")


def database_error(  # noqa: PLR0911
    exc: asyncpg.PostgresError, values: Row | None = None
) -> Exception:
    """What a refused statement means to the caller; anything unforeseen stays a 500."""
    if isinstance(exc, asyncpg.UniqueViolationError):
        return AdminError(409, "conflict", f"already exists: {exc.detail or exc.message}")
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        # PostgreSQL leaves the key out of the detail when RLS covers the referenced
        # table: the constraint says which reference failed, the written row its value.
        found = _REFERENCES.get(exc.constraint_name or "")
        if found is None:
            return unprocessable(exc.message, None)
        column, table = found
        value = (values or {}).get(column)
        shown = "" if value is None else f" {value!r}"
        return unprocessable(f"unknown {_SINGULAR.get(table, table)}{shown}", column)
    if isinstance(exc, asyncpg.CheckViolationError):
        # The cycle guard names the path; a grammar check names its constraint.
        constraint, table = exc.constraint_name or "", exc.table_name or ""
        prefix, suffix = f"{table}_", "_check"
        named = constraint.startswith(prefix) and constraint.endswith(suffix)
        return unprocessable(exc.message, constraint[len(prefix) : -len(suffix)] if named else None)
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        # Row-Level Security refused it: the row belongs to no tenant this token may name.
        return AdminError(404, "not_found", "unknown tenant")
    if isinstance(exc, (asyncpg.DataError, asyncpg.NotNullViolationError)):
        return unprocessable(exc.message, getattr(exc, "column_name", None))
    error: Exception = exc
    return error
