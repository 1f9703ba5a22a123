"""GDPR erasure: delete a user and pseudonymise every record of them, in one transaction.

`erase(conn, tenant, user, key)`:

1. deletes the user; the foreign keys cascade to its group memberships and direct
   role assignments, and change capture records all of it as usual (actor
   `pdp erase-subject`);
2. rewrites every change-log and audit-archive row of the tenant that names the
   user: the user id in `key`, `old` and `new` (users' `id`, memberships' and
   assignments' `user_id`) and `actor` where it is the user become the pseudonym
   `anon-<HMAC-SHA256(key, tenant NUL user), 32 hex>`, and the user rows' `attributes`
   (names, e-mail addresses...) become `{}`. Same key, same user, same pseudonym:
   records stay linkable for the audit retention without naming the person;
3. rewrites the decision log's rows of the user in the tenant (`subject_id`, whatever
   the subject type: a user id is what names the person) to the same pseudonym;
4. marks the tenant bulk-loaded (`pdp.mark_bulk_load`): the rows of step 1 now carry
   the pseudonym, so a sidecar could not find the user by them; the marker makes
   every sidecar reload the tenant at a snapshot where the user is gone instead.

Nothing is committed unless every step is. Runs as the database owner (the admin
role may not rewrite history). The key never leaves this process.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from pdp.errors import ConfigError

ACTOR = "pdp erase-subject"
MIN_KEY_BYTES = 16
# entity -> the key column naming a user
USER_COLUMN = {"users": "id", "group_members": "user_id", "user_roles": "user_id"}
HISTORY = ("change_log", "audit_archive")
DECISION_LOG = (
    "UPDATE pdp.decision_log SET subject_id = $3 WHERE tenant_id = $1 AND subject_id = $2"
)


def read_key(path: Path | None) -> bytes:
    """The pseudonym key from PDP_PSEUDONYM_KEY_FILE (ConfigError: missing or too short)."""
    if path is None:
        raise ConfigError(
            "pdp erase-subject needs PDP_PSEUDONYM_KEY_FILE (a file of at least"
            f" {MIN_KEY_BYTES} secret bytes, e.g. `head -c 32 /dev/urandom > key`)"
        )
    key = path.read_bytes().strip()
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"PDP_PSEUDONYM_KEY_FILE: the key must be at least {MIN_KEY_BYTES} bytes")
    return key


def pseudonym(key: bytes, tenant: str, user: str) -> str:
    digest = hmac.new(key, f"{tenant}\x00{user}".encode(), hashlib.sha256).hexdigest()
    return f"anon-{digest[:32]}"


@dataclass(frozen=True, slots=True)
class Erased:
    pseudonym: str
    user_deleted: bool
    memberships: int
    assignments: int
    rewritten: dict[str, int]  # history table -> rows rewritten
    revision: str

    def lines(self) -> list[str]:
        return [
            f"user: {'deleted' if self.user_deleted else 'not present (history only)'}",
            f"group memberships deleted: {self.memberships}",
            f"role assignments deleted: {self.assignments}",
            *(f"{table} rows pseudonymised: {n}" for table, n in self.rewritten.items()),
            f"pseudonym: {self.pseudonym}",
            f"revision: {self.revision}",
        ]


def _named(field: str) -> str:
    """A jsonb column's user field, replaced by the pseudonym where it names the user."""
    column = "CASE entity WHEN 'users' THEN 'id' ELSE 'user_id' END"
    replaced = f"jsonb_set({field}, ARRAY[{column}], to_jsonb($3::text))"
    if field != "key":  # a user row's attributes are personal data too
        replaced = (
            f"CASE WHEN entity = 'users' THEN {replaced} || '{{\"attributes\": {{}}}}'::jsonb"
            f" ELSE {replaced} END"
        )
    return f"CASE WHEN {field} ->> {column} = $2 THEN {replaced} ELSE {field} END"


def _rewrite(table: str) -> str:
    column = "CASE entity WHEN 'users' THEN 'id' ELSE 'user_id' END"
    entities = ", ".join(f"'{e}'" for e in USER_COLUMN)
    names = f"(key ->> {column} = $2 OR old ->> {column} = $2 OR new ->> {column} = $2)"
    return f"""
UPDATE pdp.{table} SET
    key = {_named("key")},
    old = {_named("old")},
    new = {_named("new")},
    actor = CASE WHEN actor = $2 THEN $3 ELSE actor END
WHERE tenant_id = $1 AND ((entity IN ({entities}) AND {names}) OR actor = $2)"""


async def erase(conn: asyncpg.Connection, tenant: str, user: str, key: bytes) -> Erased:
    """Do it all in one transaction on `conn` (an owner connection); see the module doc."""
    alias = pseudonym(key, tenant, user)
    async with conn.transaction():
        await conn.execute("SELECT set_config('pdp.actor', $1, true)", ACTOR)
        memberships = await conn.fetchval(
            "SELECT count(*) FROM pdp.group_members WHERE tenant_id = $1 AND user_id = $2",
            tenant, user,
        )  # fmt: skip
        assignments = await conn.fetchval(
            "SELECT count(*) FROM pdp.user_roles WHERE tenant_id = $1 AND user_id = $2",
            tenant, user,
        )  # fmt: skip
        deleted = await conn.fetchval(
            "DELETE FROM pdp.users WHERE tenant_id = $1 AND id = $2 RETURNING id", tenant, user
        )
        rewritten = {}
        for table in HISTORY:
            status = await conn.execute(_rewrite(table), tenant, user, alias)
            rewritten[table] = int(status.split()[-1])
        status = await conn.execute(DECISION_LOG, tenant, user, alias)
        rewritten["decision_log"] = int(status.split()[-1])
        if deleted is not None or rewritten["change_log"]:  # what a sidecar may still read
            await conn.execute("SELECT pdp.mark_bulk_load($1)", tenant)
        revision = str(await conn.fetchval("SELECT pg_current_xact_id()::text"))
    return Erased(
        alias, deleted is not None, int(memberships), int(assignments), rewritten, revision
    )
