"""The audit trail: change-log rows (and their archive) as who, what, when, which transaction.

One query serves the admin API's pages and `pdp audit`'s export: the union of
`pdp.change_log` (the recent window sync reads) and `pdp.audit_archive` (what
`pdp prune` moved out of it), filtered, in `id` order. Pages are keyset pages on `id`
(`after`), so a page costs the same wherever it starts; the export streams (CSV by
COPY, JSON lines rendered by PostgreSQL through a server-side cursor) in constant
memory whatever the row count. Under the
admin role Row-Level Security bounds both tables to the request's tenant as well.

Every record carries the change log's columns by their names: `id, txid, tenant_id,
entity, op, key, old, new, actor, changed_at` (`txid` as text, like a revision).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from pdp.errors import RequestError

COLUMNS = ("id", "txid", "tenant_id", "entity", "op", "key", "old", "new", "actor", "changed_at")
ENTITIES = (
    "tenants", "users", "groups", "group_members", "roles", "role_inherits",
    "role_permissions", "user_roles", "group_roles",
)  # fmt: skip
_SOURCE = ", ".join(COLUMNS)
# Both tables, one relation: PostgreSQL pushes the filters into each side and merges
# the two primary-key orders (Merge Append), so `ORDER BY id LIMIT n` stays a short scan.
UNION = f"(SELECT {_SOURCE} FROM pdp.change_log UNION ALL SELECT {_SOURCE} FROM pdp.audit_archive)"
_KEY_FIELD = re.compile(r"^[a-z_]{1,64}$")
MAX_VALUE = 256


def parse_time(name: str, text: str) -> datetime:
    """An ISO 8601 moment (`2026-12-01`, `2026-12-01T10:00:00Z`); without a zone, UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise RequestError(
            f"{name} must be an ISO 8601 time such as 2026-12-01T10:00:00Z, got {text[:64]!r}",
            name,
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _value(name: str, text: str) -> str:
    if not text or len(text) > MAX_VALUE or "\x00" in text:
        raise RequestError(
            f"{name} must be a non-empty string of at most {MAX_VALUE} characters", name
        )
    return text


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Which rows: every given field must match (None: any)."""

    tenant: str | None = None
    actor: str | None = None
    entity: str | None = None
    key: Mapping[str, str] = field(default_factory=dict)  # key fields, e.g. user_id=alice
    since: datetime | None = None  # changed_at >= since
    until: datetime | None = None  # changed_at < until
    txid: int | None = None
    after: int | None = None  # id > after (the keyset cursor)

    @classmethod
    def from_query(cls, query: Mapping[str, str], *, tenant: str | None) -> AuditFilter:
        """From an API query string (`key.user_id=alice`); an unknown name is a 400."""
        values: dict[str, Any] = {"tenant": tenant}
        keys: dict[str, str] = {}
        for name, text in query.items():
            if name.startswith("key."):
                column = name[4:]
                if not _KEY_FIELD.match(column):
                    raise RequestError(f"{name}: not a key column name", name)
                keys[column] = _value(name, text)
            elif name in ("actor", "entity"):
                values[name] = _value(name, text)
            elif name in ("since", "until"):
                values[name] = parse_time(name, text)
            elif name in ("txid", "after"):
                if not text.isdigit() or len(text) > 19:
                    raise RequestError(f"{name} must be a non-negative integer", name)
                values[name] = int(text)
            elif name not in ("tenant", "limit"):
                raise RequestError(
                    f"unknown parameter {name!r} (filters: tenant, actor, entity, key.<column>,"
                    " since, until, txid; paging: limit, after)",
                    name,
                )
        return cls(key=keys, **values).checked()

    def checked(self) -> AuditFilter:
        if self.entity is not None and self.entity not in ENTITIES:
            raise RequestError(f"entity must be one of {', '.join(ENTITIES)}", "entity")
        if self.txid is not None and self.txid < 0:
            raise RequestError("txid must be a non-negative integer", "txid")
        if self.since and self.until and self.since >= self.until:
            raise RequestError("since must be before until", "since")
        return self

    def where(self) -> tuple[str, list[object]]:
        """The SQL condition (on UNION's columns) and its arguments."""
        clauses: list[str] = []
        args: list[object] = []

        def arg(value: object) -> str:
            args.append(value)
            return f"${len(args)}"

        for column in ("tenant_id", "actor", "entity"):
            value = getattr(self, "tenant" if column == "tenant_id" else column)
            if value is not None:
                clauses.append(f"{column} = {arg(value)}")
        if self.key:
            # As text: whichever jsonb codec the connection has, the cast parses it.
            clauses.append(f"key @> {arg(json.dumps(dict(self.key)))}::text::jsonb")
        if self.since is not None:
            clauses.append(f"changed_at >= {arg(self.since)}")
        if self.until is not None:
            clauses.append(f"changed_at < {arg(self.until)}")
        if self.txid is not None:
            clauses.append(f"txid = {arg(str(self.txid))}::text::xid8")
        if self.after is not None:
            clauses.append(f"id > {arg(self.after)}")
        return " AND ".join(clauses) or "true", args


def select(audit: AuditFilter, limit: int | None = None) -> tuple[str, list[object]]:
    where, args = audit.where()
    # changed_at rendered by PostgreSQL (ISO 8601, in UTC: see page), as the export does.
    sql = (
        "SELECT id, txid::text AS txid, tenant_id, entity, op, key, old, new, actor,"
        f" to_json(changed_at) #>> '{{}}' AS changed_at FROM {UNION} a WHERE {where} ORDER BY id"
    )
    if limit is not None:
        args.append(limit)
        sql += f" LIMIT ${len(args)}"
    return sql, args


def record(row: asyncpg.Record) -> dict[str, Any]:
    """A row as JSON values: jsonb as objects."""
    out = dict(row)
    for column in ("key", "old", "new"):
        if isinstance(out[column], str):  # a connection without the admin side's jsonb codec
            out[column] = json.loads(out[column])
    return out


async def page(
    conn: asyncpg.Connection, audit: AuditFilter, limit: int
) -> tuple[list[dict[str, Any]], int | None]:
    """Up to `limit` records and the `after` of the next page (None: this was the last)."""
    await conn.execute("SELECT set_config('TimeZone', 'UTC', true)")
    sql, args = select(audit, limit + 1)
    rows = await conn.fetch(sql, *args)
    records = [record(r) for r in rows[:limit]]
    return records, (records[-1]["id"] if len(rows) > limit else None)


# The export's rows rendered by PostgreSQL: no jsonb is parsed and re-encoded here.
# row_to_json: compact, the columns in order; a timestamptz in JSON is ISO 8601.
_JSON_COLUMNS = ", ".join("txid::text AS txid" if c == "txid" else c for c in COLUMNS)
_CSV_COLUMNS = ", ".join(
    "txid::text AS txid" if c == "txid"
    else "to_json(changed_at) #>> '{}' AS changed_at" if c == "changed_at"
    else c
    for c in COLUMNS
)  # fmt: skip
Write = Callable[[bytes], Awaitable[Any]]


async def export(
    conn: asyncpg.Connection, audit: AuditFilter, form: str, write: Write, batch: int = 5000
) -> None:
    """Every matching record to `write` as JSON lines or CSV (with a header), in id order.

    Constant memory: CSV is PostgreSQL's COPY, streamed; JSON lines come through a
    server-side cursor (call in a transaction), written in chunks of about 64 kB.
    """
    await conn.execute("SELECT set_config('TimeZone', 'UTC', true)")  # times in UTC
    where, args = audit.where()
    source = f"FROM {UNION} a WHERE {where} ORDER BY id"
    if form == "csv":
        await conn.copy_from_query(
            f"SELECT {_CSV_COLUMNS} {source}", *args, output=write, format="csv", header=True
        )
        return
    chunk: list[str] = []
    size = 0
    lines = (
        f"SELECT row_to_json(x)::text FROM (SELECT {_JSON_COLUMNS} FROM {UNION} a"
        f" WHERE {where}) x ORDER BY x.id"
    )
    async for row in conn.cursor(lines, *args, prefetch=batch):
        chunk.append(row[0])
        size += len(row[0])
        if size >= 65536:
            await write(("\n".join(chunk) + "\n").encode())
            chunk, size = [], 0
    if chunk:
        await write(("\n".join(chunk) + "\n").encode())
