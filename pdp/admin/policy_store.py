"""Reading a tenant's state for policy as code, and writing a plan in one transaction.

Connections need the jsonb codec of pdp.admin.store (`connect`): attributes travel as
Python objects both ways.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from pdp.admin import policy
from pdp.admin.policy import FIELDS, KEYS, ORDER, Change, Plan, PolicyError, State, timestamp
from pdp.admin.store import database_error
from pdp.errors import UserError


def _field(name: str, value: Any) -> Any:
    if name == "expires_at":
        return timestamp(value)
    if name == "attributes" and isinstance(value, str):
        return json.loads(value)
    return value


async def read_state(conn: asyncpg.Connection, tenant: str) -> State:
    state: State = {}
    for table in ORDER:
        key, fields = KEYS[table], FIELDS.get(table, ())
        rows = await conn.fetch(
            f"SELECT {', '.join((*key, *fields))} FROM pdp.{table} WHERE tenant_id = $1", tenant
        )
        state[table] = {
            tuple(r[c] for c in key): {f: _field(f, r[f]) for f in fields} for r in rows
        }
    return state


def _param(name: str, value: Any) -> Any:
    if name == "expires_at" and value is not None:
        return datetime.fromisoformat(value)
    return value


async def apply(conn: asyncpg.Connection, plan: Plan, source: str = "policy") -> str | None:
    """Write the plan's changes (inside the caller's transaction); the revision, or None.

    A change the database refuses (a member who is no user, a cycle) is a PolicyError
    naming it; the caller's transaction then writes nothing.
    """
    if not plan.changes:
        return None
    for change in plan.ordered():
        try:
            await _write(conn, plan.tenant, change)
        except asyncpg.PostgresError as exc:
            values = dict(zip(KEYS[change.table], change.key, strict=True))
            refused = database_error(exc, values)
            if refused is exc:
                raise
            raise PolicyError(f"{source}: cannot apply '{change.line()}': {refused}") from None
    return str(await conn.fetchval("SELECT pg_current_xact_id()::text"))


async def _write(conn: asyncpg.Connection, tenant: str, change: Change) -> None:
    key = dict(zip(KEYS[change.table], change.key, strict=True))
    where = " AND ".join(["tenant_id = $1", *(f"{c} = ${i}" for i, c in enumerate(key, start=2))])
    args: list[Any] = [tenant, *key.values()]
    if change.op == "delete":
        await conn.execute(f"DELETE FROM pdp.{change.table} WHERE {where}", *args)
        return
    values = {f: _param(f, v) for f, v in change.fields.items()}
    if change.op == "create":
        columns = ["tenant_id", *key, *values]
        marks = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
        await conn.execute(
            f"INSERT INTO pdp.{change.table} ({', '.join(columns)}) VALUES ({marks})",
            *args, *values.values(),
        )  # fmt: skip
    else:
        sets = ", ".join(f"{c} = ${len(args) + i}" for i, c in enumerate(values, start=1))
        if change.table == "users":
            sets += ", updated_at = now()"
        await conn.execute(
            f"UPDATE pdp.{change.table} SET {sets} WHERE {where}", *args, *values.values()
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    plan: Plan
    revision: str | None  # None: nothing written (a dry run, or nothing to change)

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant": self.plan.tenant,
            "changes": [c.line() for c in self.plan.changes],
            "effect": self.plan.effect(),
            "applied": self.revision is not None,
            "revision": self.revision,
        }


async def plan_or_apply(
    conn: asyncpg.Connection, text: str, source: str, *, tenant: str | None = None, write: bool
) -> Outcome:
    """Plan `text` against the database and, with `write`, apply it (in the caller's
    transaction, which holds the tenant row locked so two applies of one tenant queue)."""
    value, doc = policy.parse(text, source)
    named, wanted = policy.desired(value, doc, tenant)
    locked = await conn.fetchval("SELECT id FROM pdp.tenants WHERE id = $1 FOR UPDATE", named)
    if locked is None:
        raise UnknownTenant(named)
    the_plan = policy.plan(named, await read_state(conn, named), wanted)
    return Outcome(the_plan, await apply(conn, the_plan, source) if write else None)


class UnknownTenant(UserError):
    def __init__(self, tenant: str) -> None:
        super().__init__(f"unknown tenant {tenant!r}")
        self.tenant = tenant
