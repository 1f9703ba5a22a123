"""PROTOTYPE (not wired, not for merge): on-demand loading of one user's rows.

Issue 14 item 5. A user's `users` row, memberships and direct assignments are read in
ONE statement (one snapshot, one round trip) on a pool, kept in a bounded LRU+TTL, and
concurrent misses for the same user share one query. The caller (web layer) would
apply the returned rows to the engine before the pure, synchronous check, and remove
them when `on_evict` fires. Nothing here touches the engine.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
from cachetools import TTLCache

from pdp.engine import RowChange, Snapshot

# One statement: its snapshot (pg_current_snapshot is the statement's snapshot under
# READ COMMITTED, as FAST_CATCHUP relies on) and the user's rows in the engine's
# column order ($1 tenant, $2 user).
USER_ROWS = (
    "SELECT pg_current_snapshot()::text, "
    "(SELECT json_agg(json_build_array(t.tenant_id, t.id, t.status, t.attributes::text)) "
    "FROM pdp.users t WHERE t.tenant_id = $1 AND t.id = $2)::text, "
    "(SELECT json_agg(json_build_array(t.tenant_id, t.group_id, t.user_id)) "
    "FROM pdp.group_members t WHERE t.tenant_id = $1 AND t.user_id = $2)::text, "
    "(SELECT json_agg(json_build_array(t.tenant_id, t.user_id, t.role_id, t.scope, "
    "extract(epoch FROM t.expires_at)::float8)) "
    "FROM pdp.user_roles t WHERE t.tenant_id = $1 AND t.user_id = $2)::text"
)
USER_ENTITIES = ("users", "group_members", "user_roles")
UserKey = tuple[str, str]  # (tenant, user)


@dataclass(frozen=True, slots=True)
class UserRows:
    """One user's rows as upserts, and the snapshot they were read at."""

    snapshot: Snapshot
    changes: tuple[RowChange, ...]


def covers(newer: Snapshot, older: Snapshot) -> bool:
    """Whether every transaction visible in `older` is visible in `newer` (sufficient test)."""
    return older.xmax <= newer.xmax and all(x in older.xip for x in newer.xip if x < older.xmax)


async def read_user(conn: asyncpg.Connection | asyncpg.Pool, tenant: str, user: str) -> UserRows:
    row = await conn.fetchrow(USER_ROWS, tenant, user)
    assert row is not None
    changes: list[RowChange] = []
    for entity, text in zip(USER_ENTITIES, (row[1], row[2], row[3]), strict=True):
        rows_json = json.loads(text) if text else ()
        changes.extend(RowChange.upsert(entity, tuple(fields)) for fields in rows_json)
    return UserRows(Snapshot.parse(row[0]), tuple(changes))


class _Evicting(TTLCache[UserKey, UserRows]):
    """A TTLCache that reports every entry it drops (size eviction or expiry)."""

    def __init__(self, size: int, ttl: float, on_evict: Callable[[UserKey], None]) -> None:
        super().__init__(size, ttl)
        self._on_evict = on_evict

    def popitem(self) -> tuple[UserKey, UserRows]:
        key, value = super().popitem()
        self._on_evict(key)
        return key, value

    def expire(self, time: float | None = None) -> list[tuple[UserKey, UserRows]]:
        expired = list(super().expire(time))
        for key, _ in expired:
            self._on_evict(key)
        return expired


class UserLoader:
    """Loads users on first use; one query per user however many requests wait."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        size: int,
        ttl: float,
        on_evict: Callable[[UserKey], None],
        on_load: Callable[[UserKey, UserRows], None] = lambda _k, _r: None,
        revision: Callable[[], Snapshot | None],
        attempts: int = 3,
    ) -> None:
        self._pool = pool
        self._cache = _Evicting(size, ttl, on_evict)
        self._pending: dict[UserKey, asyncio.Future[UserRows]] = {}
        self._on_load = on_load
        self._revision = revision
        self._attempts = attempts
        self.hits = 0
        self.misses = 0
        self.queries = 0

    def cached(self, key: UserKey) -> bool:
        return key in self._cache

    def evict(self, key: UserKey) -> None:
        """Forget a user (e.g. a catch-up batch changed its rows and the caller drops them)."""
        self._cache.pop(key, None)

    async def ensure(self, tenant: str, user: str) -> UserRows:
        """The user's rows, read at a snapshot covering the replica's revision when loaded.

        `on_load` runs once per load, in the same step as the cache insert.

        Raises whatever the database raises (the caller fails closed).
        """
        key = (tenant, user)
        found = self._cache.get(key)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._load(key))
            self._pending[key] = pending
            pending.add_done_callback(lambda _f: self._pending.pop(key, None))
        return await asyncio.shield(pending)

    async def _load(self, key: UserKey) -> UserRows:
        for _ in range(self._attempts):
            self.queries += 1
            rows = await read_user(self._pool, *key)
            revision = self._revision()
            # Rows older than the replica would undo a batch already applied: re-read.
            if revision is None or covers(rows.snapshot, revision):
                # Cache and engine change in one synchronous step: a catch-up batch
                # applied later updates both; one applied earlier is covered.
                self._cache[key] = rows
                self._on_load(key, rows)
                return rows
        raise RuntimeError(
            f"user rows did not reach the replica's revision in {self._attempts} reads"
        )
