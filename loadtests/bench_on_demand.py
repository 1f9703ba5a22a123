"""On-demand mode (PDP_CACHE_MODE=on_demand): hit ratio and latency under a Zipf workload.

Seeds a scratch database (`pdp seed --users N`), builds a replica without users' rows
(as the on-demand sync does), then asks `--requests` checks one after another for
users drawn from a Zipf law (exponent `--zipf`) through `sync.user_cache.UserLoader`
(`ensure` then the engine's check), with `--cache` users kept. Prints the hit ratio,
the statements run, and p50/p99 of a hit and of a miss (ensure + check), in microseconds.
In-process, no HTTP; one request at a time (a miss waits for its query).

    python loadtests/bench_on_demand.py --users 100000 --cache 5000 --requests 50000

PDP_DATABASE_URL names the server (a scratch database is created and dropped),
default the local PostgreSQL on 127.0.0.1:5432.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time

import asyncpg

from loadtests.bench_sync import prepare, scratch_database
from pdp.engine import Engine, Snapshot
from pdp.replica import USER_ENTITIES, Replica
from sync import pg_queries as q
from sync.metrics import NullMetrics
from sync.user_cache import UserLoader

TENANT = "tenant-1"


async def _replica(url: str) -> tuple[Replica, list[str]]:
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            snap = Snapshot.parse(await conn.fetchval("SELECT pg_current_snapshot()::text"))
            tables = {
                e: list(await conn.fetch(sql))
                for e, sql in q.ALL_ROWS.items()
                if e not in USER_ENTITIES
            }
            rows = await conn.fetch("SELECT id FROM pdp.users WHERE tenant_id = $1", TENANT)
            users = sorted(r[0] for r in rows)
    finally:
        await conn.close()
    replica = Replica()
    replica.install(Engine.build(tables, snap), "bench", time.monotonic())
    return replica, users


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1e6


async def main(args: argparse.Namespace) -> None:
    server = os.environ.get("PDP_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    async with scratch_database(server) as url:
        await prepare(url, args.users)
        replica, users = await _replica(url)
        rng = random.Random(7)
        rng.shuffle(users)
        weights = [1 / (k**args.zipf) for k in range(1, len(users) + 1)]
        draws = rng.choices(users, weights=weights, k=args.requests)
        loader = UserLoader(url, replica, NullMetrics(), size=args.cache, ttl=3600)
        replica.users = loader
        hits: list[float] = []
        misses: list[float] = []
        async with loader.running():
            for user in draws:
                was_cached = loader.cached(TENANT, user)
                started = time.perf_counter()
                await loader.ensure(TENANT, user)
                engine = replica.engine
                assert engine is not None
                engine.check(TENANT, user, "document", "d1", "read", time.time())
                (hits if was_cached else misses).append(time.perf_counter() - started)
        print(f"users={len(users)} cache={args.cache} requests={args.requests} zipf={args.zipf}")
        print(f"hit_ratio={len(hits) / len(draws):.3f} queries={loader.queries}")
        print(f"hit_us p50={_pct(hits, 0.5):.1f} p99={_pct(hits, 0.99):.1f}")
        print(f"miss_us p50={_pct(misses, 0.5):.1f} p99={_pct(misses, 0.99):.1f}")
        print(f"rows_held={replica.engine.counts() if replica.engine else {}}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--cache", type=int, default=2_000)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--zipf", type=float, default=1.1)
    asyncio.run(main(parser.parse_args()))
