"""The resource inventory at scale: 1,000,000 resources load, sync, and what they cost.

    python loadtests/bench_inventory.py [--resources 1000000]

On a scratch database of PDP_DATABASE_URL's server (default the local PostgreSQL on
127.0.0.1:5432; created, migrated and dropped): COPY `--resources` rows into
pdp.resources (capture off, then pdp.mark_bulk_load), start the sync worker on a
fresh Replica and report the snapshot load time and the RSS it added (bytes per
resource), then update one resource and report commit -> visible in the replica.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script

from loadtests.bench_engine import rss_mb  # noqa: E402
from loadtests.bench_sync import scratch_database  # noqa: E402

TENANT = "inv"


async def _fill(url: str, count: int) -> float:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("INSERT INTO pdp.tenants (id) VALUES ($1)", TENANT)
        start = time.perf_counter()
        async with conn.transaction():
            await conn.execute("SET LOCAL pdp.capture = 'off'")
            await conn.copy_records_to_table(
                "resources",
                schema_name="pdp",
                columns=["tenant_id", "type", "id", "attributes"],
                records=(
                    (TENANT, "document", f"doc-{i}", json.dumps({"ownerID": f"u{i % 1000}@x"}))
                    for i in range(count)
                ),
            )
            await conn.execute("SELECT pdp.mark_bulk_load($1)", TENANT)
        return time.perf_counter() - start
    finally:
        await conn.close()


async def _one_change(conn: asyncpg.Connection, replica: Any, i: int) -> float:
    start = time.perf_counter()
    async with conn.transaction():
        await conn.execute(
            "UPDATE pdp.resources SET attributes = jsonb_build_object('ownerID', $2::text) "
            "WHERE tenant_id = $1 AND type = 'document' AND id = 'doc-5'",
            TENANT,
            f"moved-{i}@x",
        )
        xid = int(await conn.fetchval("SELECT pg_current_xact_id()::text::bigint"))
    assert await replica.wait_for_revision(xid, 30)
    return time.perf_counter() - start


async def run(args: argparse.Namespace) -> None:
    from pdp.pg import migrate  # noqa: PLC0415
    from pdp.replica import Replica  # noqa: PLC0415
    from pdp.supervisor import Supervisor  # noqa: PLC0415
    from sync.options import SyncOptions  # noqa: PLC0415
    from sync.service import SyncService  # noqa: PLC0415

    server = os.environ.get("PDP_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    async with scratch_database(server) as url:
        await migrate.upgrade(url)
        copied = await _fill(url, args.resources)
        print(f"COPY {args.resources} resources: {copied:.1f} s")
        gc.collect()
        before = rss_mb()
        replica = Replica()
        service = SyncService(url, replica, options=SyncOptions(poll_interval=1.0))
        supervisor = Supervisor()
        supervisor.add("sync", service.lifespan, critical=True)
        start = time.perf_counter()
        async with supervisor.running():
            while not replica.ready:  # noqa: ASYNC110 -- the replica has no "loaded" event
                await asyncio.sleep(0.05)
            loaded = time.perf_counter() - start
            gc.collect()
            per = (rss_mb() - before) * 2**20 / args.resources
            engine = replica.engine
            assert engine is not None
            print(f"snapshot load: {loaded:.1f} s; {engine.counts()['resources']} resources held, "
                  f"{per:.0f} bytes each (RSS delta)")  # fmt: skip
            conn = await asyncpg.connect(url)
            try:
                seen = [await _one_change(conn, replica, i) for i in range(5)]
            finally:
                await conn.close()
            shown = ", ".join(f"{ms * 1000:.1f}" for ms in seen)
            print(f"one change at a time: commit -> visible in the replica (ms): {shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resources", type=int, default=1_000_000)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
