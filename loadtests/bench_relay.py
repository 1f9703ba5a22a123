"""Relay benchmark (issue 14): failover time, and PostgreSQL load direct vs relay mode.

In one process, against a scratch database and a private redis-server (Unix socket):
1. failover: two relays, one follower, writers at `--rate` changes/s; the leader's
   lock connection is killed `--kills` times, then the leader is stopped. Printed:
   seconds from each kill/stop to the first entry the new term appends, and whether
   the follower had to reload (it must not) and equals the database afterwards;
2. fan-out: for each N in `--sidecars`, N in-process sidecars in direct mode
   (SyncService each) and then N in relay mode (RedisFollower each, one relay), with
   writers at `--rate` changes/s for `--seconds`: PostgreSQL sessions of the
   database, LISTEN sessions, catch-up transactions per second against PostgreSQL,
   and commit -> visible in every sidecar (p50/p99: each commit's revision awaited on
   every replica, as X-PDP-Min-Revision does).

    python -m loadtests.bench_relay --sidecars 1,10,40 --rate 100 --seconds 10

PDP_DATABASE_URL names the server (a scratch database is created and dropped),
default the local PostgreSQL on 127.0.0.1:5432. Direct mode holds two sessions per
sidecar: keep N below the server's max_connections / 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from loadtests.bench_sync import scratch_database
from pdp.pg import migrate
from pdp.pg import seed as pg_seed
from pdp.pg.seed_data import SeedSpec, synthetic
from pdp.replica import Replica
from pdp.supervisor import Supervisor
from sync.options import RelayOptions, SyncOptions
from sync.redis_follower import RedisFollower
from sync.relay import Relay
from sync.service import SyncService

TENANT = "tenant-1"


async def flip_status(conn: asyncpg.Connection, n: int) -> int:
    """Commit one change (user n mod 300's status flipped); its transaction id."""
    async with conn.transaction():
        xid = int(await conn.fetchval("SELECT pg_current_xact_id()::text"))
        await conn.execute(
            "UPDATE pdp.users SET status = CASE status WHEN 'active' THEN 'disabled' "
            "ELSE 'active' END WHERE tenant_id = $1 AND id = $2",
            TENANT, f"user-{n % 300:06d}",
        )  # fmt: skip
    return xid
STREAM = "pdp:bench"
OPTIONS = SyncOptions(backoff_initial=0.05, backoff_max=0.5)


@contextlib.asynccontextmanager
async def redis_server() -> AsyncIterator[str]:
    directory = Path(tempfile.mkdtemp(prefix="pdp-bench-redis-"))
    sock = directory / "redis.sock"
    binary = (
        os.environ.get("PDP_TEST_REDIS_SERVER") or shutil.which("redis-server") or "redis-server"
    )
    proc = subprocess.Popen(  # noqa: ASYNC220 -- returns at once
        [binary, "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no",
         "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"unix://{sock}"
    client = aioredis.from_url(url)
    try:
        async with asyncio.timeout(10):
            while True:
                try:
                    await client.ping()
                    break
                except (OSError, aioredis.ConnectionError):
                    await asyncio.sleep(0.02)  # no event says a socket is ready
        yield url
    finally:
        await client.aclose()
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.asynccontextmanager
async def supervised(name: str, lifespan: object) -> AsyncIterator[None]:
    supervisor = Supervisor(backoff_initial=0.05, backoff_max=0.5)
    supervisor.add(name, lifespan, critical=True)  # type: ignore[arg-type]
    async with supervisor.running():
        yield


class Writers:
    """Commit one change at a time at `rate`/s; record each commit's xid and time."""

    def __init__(self, url: str, rate: float, replicas: list[Replica]) -> None:
        self.url, self.rate, self.replicas = url, rate, replicas
        self.commits: list[tuple[int, float]] = []
        self.visible: list[float] = []  # commit -> visible in every replica, seconds
        self._probes: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            n, started = 0, time.monotonic()
            while not self._stop.is_set():
                xid = await flip_status(conn, n)
                self.commits.append((xid, time.monotonic()))
                probe = asyncio.create_task(self._probe(xid, time.monotonic()))
                self._probes.add(probe)
                probe.add_done_callback(self._probes.discard)
                n += 1
                with contextlib.suppress(TimeoutError):
                    delay = started + n / self.rate - time.monotonic()
                    await asyncio.wait_for(self._stop.wait(), max(0.0, delay))
        finally:
            await conn.close()

    async def _probe(self, xid: int, at: float) -> None:
        for replica in self.replicas:
            assert await replica.wait_for_revision(xid, 30)
        self.visible.append(time.monotonic() - at)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        await asyncio.gather(*self._probes)


async def failover(url: str, redis_url: str, rate: float, kills: int) -> None:
    options = RelayOptions(stream=STREAM + ":failover")
    relays = [Relay(url, redis_url, options=OPTIONS, relay_options=options) for _ in range(2)]
    takeovers: list[float] = []
    async with contextlib.AsyncExitStack() as stack:
        stacks = []
        for r in relays:
            s = contextlib.AsyncExitStack()
            await s.enter_async_context(supervised("relay", r.lifespan))
            stacks.append(s)
            stack.push_async_callback(s.aclose)
        await _until(lambda: sum(r.published for r in relays) > 0)
        follower = RedisFollower(redis_url, url, Replica(), options=OPTIONS, stream=options.stream)
        await stack.enter_async_context(supervised("sync", follower.lifespan))
        await _until(lambda: follower.replica.ready)
        writers = Writers(url, rate, [follower.replica])
        writers.start()
        killer = await asyncpg.connect(url)
        try:
            for _ in range(kills):
                await asyncio.sleep(1)
                leader = next(r for r in relays if r.leading.is_set())
                terms, published = sum(r.terms for r in relays), sum(r.published for r in relays)
                t0 = time.monotonic()
                await killer.execute("SELECT pg_terminate_backend($1)", leader.lock_pid)
                await _until(lambda t=terms: sum(r.terms for r in relays) > t)
                await _until(lambda p=published: sum(r.published for r in relays) > p + 1)
                takeovers.append(time.monotonic() - t0)
            await asyncio.sleep(1)
            index = next(i for i, r in enumerate(relays) if r.leading.is_set())
            standby = relays[1 - index]
            published = standby.published
            t0 = time.monotonic()
            await stacks[index].aclose()  # the leader stops
            await _until(lambda: standby.published > published)
            stopped = time.monotonic() - t0
        finally:
            await killer.close()
            await writers.stop()
        lag = writers.visible
        print(
            f"failover: lock connection killed {kills}x: takeover (kill -> first append of the "
            f"new term) median {statistics.median(takeovers):.2f} s, max {max(takeovers):.2f} s; "
            f"leader stopped: standby appends after {stopped:.2f} s; follower reloads "
            f"{follower.reloads} (bootstrap only = no gap); {len(writers.commits)} commits, "
            f"commit -> visible p50 {_ms(lag, 50)} ms, p99 {_ms(lag, 99)} ms"
        )


async def fan_out(
    url: str, redis_url: str, n: int, rate: float, seconds: float, modes: list[str]
) -> None:
    pg = await asyncpg.connect(url)
    try:
        for mode in modes:
            async with contextlib.AsyncExitStack() as stack:
                replicas: list[Replica] = []
                catchups: list[SyncService | Relay] = []
                stream = f"{STREAM}:{mode}:{n}"
                if mode == "relay":
                    relay = Relay(
                        url, redis_url, options=OPTIONS, relay_options=RelayOptions(stream=stream)
                    )
                    await stack.enter_async_context(supervised("relay", relay.lifespan))
                    await _until(lambda: relay.published > 0)  # noqa: B023
                    catchups.append(relay)
                for _ in range(n):
                    replica = Replica()
                    if mode == "direct":
                        service = SyncService(url, replica, options=OPTIONS)
                        await stack.enter_async_context(supervised("sync", service.lifespan))
                        catchups.append(service)
                    else:
                        follower = RedisFollower(
                            redis_url, url, replica, options=OPTIONS, stream=stream
                        )
                        await stack.enter_async_context(supervised("sync", follower.lifespan))
                    replicas.append(replica)
                await _until(lambda: all(r.ready for r in replicas))  # noqa: B023
                before = _catchups(catchups)
                writers = Writers(url, rate, replicas)
                t0 = time.monotonic()
                writers.start()
                await asyncio.sleep(seconds)
                sessions = await pg.fetch(
                    "SELECT application_name, count(*) AS n FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() GROUP BY 1"
                )
                await writers.stop()
                elapsed = time.monotonic() - t0
                done = _catchups(catchups) - before
                lag = writers.visible
                by_name = {r["application_name"]: r["n"] for r in sessions}
                total = sum(by_name.values()) - 1  # less the writer's own session
                print(
                    f"{mode:6} N={n:4}: PostgreSQL sessions {total:4} (LISTEN "
                    f"{by_name.get('pdp-listen', 0)}), catch-ups {done / elapsed:7.1f}/s at "
                    f"{len(writers.commits) / elapsed:.0f} commits/s, commit -> visible in "
                    f"every sidecar p50 {_ms(lag, 50)} ms, p99 {_ms(lag, 99)} ms"
                )
    finally:
        await pg.close()


def _catchups(workers: list[SyncService | Relay]) -> int:
    total = 0
    for w in workers:
        total += w.sync.catchups if isinstance(w, SyncService) else w.catchups
    return total


def _ms(values: list[float], pct: int) -> str:
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))] * 1000:.0f}"


async def _until(condition: object, within: float = 30.0) -> None:
    async with asyncio.timeout(within):
        while not condition():  # type: ignore[operator]  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sidecars", default="1,10,40")
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--modes", default="direct,relay", help="direct,relay (or one of them)")
    parser.add_argument("--no-failover", action="store_true", help="skip the failover part")
    args = parser.parse_args()
    server = os.environ.get("PDP_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    async with scratch_database(server) as url, redis_server() as redis_url:
        await migrate.upgrade(url)
        await pg_seed.load(url, synthetic(SeedSpec(tenants=1, users=args.users, roles=20, seed=7)))
        if not args.no_failover:
            await failover(url, redis_url, args.rate, args.kills)
        for n in (int(x) for x in args.sidecars.split(",")):
            await fan_out(url, redis_url, n, args.rate, args.seconds, args.modes.split(","))


if __name__ == "__main__":
    asyncio.run(main())
