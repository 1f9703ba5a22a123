"""On-demand mode (`PDP_CACHE_MODE=on_demand`): one user's rows loaded on first use.

Roles, inheritance, grants, groups and group grants stay whole in the engine; a user's
`users` row, memberships and direct assignments are read in ONE statement (one
snapshot, one round trip) on a small pool when a request first names the user, and
kept in a bounded LRU with a TTL. Concurrent misses for the same user share one query.

Consistency with the change stream (`pdp.replica.Replica.apply` drops changes of users
not cached): the cache insert and the engine update happen in one synchronous step, so
a batch applied before it is covered by the read (its snapshot must cover the
replica's revision, else it is read again) and a batch applied after it updates both.
An evicted or expired user's rows are dropped from the engine; a later load starts
fresh, so nothing a batch dropped is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from cachetools import TTLCache

from pdp.engine import RowChange, Snapshot
from pdp.errors import DependencyError
from pdp.replica import USER_ENTITIES, Replica
from sync import pg_queries as q
from sync.metrics import CacheMetrics

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
    f"{q.EXPIRES})) "
    "FROM pdp.user_roles t WHERE t.tenant_id = $1 AND t.user_id = $2)::text"
)
UserKey = tuple[str, str]  # (tenant, user)
LOAD_TIMEOUT = 5.0
# A catch-up that lands while a load's query runs moves the replica past the rows'
# snapshot: the load reads again. Under steady writes that is about 1 load in 10
# (tests/test_on_demand_zipf.py); 3 reads then failed about 1 load in 1,000 with
# `user_unavailable`, 10 make it negligible.
LOAD_ATTEMPTS = 10
_DRIVER_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


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
    """A TTLCache that reports every entry it drops by size or age."""

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
    """`pdp.replica.UserLoads` over PostgreSQL: loads users on first use into `replica`."""

    def __init__(
        self,
        url: str,
        replica: Replica,
        metrics: CacheMetrics,
        *,
        size: int,
        ttl: float,
        pool_size: int = 4,
        timeout: float = LOAD_TIMEOUT,
        attempts: int = LOAD_ATTEMPTS,
    ) -> None:
        self._url = url
        self._replica = replica
        self._metrics = metrics
        self._cache = _Evicting(size, ttl, self._forget)
        self._pending: dict[UserKey, asyncio.Future[None]] = {}
        self._pool_size = pool_size
        self._timeout = timeout
        self._attempts = attempts
        self._pool: asyncpg.Pool | None = None
        self.queries = 0  # statements run (tests and benchmarks read it)
        self.loads = 0  # loads started: one per user however many requests wait on it

    # --- UserLoads -----------------------------------------------------------------

    def cached(self, tenant: str, user: str) -> bool:
        return (tenant, user) in self._cache

    def clear(self) -> None:
        self._cache.clear()

    def evict_tenant(self, tenant: str) -> None:
        for key in [k for k in self._cache if k[0] == tenant]:
            self._cache.pop(key, None)
            self._forget(key)

    async def ensure(self, tenant: str, user: str) -> None:
        key = (tenant, user)
        try:
            self._cache[key]  # a lookup, not `in`: it makes the user the most recent
        except KeyError:
            pass
        else:
            self._metrics.cache_hit()
            return
        self._metrics.cache_miss()
        pending = self._pending.get(key)
        if pending is None:
            self.loads += 1
            pending = asyncio.ensure_future(self._load(key))
            self._pending[key] = pending
            pending.add_done_callback(lambda _f: self._pending.pop(key, None))
        await asyncio.shield(pending)

    # --- internals -----------------------------------------------------------------

    def _forget(self, key: UserKey) -> None:
        engine = self._replica.engine
        if engine is not None:
            engine.forget_user(*key)

    async def _load(self, key: UserKey) -> None:
        pool = self._pool
        if pool is None:
            raise DependencyError("the on-demand user loader is not started")
        for _ in range(self._attempts):
            self.queries += 1
            try:
                async with asyncio.timeout(self._timeout):
                    rows = await read_user(pool, *key)
            except _DRIVER_ERRORS as exc:
                raise DependencyError(f"loading user rows failed: {exc!r}") from exc
            engine, revision = self._replica.engine, self._replica.revision
            if engine is None or revision is None:
                raise DependencyError("no replica loaded")
            # Rows older than the replica would undo a batch already applied: re-read.
            if covers(rows.snapshot, revision):
                self._cache[key] = rows
                engine.forget_user(*key)  # an expired entry's rows may linger
                engine.apply(rows.changes, revision)
                return
        raise DependencyError(
            f"user rows did not reach the replica's revision in {self._attempts} reads"
        )

    async def start(self) -> None:
        self._pool = await asyncpg.create_pool(
            self._url,
            min_size=0,
            max_size=self._pool_size,
            timeout=self._timeout,
            server_settings={"application_name": "pdp-user-cache"},
        )

    async def stop(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Any]:
        """The pool open for the duration of the block."""
        await self.start()
        try:
            yield self
        finally:
            await self.stop()
