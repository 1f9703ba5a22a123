"""On-demand mode under a Zipf workload with concurrent writers: the whole sidecar app.

3,000 users, a cache of 300: checks draw users from a Zipf law (a few hot users, a
long tail), so hot users stay cached and hit while the tail misses and evicts.
Writers commit changes to users drawn from the same law (status, memberships,
assignments: only users' own rows, so the shared rows never move).

Every answer is compared with `pdp.check` at a revision it is known to be at. A
per-user gate lets checks of a user run together and a write to that user run alone:
a check takes the xid of the user's last committed write, asks at it (half with
`X-PDP-Min-Revision`, half after `Replica.wait_for_revision` with no header, and then
the answer's revision must show it), and asks `pdp.check` before the gate lets a
write in; the user's rows are the same in both answers.

Coalescing: a burst of concurrent checks for a few cold users, held behind a lock on
`pdp.users` until every request has missed, loads each user once (one load however
many requests waited). At the end every cached user's rows, and nothing else of the
users', are in the engine: its digest equals one built from the database's rows of
exactly the cached users.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from bisect import bisect
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from pdp.config import Settings
from pdp.engine import Engine, Snapshot
from pdp.pg.seed_data import ACTIONS, RESOURCE_TYPES, user_id
from pdp.protocol import MIN_REVISION
from pdp.replica import USER_ENTITIES, Replica
from pdp.sidecar import sidecar_app
from pdp.web.app import REGISTRY, REPLICA
from sync import pg_queries as q
from sync.user_cache import LOAD_ATTEMPTS, UserLoader
from tests.sync_harness import RETRYABLE, TENANT, current_xid, random_write, seed
from tests.waiting import until as _until

USERS = 3_000
CACHE = 300
ZIPF_S = 1.1
CHECKERS, CHECKS_EACH = 12, 150
WRITERS = 3
BURST_USERS, BURST_REQUESTS = 4, 25  # BURST_USERS <= the loader's pool (4): all in flight
CHECK = "SELECT pdp.check($1, $2, $3, $4, $5, now())"


class Gate:
    """One user's: checks share it, a write holds it alone (waiting writes go first)."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._checks = 0
        self._writing = False
        self._waiting = 0

    @contextlib.asynccontextmanager
    async def checking(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writing and not self._waiting)
            self._checks += 1
        try:
            yield
        finally:
            async with self._cond:
                self._checks -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        async with self._cond:
            self._waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._writing and not self._checks)
            finally:
                self._waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            async with self._cond:
                self._writing = False
                self._cond.notify_all()


@dataclass
class Workload:
    """Users ranked at random, drawn by Zipf rank; each user's gate and last write."""

    base: int  # an xid after the seed: every user's rows are at least this old
    users: list[str] = field(default_factory=list)
    cumulative: list[float] = field(default_factory=list)
    gates: dict[str, Gate] = field(default_factory=dict)
    written: dict[str, int] = field(default_factory=dict)
    reserved: set[str] = field(default_factory=set)  # the burst's users: never written
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("memory", "fallback", "header", "waited", "allowed", "denied", "commits", "cached"), 0
    ))  # fmt: skip

    def __post_init__(self) -> None:
        self.users = [user_id(i) for i in range(1, USERS + 1)]  # the seed's users
        random.Random(1).shuffle(self.users)
        self.cumulative = list(itertools.accumulate(1 / k**ZIPF_S for k in range(1, USERS + 1)))
        self.gates = {u: Gate() for u in self.users}

    def draw(self, rng: random.Random) -> str:
        rank = bisect(self.cumulative, rng.random() * self.cumulative[-1])
        return self.users[min(rank, USERS - 1)]

    def revision_of(self, user: str) -> int:
        return self.written.get(user, self.base)


async def _write(
    url: str, work: Workload, loader: UserLoader, seed_value: int, stop: asyncio.Event
) -> None:
    """Commit changes to Zipf-drawn users' rows until `stop`."""
    rng = random.Random(seed_value)
    conn = await asyncpg.connect(url)
    try:
        while not stop.is_set():
            user = work.draw(rng)
            if user in work.reserved:
                continue
            async with work.gates[user].writing():
                try:
                    async with conn.transaction():
                        for _ in range(rng.randint(1, 2)):
                            await random_write(conn, rng, user)
                        xid = await conn.fetchval("SELECT pg_current_xact_id()::text::bigint")
                except RETRYABLE:
                    continue
                work.written[user] = int(xid)
                work.counts["commits"] += 1
                # Written while cached: the change reaches it through the catch-up only.
                work.counts["cached"] += loader.cached(TENANT, user)
            await asyncio.sleep(rng.random() * 0.01)  # pacing, not waiting for anything
    finally:
        await conn.close()


def _body(user: str, rtype: str, rid: str, action: str) -> dict[str, Any]:
    return {
        "subject": {"type": "user", "id": user, "properties": {"tenant": TENANT}},
        "action": {"name": action},
        "resource": {"type": rtype, "id": rid},
    }


async def _check_one(
    client: TestClient[Any, Any], pool: asyncpg.Pool, replica: Replica, work: Workload,
    user: str, rng: random.Random,
) -> None:  # fmt: skip
    """One check of `user`, compared with `pdp.check` while no write to `user` can land."""
    request = (rng.choice(RESOURCE_TYPES), str(rng.randrange(20)), rng.choice(ACTIONS))
    async with work.gates[user].checking():
        xid = work.revision_of(user)
        headers = {}
        if rng.random() < 0.5:
            headers = {MIN_REVISION: str(xid)}
            work.counts["header"] += 1
        else:
            assert await replica.wait_for_revision(xid, 10), f"revision {xid} not reached"
            work.counts["waited"] += 1
        resp = await client.post(
            "/access/v1/evaluation", json=_body(user, *request), headers=headers
        )
        assert resp.status == 200
        answer = await resp.json()
        expected = await pool.fetchval(CHECK, TENANT, user, *request)
    context = answer["context"]
    assert answer["decision"] is expected, (user, request, xid, answer)
    assert context["reason"] != "user_unavailable", answer
    if context["reason"] == "consistent_fallback":
        work.counts["fallback"] += 1
    else:
        assert Snapshot.parse(context["revision"]).visible(xid), (xid, context)
        work.counts["memory"] += 1
    work.counts["allowed" if expected else "denied"] += 1


async def _checker(
    client: TestClient[Any, Any], pool: asyncpg.Pool, replica: Replica, work: Workload,
    seed_value: int,
) -> None:  # fmt: skip
    rng = random.Random(seed_value)
    for _ in range(CHECKS_EACH):
        user = work.draw(rng)
        while user in work.reserved:  # the burst's: drawn again, so every checker checks
            user = work.draw(rng)  # exactly CHECKS_EACH times
        await _check_one(client, pool, replica, work, user, rng)


@contextlib.asynccontextmanager
async def _writing(url: str, work: Workload, loader: UserLoader) -> AsyncIterator[None]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_write(url, work, loader, 100 + i, stop)) for i in range(WRITERS)]
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def test_zipf_checks_with_concurrent_writers_answer_as_the_database(
    db_url: str, pg: asyncpg.Connection, aiohttp_client: AiohttpClient
) -> None:
    await seed(db_url, users=USERS)
    work = Workload(base=await current_xid(pg))
    settings = Settings(
        cache_mode="on_demand", cache_users=CACHE, max_staleness_seconds=60,
        poll_interval_seconds=0.2, heartbeat_seconds=1.0, consistency_wait_ms=5000,
    )  # fmt: skip
    app = sidecar_app(settings, db_url)
    client = await aiohttp_client(app)
    replica, registry = app[REPLICA], app[REGISTRY]
    loader = replica.users
    assert isinstance(loader, UserLoader)

    def metric(name: str) -> float:
        return registry.get_sample_value(name) or 0.0

    await _until(lambda: replica.ready, 20, "the sidecar did not load")
    rng = random.Random(0)
    # The burst's users: cold ones (the law's tail), kept from the writers and checkers.
    work.reserved = set(rng.sample(work.users[USERS // 2 :], BURST_USERS))
    async with (
        asyncpg.create_pool(db_url, min_size=1, max_size=4) as pool,
        _writing(db_url, work, loader),
    ):
        await asyncio.gather(*(_checker(client, pool, replica, work, i) for i in range(CHECKERS)))
        hits, misses = metric("pdp_cache_hits_total"), metric("pdp_cache_misses_total")
        loads, queries = loader.loads, loader.queries
        await _burst(client, pg, work, metric)
        assert metric("pdp_cache_hits_total") == hits  # no request found a burst user cached
        assert metric("pdp_cache_misses_total") == misses + BURST_USERS * BURST_REQUESTS
        # Coalescing: one load per user however many requests waited on it (a load
        # reads again when the replica moved past its rows meanwhile, boundedly).
        assert loader.loads == loads + BURST_USERS
        assert BURST_USERS <= loader.queries - queries <= LOAD_ATTEMPTS * BURST_USERS
    checked = CHECKERS * CHECKS_EACH
    assert sum(work.counts[k] for k in ("memory", "fallback")) == checked
    assert work.counts["memory"] > checked // 2, work.counts  # memory answers, mostly
    kinds = ("header", "waited", "allowed", "denied", "commits", "cached")
    assert min(work.counts[k] for k in kinds) > 0, work.counts
    # The Zipf law at work: hot users hit, the tail misses, the cache evicted.
    assert hits > checked // 4, (hits, misses)
    assert misses > checked // 10, (hits, misses)
    assert loads > CACHE, loads  # more loads than the cache holds: evictions happened
    await _assert_cached_rows_equal_the_database(pg, replica, loader)


async def _burst(
    client: TestClient[Any, Any], pg: asyncpg.Connection, work: Workload, metric: Any
) -> None:
    """BURST_REQUESTS concurrent checks for each reserved user, all held behind a lock
    on `pdp.users` until every one has missed; then all answer as `pdp.check` does."""
    misses = metric("pdp_cache_misses_total")
    users = sorted(work.reserved)
    tx = pg.transaction()
    await tx.start()
    try:
        await pg.execute("LOCK TABLE pdp.users IN ACCESS EXCLUSIVE MODE")
        requests = [
            asyncio.create_task(
                client.post("/access/v1/evaluation", json=_body(u, "document", "1", "read"))
            )
            for u in users
            for _ in range(BURST_REQUESTS)
        ]
        wanted = misses + len(requests)
        await _until(lambda: metric("pdp_cache_misses_total") == wanted, 20, "not all missed")
    finally:
        await tx.rollback()
    answers = [await (await r).json() for r in requests]
    for user, answer in zip(
        [u for u in users for _ in range(BURST_REQUESTS)], answers, strict=True
    ):
        expected = await pg.fetchval(CHECK, TENANT, user, "document", "1", "read")
        assert answer["decision"] is expected, (user, answer)


async def _assert_cached_rows_equal_the_database(
    pg: asyncpg.Connection, replica: Replica, loader: UserLoader
) -> None:
    """At rest: the engine holds the database's rows of exactly the cached users."""
    xid = await current_xid(pg)
    assert await replica.wait_for_revision(xid, 10), f"revision {xid} not reached"
    engine = replica.engine
    assert engine is not None
    async with pg.transaction(isolation="repeatable_read"):
        snap = Snapshot.parse(await pg.fetchval("SELECT pg_current_snapshot()::text"))
        tables = {e: list(await pg.fetch(sql)) for e, sql in q.ALL_ROWS.items()}
    cached = {u for (u,) in await pg.fetch("SELECT id FROM pdp.users") if loader.cached(TENANT, u)}
    assert len(cached) == CACHE  # full
    user_column = {"users": 1, "group_members": 2, "user_roles": 1}
    for entity in USER_ENTITIES:
        tables[entity] = [r for r in tables[entity] if r[user_column[entity]] in cached]
    assert engine.digest(TENANT) == Engine.build(tables, snap).digest(TENANT)
    assert engine.counts()["users"] == CACHE
