"""Access review: every user's every effective permission and the path that grants it.

One row per grant path, columns `user_id, permission, role, path, via_group, scope,
expires_at, condition`: the user holds `role` (directly, or through `via_group`) on
`scope` until `expires_at`; `path` is the inheritance chain from `role` down to the
role that holds `permission` itself, joined by `>` (`role` alone when it holds it);
`condition` is the grant's condition (NULL: this schema has no conditional grants
yet). Only what a check would grant counts: active users, unexpired assignments.
Every inheritance path is listed (the engine's explanation names the shortest).

It is one SQL query, ordered by user, read through a server-side cursor: bounded
memory on this side at any tenant size.

The past (`at`): the state as of that moment is rebuilt from the current one by
replaying the change log (and its archive) backwards: a row's state at `at` is the
`old` of its first change after `at`, or its current state when nothing changed it
since. Into temporary tables of the transaction, then the same query. The limit is
retention: `at` must not be older than the oldest audit row kept (PDP_AUDIT_RETENTION),
and no bulk load (seed with capture off, TRUNCATE) of the tenant may lie after it.
An erased user appears under their pseudonym, as everywhere in history.

The diff (`since`): the rows of `at` (default now) not in the state of `since`
(`change` = `gained`) and those of `since` no longer there (`lost`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from pdp.admin import audit, erasure
from pdp.errors import RequestError
from pdp.pg import schema

COLUMNS = (
    "user_id", "permission", "role", "path", "via_group", "scope", "expires_at", "condition",
)  # fmt: skip
DIFF_COLUMNS = ("change", *COLUMNS)
TABLES = (
    "users", "groups", "group_members", "roles", "role_inherits", "role_permissions",
    "user_roles", "group_roles",
)  # fmt: skip
Source = Callable[[str], str]  # a table's name -> the relation to read it from


def current(table: str) -> str:
    return f"pdp.{table}"


def review_sql(src: Source, *, tenant: str = "$1", at: str = "$2") -> str:
    """The rows of the tenant's state in `src` as of `at` (both SQL expressions)."""
    return f"""
WITH RECURSIVE chain (top, role, path) AS (
    SELECT r.id, r.id, r.id FROM {src("roles")} r WHERE r.tenant_id = {tenant}
    UNION ALL
    SELECT c.top, i.inherits_id, c.path || '>' || i.inherits_id
    FROM chain c JOIN {src("role_inherits")} i ON i.tenant_id = {tenant} AND i.role_id = c.role
), grants AS (
    SELECT c.top, c.path, p.permission, p.condition
    FROM chain c JOIN {src("role_permissions")} p ON p.tenant_id = {tenant} AND p.role_id = c.role
), held AS (
    SELECT a.user_id, a.role_id, NULL::text AS via_group, a.scope, a.expires_at
    FROM {src("user_roles")} a WHERE a.tenant_id = {tenant}
    UNION ALL
    SELECT m.user_id, a.role_id, a.group_id, a.scope, a.expires_at
    FROM {src("group_roles")} a
    JOIN {src("groups")} g ON g.tenant_id = {tenant} AND g.id = a.group_id
    JOIN {src("group_members")} m ON m.tenant_id = {tenant} AND m.group_id = a.group_id
    WHERE a.tenant_id = {tenant}
)
SELECT h.user_id, g.permission, h.role_id AS role, g.path, h.via_group, h.scope,
       h.expires_at, g.condition
FROM held h
JOIN {src("users")} u ON u.tenant_id = {tenant} AND u.id = h.user_id AND u.status = 'active'
JOIN grants g ON g.top = h.role_id
WHERE h.expires_at IS NULL OR h.expires_at > {at}"""


_ORDER = " ORDER BY user_id, permission, path, via_group NULLS FIRST, scope"


def _key_json(alias: str, table: str) -> str:
    pk = schema.primary_key(schema.metadata.tables[f"{schema.SCHEMA}.{table}"])
    return "jsonb_build_object(" + ", ".join(f"'{c}', {alias}.{c}" for c in pk) + ")"


async def oldest_kept(conn: asyncpg.Connection) -> datetime | None:
    """The oldest moment history still covers (None: no history at all)."""
    value: datetime | None = await conn.fetchval(
        "SELECT least((SELECT min(changed_at) FROM pdp.change_log),"
        " (SELECT min(changed_at) FROM pdp.audit_archive))"
    )
    return value


async def check_reconstructible(conn: asyncpg.Connection, tenant: str, at: datetime) -> None:
    """RequestError unless the kept history covers every change of `tenant` after `at`."""
    oldest = await oldest_kept(conn)
    if oldest is None or at < oldest:
        since = "nothing" if oldest is None else oldest.isoformat()
        raise RequestError(
            f"cannot reconstruct {at.isoformat()}: the audit history kept starts at {since}"
            " (PDP_AUDIT_RETENTION)",
            "at",
        )
    gap = await conn.fetchval(
        f"SELECT max(changed_at) FROM {audit.UNION} a WHERE changed_at > $2"
        " AND ((op = 'bulk_load' AND tenant_id = $1 AND actor IS DISTINCT FROM $3)"
        " OR op = 'truncate')",
        tenant, at, erasure.ACTOR,
    )  # fmt: skip
    if gap is not None:
        raise RequestError(
            f"cannot reconstruct {at.isoformat()}: the tenant was bulk-loaded or truncated"
            f" at {gap.isoformat()}, which the change log does not record row by row",
            "at",
        )


async def reconstruct(conn: asyncpg.Connection, tenant: str, at: datetime, name: str) -> Source:
    """Temporary tables `<name>_<table>` holding the tenant's state as of `at`.

    Call inside a transaction (they are dropped at its end), after check_reconstructible.
    """
    for table in TABLES:
        past = f"pg_temp.{name}_{table}"
        await conn.execute(
            f"CREATE TEMPORARY TABLE {name}_{table} ON COMMIT DROP AS"
            f" SELECT * FROM pdp.{table} WITH NO DATA"
        )
        await conn.execute(
            f"""
INSERT INTO {past}
WITH later AS (
    SELECT DISTINCT ON (key) key, old FROM {audit.UNION} a
    WHERE tenant_id = $1 AND entity = '{table}' AND changed_at > $2 AND key IS NOT NULL
    ORDER BY key, id
)
SELECT t.* FROM pdp.{table} t
WHERE t.tenant_id = $1 AND NOT EXISTS (SELECT FROM later l WHERE l.key = {_key_json("t", table)})
UNION ALL
SELECT (jsonb_populate_record(NULL::pdp.{table}, l.old)).* FROM later l WHERE l.old IS NOT NULL""",
            tenant, at,
        )  # fmt: skip
        await conn.execute(f"ANALYZE {past}")
    return lambda table: f"pg_temp.{name}_{table}"


@dataclass(frozen=True, slots=True)
class Query:
    """The review's SQL (unordered), its arguments and its columns, ready to run."""

    sql: str
    args: tuple[object, ...]
    columns: tuple[str, ...]

    def ordered(self, select: str = "r.*") -> str:
        extra = ", change" if "change" in self.columns else ""
        return f"SELECT {select} FROM ({self.sql}) r{_ORDER}{extra}"


async def prepare(
    conn: asyncpg.Connection, tenant: str, at: datetime, *, past: bool,
    since: datetime | None = None,
) -> Query:  # fmt: skip
    """Check history and rebuild what `at`/`since` need; call inside a transaction.

    `past`: `at` is a moment to rebuild (else the current state, judged as of `at`).
    Raises RequestError (before any row is produced) when history cannot cover them.
    """
    # The query reads whole tenants: hash joins are right, and a nested loop over
    # misestimated rows (tables not analyzed since a bulk load) is quadratic.
    # Times render in UTC whatever the session's zone (the JSON and CSV forms).
    await conn.execute(
        "SELECT set_config('enable_nestloop', 'off', true), set_config('TimeZone', 'UTC', true)"
    )
    src: Source = current
    if past:
        await check_reconstructible(conn, tenant, at)
        src = await reconstruct(conn, tenant, at, "review_at")
    if since is None:
        return Query(review_sql(src), (tenant, at), COLUMNS)
    if since >= at:
        raise RequestError("since must be before at (or now)", "since")
    await check_reconstructible(conn, tenant, since)
    before = await reconstruct(conn, tenant, since, "review_since")
    now_rows, then_rows = review_sql(src), review_sql(before, at="$3")
    sql = (
        f"SELECT 'gained' AS change, * FROM (({now_rows}) EXCEPT ({then_rows})) gained"
        f" UNION ALL SELECT 'lost', * FROM (({then_rows}) EXCEPT ({now_rows})) lost"
    )
    return Query(sql, (tenant, at, since), DIFF_COLUMNS)


async def rows(
    conn: asyncpg.Connection, tenant: str, at: datetime, *, past: bool,
    since: datetime | None = None, batch: int = 5000,
) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
    """Every row (or, with `since`, every change) in order, as Python values."""
    query = await prepare(conn, tenant, at, past=past, since=since)
    async for row in conn.cursor(query.ordered(), *query.args, prefetch=batch):
        yield dict(row)


Write = Callable[[bytes], Awaitable[Any]]


async def export(
    conn: asyncpg.Connection, query: Query, form: str, write: Write, batch: int = 5000
) -> None:
    """The rows to `write` as csv (with a header), json (one array) or jsonl.

    PostgreSQL renders them (COPY for CSV; JSON text through a server-side cursor,
    written in chunks of about 64 kB): constant memory here, nothing parsed twice.
    """
    # A timestamptz in JSON is ISO 8601, in both forms.
    shown = ", ".join(
        "to_json(r.expires_at) #>> '{}' AS expires_at" if c == "expires_at" else f"r.{c}"
        for c in query.columns
    )
    if form == "csv":
        await conn.copy_from_query(
            query.ordered(shown), *query.args, output=write, format="csv", header=True
        )
        return
    sql = query.ordered("row_to_json(r)::text")  # compact, the columns in order
    between, lead = ("\n", "") if form == "jsonl" else (",\n", "[\n")
    chunk: list[str] = []
    size, count = 0, 0
    async for row in conn.cursor(sql, *query.args, prefetch=batch):
        chunk.append(row[0])
        size, count = size + len(row[0]), count + 1
        if size >= 65536:
            await write((lead + between.join(chunk)).encode())
            lead, chunk, size = between, [], 0
    if chunk:
        await write((lead + between.join(chunk)).encode())
    if form == "json":
        await write(b"[]\n" if count == 0 else b"\n]\n")
    elif count:
        await write(b"\n")


def json_value(row: dict[str, Any]) -> dict[str, Any]:
    expires = row["expires_at"]
    return {**row, "expires_at": None if expires is None else expires.isoformat()}
