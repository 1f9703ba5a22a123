"""On-demand mode's loader (sync.user_cache) against a real PostgreSQL.

An engine holding no user rows, fed each user's rows by the loader on first use,
decides like the engine holding everything and like `pdp.check`; concurrent misses
share one query; evictions drop the rows; a database that fails fails closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from pdp.engine import Engine, Snapshot
from pdp.errors import DependencyError
from pdp.replica import USER_ENTITIES, Replica
from sync import pg_queries as q
from sync.metrics import NullMetrics
from sync.user_cache import UserLoader, covers
from tests.test_check_sql import CASES, DATA, FUTURE, PAST, T0


class Counts(NullMetrics):
    def __init__(self) -> None:
        self.hits = self.misses = 0

    def cache_hit(self) -> None:
        self.hits += 1

    def cache_miss(self) -> None:
        self.misses += 1


@pytest.fixture
async def seeded(db_url: str) -> str:
    script = DATA
    for n, moment in ((1, PAST), (2, FUTURE), (3, T0)):
        script = script.replace(f"${n}", f"'{moment.isoformat()}'::timestamptz")
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(script)
    finally:
        await conn.close()
    return db_url


async def _replicas(url: str) -> tuple[Engine, Replica]:
    """The full engine, and a replica holding everything but users' rows."""
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction(isolation="repeatable_read"):
            snap = Snapshot.parse(await conn.fetchval("SELECT pg_current_snapshot()::text"))
            tables = {e: list(await conn.fetch(sql)) for e, sql in q.ALL_ROWS.items()}
    finally:
        await conn.close()
    partial = {e: rows for e, rows in tables.items() if e not in USER_ENTITIES}
    replica = Replica()
    replica.install(Engine.build(partial, snap), "epoch", 0.0)
    return Engine.build(tables, snap), replica


@pytest.fixture
async def loaded(seeded: str) -> AsyncIterator[tuple[Engine, Replica, UserLoader, Counts]]:
    full, replica = await _replicas(seeded)
    counts = Counts()
    loader = UserLoader(seeded, replica, counts, size=3, ttl=60)
    replica.users = loader
    async with loader.running():
        yield full, replica, loader, counts


async def test_loaded_users_decide_like_full_engine_and_sql(
    loaded: tuple[Engine, Replica, UserLoader, Counts], seeded: str
) -> None:
    full, replica, loader, _ = loaded
    now = T0.timestamp()
    conn = await asyncpg.connect(seeded)
    try:
        for tenant, user, rtype, rid, action, expected, why in CASES:
            await loader.ensure(tenant, user)
            lazy = replica.engine
            assert lazy is not None
            sql = await conn.fetchval(
                "SELECT pdp.check($1, $2, $3, $4, $5, $6)", tenant, user, rtype, rid, action, T0
            )
            want = full.check(tenant, user, rtype, rid, action, now)
            assert lazy.check(tenant, user, rtype, rid, action, now) == want, why
            assert want.allowed is sql is expected, why
    finally:
        await conn.close()


async def test_concurrent_misses_share_one_query(
    loaded: tuple[Engine, Replica, UserLoader, Counts],
) -> None:
    _, replica, loader, counts = loaded
    await asyncio.gather(*(loader.ensure("acme", "greta") for _ in range(50)))
    assert (loader.queries, counts.misses, counts.hits) == (1, 50, 0)
    await loader.ensure("acme", "greta")
    assert (loader.queries, counts.hits) == (1, 1)
    assert replica.engine is not None
    assert replica.engine.check("acme", "greta", "document", "d3", "write", 0.0).allowed


async def test_unknown_user_is_cached_empty(
    loaded: tuple[Engine, Replica, UserLoader, Counts],
) -> None:
    _, _, loader, counts = loaded
    await loader.ensure("acme", "nobody")
    await loader.ensure("acme", "nobody")
    assert (loader.queries, counts.hits) == (1, 1)


async def test_eviction_drops_the_users_rows(
    loaded: tuple[Engine, Replica, UserLoader, Counts],
) -> None:
    _, replica, loader, _ = loaded
    engine = replica.engine
    assert engine is not None
    for user in ("alice", "bob", "carol", "greta"):  # size 3: alice is evicted
        await loader.ensure("acme", user)
    assert not loader.cached("acme", "alice")
    assert engine.check("acme", "alice", "document", "d9", "read", 0.0).reason == "unknown_user"
    assert engine.check("acme", "bob", "document", "d1", "write", 0.0).allowed
    loader.evict_tenant("acme")
    assert not loader.cached("acme", "bob")
    assert engine.counts()["user_roles"] == engine.counts()["group_members"] == 0


async def test_a_hit_makes_the_user_the_most_recent(
    loaded: tuple[Engine, Replica, UserLoader, Counts],
) -> None:
    """LRU, not FIFO: a hot user that keeps hitting is not the one evicted (it was, and a
    check of it could then find no user between its load and its answer)."""
    _, _, loader, counts = loaded
    for user in ("alice", "bob", "carol"):  # size 3: full
        await loader.ensure("acme", user)
    await loader.ensure("acme", "alice")  # a hit: alice is now the most recent
    assert counts.hits == 1
    await loader.ensure("acme", "greta")  # evicts the least recent: bob
    assert loader.cached("acme", "alice")
    assert not loader.cached("acme", "bob")


async def test_a_batch_reaches_cached_users_only(
    loaded: tuple[Engine, Replica, UserLoader, Counts],
) -> None:
    from pdp.engine import RowChange

    _, replica, loader, _ = loaded
    await loader.ensure("acme", "bob")
    revision = replica.revision
    assert revision is not None
    grant = ("acme", "-", "admin", "*", None)
    replica.apply(
        [RowChange.upsert("user_roles", (grant[0], u, *grant[2:])) for u in ("bob", "carol")],
        revision,
        0.0,
    )
    engine = replica.engine
    assert engine is not None
    assert engine.check("acme", "bob", "document", "x", "purge", 0.0).allowed
    assert engine.check("acme", "carol", "document", "x", "purge", 0.0).reason == "unknown_user"


async def test_rows_older_than_the_replica_are_re_read_then_refused(seeded: str) -> None:
    replica = Replica()
    replica.install(Engine.build({}, Snapshot(2**40, 2**40)), "epoch", 0.0)
    loader = UserLoader(seeded, replica, NullMetrics(), size=10, ttl=60, attempts=3)
    async with loader.running():
        with pytest.raises(DependencyError, match="revision"):
            await loader.ensure("acme", "alice")
    assert loader.queries == 3
    assert not loader.cached("acme", "alice")


async def test_a_database_down_fails_closed(seeded: str) -> None:
    _, replica = await _replicas(seeded)
    dead = "postgresql://postgres@127.0.0.1:1/postgres"
    loader = UserLoader(dead, replica, NullMetrics(), size=10, ttl=60, timeout=2.0)
    async with loader.running():
        with pytest.raises(DependencyError, match="loading user rows failed"):
            await loader.ensure("acme", "alice")
    assert not loader.cached("acme", "alice")


def test_covers() -> None:
    older = Snapshot(10, 15, frozenset({11, 13}))
    assert covers(Snapshot(10, 15, frozenset({11, 13})), older)
    assert covers(Snapshot(14, 20, frozenset({16})), older)
    assert covers(Snapshot(12, 16, frozenset({13})), older)
    assert not covers(Snapshot(10, 14, frozenset()), older)  # xmax behind
    assert not covers(Snapshot(10, 15, frozenset({12})), older)  # 12 visible in older only
