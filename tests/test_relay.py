"""The Redis Streams relay and sidecars in relay mode, against real PostgreSQL and Redis.

Each test starts its own redis-server (tests/redis_server.py, a Unix socket: no
port to collide on) so it can restart or trim it. Most start from `fleet`: a relay
that has published and N followers loaded from it. After each scenario every
follower equals the database (tests/sync_harness.assert_equal: digests per tenant
and random checks against `pdp.check`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from pdp.engine import Snapshot
from pdp.replica import Replica
from pdp.supervisor import Lifespan, Supervisor
from sync import redis_follower
from sync.options import RelayOptions, SyncOptions
from sync.redis_follower import RedisFollower
from sync.redis_stream import covers
from sync.relay import Relay
from tests.redis_server import RedisServer
from tests.sync_harness import MAX_STALENESS, assert_all_equal, assert_equal, seed, writer
from tests.waiting import until, until_true

STREAM = "pdp:test"
OPTIONS = SyncOptions(poll_interval=0.2, heartbeat=1.0, backoff_initial=0.05, backoff_max=0.5)


def relay_options(**changes: float) -> RelayOptions:
    values: dict[str, float] = {
        "election_interval": 0.2, "lock_heartbeat": 0.5, "snapshot_interval": 60.0, **changes,
    }  # fmt: skip
    return RelayOptions(stream=STREAM, **values)  # type: ignore[arg-type]


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


@dataclass
class Fleet:
    relay: Relay
    followers: list[RedisFollower]

    @property
    def side(self) -> RedisFollower:
        return self.followers[0]


@contextlib.asynccontextmanager
async def fleet(url: str, redis_url: str, n: int = 1, **changes: float) -> AsyncIterator[Fleet]:
    """A relay that has published and `n` supervised followers, all loaded (stopped in
    reverse: followers first)."""
    async with relay(url, redis_url, **changes) as worker, contextlib.AsyncExitStack() as running:
        await until(lambda: worker.published > 0, 10, "the relay published nothing")
        followers = [follower(url, redis_url) for _ in range(n)]
        for side in followers:
            await running.enter_async_context(supervised("sync", side.lifespan))
        await until(lambda: all(f.replica.ready for f in followers), 20, "not all followers loaded")
        assert all(f.reloads == ["bootstrap"] for f in followers)
        yield Fleet(worker, followers)


async def more_changes(pg: asyncpg.Connection, n: int, within: float = 20.0) -> None:
    """Wait until the writers have committed `n` more changes (visible change_log rows)."""
    newest = "SELECT coalesce(max(id), 0) FROM pdp.change_log"
    target = await pg.fetchval(newest) + n

    async def reached() -> bool:
        return bool(await pg.fetchval(newest) >= target)

    await until_true(reached, within)


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
    async with fleet(seeded, redis_server.url) as running:
        side = running.side
        async with writers(seeded):
            await more_changes(pg, 200)  # let them write for a while
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


async def test_relay_failover_while_writers_run(
    seeded: str, pg: asyncpg.Connection, redis_server: RedisServer
) -> None:
    async with relay(seeded, redis_server.url) as first, relay(seeded, redis_server.url) as second:
        relays = (first, second)
        await until(lambda: sum(r.published for r in relays) > 0, 10, "nobody publishes")
        assert sum(r.leading.is_set() for r in relays) == 1
        side = follower(seeded, redis_server.url)
        async with supervised("sync", side.lifespan):
            await until(lambda: side.replica.ready, 10, "the follower did not load")
            async with writers(seeded):
                for _ in range(3):  # the leader loses its lock connection, three times
                    await _kill_the_leaders_lock(pg, relays)
            await assert_equal(pg, side.replica)
            # The new leaders continued the chain: the follower never had to reload.
            assert side.reloads == ["bootstrap"], side.reloads


async def _kill_the_leaders_lock(pg: asyncpg.Connection, relays: tuple[Relay, ...]) -> None:
    leader = next(r for r in relays if r.leading.is_set())
    terms = sum(r.terms for r in relays)
    await pg.execute("SELECT pg_terminate_backend($1)", leader.lock_pid)
    # Some relay (either: the old one competes again) leads a new term and publishes.
    await until(lambda: sum(r.terms for r in relays) > terms, 10, "no relay took over")
    published = sum(r.published for r in relays)
    await until(lambda: sum(r.published for r in relays) > published, 10, "nothing published")


async def test_leader_stopped_a_standby_takes_over(
    seeded: str, pg: asyncpg.Connection, redis_server: RedisServer
) -> None:
    first_running = contextlib.AsyncExitStack()
    first = await first_running.enter_async_context(relay(seeded, redis_server.url))
    try:
        await until(lambda: first.published > 0, 10, "the relay did not publish")
        async with relay(seeded, redis_server.url) as second:
            side = follower(seeded, redis_server.url)
            async with supervised("sync", side.lifespan):
                await until(lambda: side.replica.ready, 10, "the follower did not load")
                async with writers(seeded):
                    assert not second.leading.is_set()
                    await first_running.aclose()  # the leader stops (its sessions end)
                    await until(lambda: second.published > 3, 10, "the standby did not take over")
                await assert_equal(pg, side.replica)
                assert side.reloads == ["bootstrap"], side.reloads
    finally:
        await first_running.aclose()


async def test_redis_restarted_the_follower_reloads_and_converges(
    seeded: str, pg: asyncpg.Connection, redis_server: RedisServer
) -> None:
    async with fleet(seeded, redis_server.url) as running:
        side = running.side
        async with writers(seeded):
            redis_server.stop()
            await more_changes(pg, 30)  # writes happen while Redis is down
            await redis_server.start()
            await until(lambda: "redis_restart" in side.reloads, 20, "no reload")
            await more_changes(pg, 60)  # and go on after the reload
        await assert_equal(pg, side.replica, within=20)
        assert running.relay.terms >= 2  # the relay stepped down and led again


@pytest.mark.parametrize("snapshot_interval", [0.3, 600.0])
async def test_stream_trimmed_past_a_slow_follower_reloads(
    seeded: str, pg: asyncpg.Connection, redis_server: RedisServer, snapshot_interval: float
) -> None:
    """The follower pauses; the stream is trimmed past its position; it reloads: from the
    stored snapshot when that is newer than the trim (short interval), else from
    PostgreSQL (the stored snapshot is older than what is left of the stream)."""
    async with relay(seeded, redis_server.url, snapshot_interval=snapshot_interval) as worker:
        await until(lambda: worker.published > 0, 10, "the relay published nothing")
        side = follower(seeded, redis_server.url)
        async with supervised("sync", side.lifespan):
            await until(lambda: side.replica.ready, 10, "the follower did not load")
        # Paused (its worker stopped, its position kept) while writes go on.
        async with writers(seeded):
            await more_changes(pg, 60)
        client = aioredis.from_url(redis_server.url)
        try:
            if snapshot_interval < 1:  # trim right after a snapshot at the stream's end
                async with asyncio.timeout(10):
                    while await _stored_id(client) != await _last_id(client):  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
            await client.xtrim(STREAM, maxlen=3, approximate=False)
        finally:
            await client.aclose()
        async with supervised("sync", side.lifespan):
            await until(lambda: "gap" in side.reloads, 10, "the follower did not reload")
            async with writers(seeded, 2):
                await more_changes(pg, 30)
            await assert_equal(pg, side.replica)
        # A stored snapshot older than the trim joins nothing: a second reload, from
        # PostgreSQL, follows at once.
        expected = ["bootstrap", "gap"] if snapshot_interval < 1 else ["bootstrap", "gap", "gap"]
        assert side.reloads == expected, side.reloads


async def _stored_id(client: aioredis.Redis) -> bytes | None:
    found: Any = await client.hget(f"{STREAM}:snapshot", "id")
    return bytes(found) if found is not None else None


async def _last_id(client: aioredis.Redis) -> bytes | None:
    last: Any = await client.xrevrange(STREAM, count=1)
    return bytes(last[0][0]) if last else None


FOLLOWERS = 50
# The relay's sessions: its LISTEN connection, its lock, its catch-up queries.
RELAY_SESSIONS = {"pdp-listen": 1, "pdp-relay-lock": 1, "pdp-sync": 1}
SESSIONS = (
    "SELECT application_name, count(*) AS n FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
    "AND application_name LIKE 'pdp-%' GROUP BY 1"
)


async def test_many_followers_converge_while_postgres_sees_one_listener(
    seeded: str, pg: asyncpg.Connection, redis_server: RedisServer
) -> None:
    """50 followers (in-process) load, follow writers, and equal the database; all the
    while PostgreSQL sees the relay's three sessions, one of them the only LISTEN."""
    async with fleet(seeded, redis_server.url, FOLLOWERS) as running:
        samples: list[dict[str, int]] = []
        async with writers(seeded):
            # Sampled while the writers run (the writers' own sessions are not pdp-*).
            for _ in range(20):
                samples.append({r["application_name"]: r["n"] for r in await pg.fetch(SESSIONS)})
                await asyncio.sleep(0.1)
        samples.append({r["application_name"]: r["n"] for r in await pg.fetch(SESSIONS)})
        # No follower holds a session (so none LISTENs): only the relay's.
        assert all(s == RELAY_SESSIONS for s in samples), samples
        await assert_all_equal(pg, [f.replica for f in running.followers])
        assert all(f.reloads == ["bootstrap"] for f in running.followers)


async def test_epoch_change_and_truncate_reload_the_followers(
    seeded: str, pg: asyncpg.Connection, redis_server: RedisServer
) -> None:
    async with fleet(seeded, redis_server.url) as running:
        side = running.side
        old_epoch = side.replica.epoch
        await pg.execute("UPDATE pdp.sync_meta SET epoch = gen_random_uuid()")
        await assert_equal(pg, side.replica)
        assert side.replica.epoch != old_epoch
        assert side.reloads == ["bootstrap", "reset"], side.reloads
        await pg.execute("TRUNCATE pdp.group_members")
        await assert_equal(pg, side.replica)
        assert side.reloads == ["bootstrap", "reset", "reset"], side.reloads
        async with writers(seeded, 2):
            await more_changes(pg, 30)
        await assert_equal(pg, side.replica)


async def test_follower_bootstraps_from_postgres_when_redis_has_no_snapshot(
    seeded: str, pg: asyncpg.Connection, redis_server: RedisServer
) -> None:
    """Loaded from PostgreSQL at S while the stream stands at an older T: entries ending
    before S are skipped, the first one past S makes the replica exact."""
    async with relay(seeded, redis_server.url) as worker:
        side = follower(seeded, redis_server.url)
        async with writers(seeded):
            await until(lambda: worker.published > 5, 10, "the relay published nothing")
            client = aioredis.from_url(redis_server.url)
            try:
                await client.delete(f"{STREAM}:snapshot")
            finally:
                await client.aclose()
            async with supervised("sync", side.lifespan):
                await until(lambda: side.replica.ready, 10, "the follower did not load")
                await more_changes(pg, 60)  # writes go on
            assert side.reloads == ["bootstrap"], side.reloads
        async with supervised("sync", side.lifespan):  # the same follower, resumed
            await assert_equal(pg, side.replica)
            assert side.reloads == ["bootstrap"], side.reloads
    # A new leader that finds no stored snapshot writes one with its first batch.
    client = aioredis.from_url(redis_server.url)
    try:
        await client.delete(f"{STREAM}:snapshot")
        async with relay(seeded, redis_server.url), asyncio.timeout(10):
            while await _stored_id(client) is None:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("later", "earlier", "covered"),
    [
        ("10:10:", "10:10:", True),
        ("12:15:12,13", "10:12:10,11", True),  # 10, 11 still in progress in both
        ("10:15:10", "11:12:", False),  # 10 committed in `earlier`, not in `later`
        ("10:12:", "10:14:12", False),  # 13 committed in `earlier`, beyond `later`
        ("10:12:", "10:14:12,13", True),  # nothing past 12 committed in `earlier`
        ("10:12:", "13:13:", False),  # 12 below earlier's xmin: committed there
    ],
)
def test_covers(later: str, earlier: str, covered: bool) -> None:
    assert covers(Snapshot.parse(later), Snapshot.parse(earlier)) is covered


async def test_a_foreign_entry_in_the_stream_reloads_and_the_relay_starts_it_over(
    seeded: str, pg: asyncpg.Connection, redis_server: RedisServer
) -> None:
    async with fleet(seeded, redis_server.url) as running:
        side = running.side
        client = aioredis.from_url(redis_server.url)
        try:
            await client.xadd(STREAM, {"something": "else"})
        finally:
            await client.aclose()
        await until(lambda: "bad_entry" in side.reloads, 10, "the follower did not reload")
        async with writers(seeded, 2):
            await more_changes(pg, 30)
        await assert_equal(pg, side.replica)
        assert running.relay.terms >= 2  # the append was refused: a new term, a reset


async def test_a_tenant_reloaded_by_the_relay_reaches_the_followers(
    seeded: str, pg: asyncpg.Connection, redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch, tenant_builds: list[bool],
) -> None:  # fmt: skip
    """A batch that replaces a tenant whole (a bulk load, a verifier repair) carries the
    tenant's rows; decoded off the event loop when large (here: every entry), and the
    tenant's new state is built off it too."""
    monkeypatch.setattr(redis_follower, "BIG_ENTRY", 0)
    async with fleet(seeded, redis_server.url) as running:
        side = running.side
        # Change the tenant behind the change log's back, then have the relay
        # re-read it whole: only the tenant entry can make the follower equal.
        logged = await pg.fetchval("SELECT count(*) FROM pdp.change_log")
        await pg.execute("SET session_replication_role = replica")
        await pg.execute("DELETE FROM pdp.group_members WHERE tenant_id = 'tenant-1'")
        await pg.execute("SET session_replication_role = DEFAULT")
        assert await pg.fetchval("SELECT count(*) FROM pdp.change_log") == logged
        entries = side.entries
        assert running.relay.reload_tenant("tenant-1")
        await until(lambda: side.entries > entries, 10, "nothing arrived")
        await assert_equal(pg, side.replica)
        assert side.reloads == ["bootstrap"], side.reloads
        assert tenant_builds
        assert not any(tenant_builds)  # none on the event loop
