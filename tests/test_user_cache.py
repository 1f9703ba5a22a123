"""PROTOTYPE tests for sync.user_cache (issue 14 item 5, not wired into the sidecar).

An engine holding no user rows, fed each user's rows by the loader on first use, must
decide like the engine holding everything and like `pdp.check`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from pdp.engine import Engine, Snapshot
from sync import pg_queries as q
from sync.user_cache import USER_ENTITIES, UserKey, UserLoader, UserRows, covers
from tests.test_check_sql import CASES, DATA, FUTURE, PAST, T0


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[asyncpg.Pool]:
    script = DATA
    for n, moment in ((1, PAST), (2, FUTURE), (3, T0)):
        script = script.replace(f"${n}", f"'{moment.isoformat()}'::timestamptz")
    async with asyncpg.create_pool(db_url, min_size=1, max_size=4) as p:
        await p.execute(script)
        yield p


async def _engines(pool: asyncpg.Pool) -> tuple[Engine, Engine, Snapshot]:
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        snap = Snapshot.parse(await conn.fetchval("SELECT pg_current_snapshot()::text"))
        tables = {e: list(await conn.fetch(sql)) for e, sql in q.ALL_ROWS.items()}
    partial = {e: rows for e, rows in tables.items() if e not in USER_ENTITIES}
    return Engine.build(tables, snap), Engine.build(partial, snap), snap


async def test_loaded_users_decide_like_full_engine_and_sql(pool: asyncpg.Pool) -> None:
    full, lazy, snap = await _engines(pool)
    evicted: list[UserKey] = []
    loads: list[UserKey] = []

    def load(key: UserKey, rows: UserRows) -> None:
        loads.append(key)
        lazy.apply(rows.changes, lazy.revision)

    loader = UserLoader(
        pool, size=100, ttl=60, on_evict=evicted.append, on_load=load, revision=lambda: snap
    )
    now = T0.timestamp()
    for tenant, user, rtype, rid, action, expected, why in CASES:
        await loader.ensure(tenant, user)
        sql = await pool.fetchval(
            "SELECT pdp.check($1, $2, $3, $4, $5, $6)", tenant, user, rtype, rid, action, T0
        )
        want = full.check(tenant, user, rtype, rid, action, now)
        got = lazy.check(tenant, user, rtype, rid, action, now)
        assert got == want, why
        assert got.allowed is sql is expected, why
    assert evicted == []
    assert len(loads) == len(set(loads)) == loader.queries


async def test_concurrent_misses_share_one_query(pool: asyncpg.Pool) -> None:
    loader = UserLoader(pool, size=10, ttl=60, on_evict=lambda _k: None, revision=lambda: None)
    results = await asyncio.gather(*(loader.ensure("acme", "greta") for _ in range(50)))
    assert loader.queries == 1
    assert loader.misses == 50
    assert all(r is results[0] for r in results)
    assert {c.entity for c in results[0].changes} == {"users", "group_members"}
    await loader.ensure("acme", "greta")
    assert (loader.hits, loader.queries) == (1, 1)


async def test_unknown_user_is_cached_empty(pool: asyncpg.Pool) -> None:
    loader = UserLoader(pool, size=10, ttl=60, on_evict=lambda _k: None, revision=lambda: None)
    assert (await loader.ensure("acme", "nobody")).changes == ()
    await loader.ensure("acme", "nobody")
    assert (loader.hits, loader.queries) == (1, 1)


async def test_size_eviction_reports_the_user(pool: asyncpg.Pool) -> None:
    evicted: list[UserKey] = []
    loader = UserLoader(pool, size=2, ttl=60, on_evict=evicted.append, revision=lambda: None)
    for user in ("alice", "bob", "carol"):
        await loader.ensure("acme", user)
    assert evicted == [("acme", "alice")]
    loader.evict(("acme", "bob"))
    assert not loader.cached(("acme", "bob"))
    assert loader.cached(("acme", "carol"))


async def test_rows_older_than_the_replica_are_re_read_then_refused(pool: asyncpg.Pool) -> None:
    ahead = Snapshot(2**40, 2**40)
    loader = UserLoader(pool, size=10, ttl=60, on_evict=lambda _k: None, revision=lambda: ahead)
    with pytest.raises(RuntimeError, match="revision"):
        await loader.ensure("acme", "alice")
    assert loader.queries == 3
    assert not loader.cached(("acme", "alice"))


def test_covers() -> None:
    older = Snapshot(10, 15, frozenset({11, 13}))
    assert covers(Snapshot(10, 15, frozenset({11, 13})), older)
    assert covers(Snapshot(14, 20, frozenset({16})), older)
    assert covers(Snapshot(12, 16, frozenset({13})), older)
    assert not covers(Snapshot(10, 14, frozenset()), older)  # xmax behind
    assert not covers(Snapshot(10, 15, frozenset({12})), older)  # 12 visible in older only
