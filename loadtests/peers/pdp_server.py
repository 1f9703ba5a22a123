"""pdp's check API over the comparison's dataset, for the server round (a subprocess).

    python -m loadtests.peers.pdp_server --users N --seed S --now EPOCH

Builds the same `dataset.generate(users, seed, now)` into pdp's engine, serves
`pdp.web.app.build_app` (metrics on, its own registry) on a free loopback port with
uvloop when installed, and prints `PORT <n>` once listening. No database: the
replica is installed directly and never goes stale.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time

from loadtests.bare_app import run_loop
from loadtests.peers.dataset import generate


async def serve(users: int, seed: int, now: float) -> None:
    from aiohttp import web  # noqa: PLC0415 -- server process only
    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    from pdp.config import Settings  # noqa: PLC0415
    from pdp.engine import Engine, Snapshot  # noqa: PLC0415
    from pdp.replica import Replica  # noqa: PLC0415
    from pdp.web.app import build_app  # noqa: PLC0415

    data = generate(users, seed, now)
    engine = Engine.build(data.rows, Snapshot(1, 1))
    del data
    replica = Replica(clock=time.monotonic)
    replica.install(engine, epoch="peers", synced_at=time.monotonic())
    settings = Settings(default_tenant=None, max_staleness_seconds=1e9)
    app = build_app(settings, replica=replica, registry=CollectorRegistry())
    gc.collect()
    gc.freeze()  # as a service would after loading
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"PORT {runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--now", type=float, required=True, help="the dataset's decision time")
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)
    run_loop(serve(args.users, args.seed, args.now), uvloop=not args.no_uvloop)


if __name__ == "__main__":
    main()
