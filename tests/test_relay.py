"""The Redis Streams relay and sidecars in relay mode, against real PostgreSQL and Redis.

Each test starts its own redis-server (tests/redis_server.py, a Unix socket: no
port to collide on) so it can restart or trim it. After each scenario every
follower equals the database (tests/sync_harness.assert_equal: digests per tenant
and random checks against `pdp.check`).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from pdp.replica import Replica
from pdp.supervisor import Lifespan, Supervisor
from sync.options import RelayOptions, SyncOptions
from sync.redis_follower import RedisFollower
from sync.relay import Relay
from tests.redis_server import RedisServer
from tests.sync_harness import MAX_STALENESS, assert_equal, seed, writer

STREAM = "pdp:test"
OPTIONS = SyncOptions(poll_interval=0.2, heartbeat=1.0, backoff_initial=0.05, backoff_max=0.5)


def relay_options(**changes: float) -> RelayOptions:
    values: dict[str, float] = {
        "election_interval": 0.2, "lock_heartbeat": 0.5, "snapshot_interval": 60.0, **changes,
    }  # fmt: skip
    return RelayOptions(stream=STREAM, **values)  # type: ignore[arg-type]


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    # Not tmp_path: a Unix socket path must stay under ~100 bytes.
    directory = Path(tempfile.mkdtemp(prefix="pdp-redis-"))
    server = RedisServer(directory)
    await server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def seeded(db_url: str) -> str:
    await seed(db_url)
    return db_url


@contextlib.asynccontextmanager
async def supervised(name: str, lifespan: Lifespan) -> AsyncIterator[Supervisor]:
    supervisor = Supervisor(backoff_initial=0.05, backoff_max=0.5)
    supervisor.add(name, lifespan, critical=True)
    async with supervisor.running():
        yield supervisor


@contextlib.asynccontextmanager
async def relay(url: str, redis_url: str, **changes: float) -> AsyncIterator[Relay]:
    worker = Relay(url, redis_url, options=OPTIONS, relay_options=relay_options(**changes))
    async with supervised("relay", worker.lifespan):
        yield worker


def follower(url: str, redis_url: str) -> RedisFollower:
    return RedisFollower(redis_url, url, Replica(), options=OPTIONS, stream=STREAM)


async def until(condition: Callable[[], bool], within: float, what: str) -> None:
    """Wait for `condition` with a deadline (workers expose no event for these)."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    assert condition(), what


@contextlib.asynccontextmanager
async def writers(url: str, n: int = 4) -> AsyncIterator[list[asyncio.Task[int]]]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(writer(url, i, stop)) for i in range(n)]
    try:
        yield tasks
    finally:
        stop.set()
        commits = await asyncio.gather(*tasks)
    assert sum(commits) > 0


async def test_relay_publishes_and_a_follower_equals_the_database(
    seeded: str, pg: asyncpg.Connection, redis_server: RedisServer
) -> None:
    async with relay(seeded, redis_server.url) as worker:
        await until(lambda: worker.published > 0, 10, "the relay published nothing")
        side = follower(seeded, redis_server.url)
        async with supervised("sync", side.lifespan):
            await until(lambda: side.replica.ready, 10, "the follower did not load")
            assert side.reloads == ["bootstrap"]
            async with writers(seeded):
                await asyncio.sleep(2)  # let them write for a while
            await assert_equal(pg, side.replica)
            # Nothing changes now: the relay's heartbeat keeps the follower fresh.
            applied = side.entries
            await until(lambda: side.entries >= applied + 5, 10, "no heartbeat arrived")
            assert side.replica.staleness() < MAX_STALENESS
            assert side.reloads == ["bootstrap"], side.reloads
    client = aioredis.from_url(redis_server.url)
    try:
        entries: Any = await client.xrange(STREAM)
        kinds = {fields[b"kind"] for _id, fields in entries}
        assert {b"reset", b"changes", b"heartbeat"} <= kinds
        assert await client.hget(f"{STREAM}:snapshot", "id") is not None
    finally:
        await client.aclose()
