"""Admin writes per second, and admin write -> sidecar answer with the revision token.

A real `pdp admin serve` and a real `pdp serve` on a seeded database. `--writers`
clients flip users' grants through the admin API (POST and DELETE of a user_roles
row) at `--rate` writes/s in total. For one write in `--sample`, the client passes
the revision the admin API returned as `X-PDP-Min-Revision` to the sidecar and
times write -> correct decision; every such answer must be the new decision.

    python -m loadtests.bench_admin --users 100000 --rate 1000 --seconds 20

PDP_DATABASE_URL names the server (a scratch database is created and dropped),
default the local PostgreSQL on 127.0.0.1:5432.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
import asyncpg

from loadtests.bench_sync import (
    ROLE,
    TENANT,
    _decision,
    _free_port,
    prepare,
    scratch_database,
    sidecar,
)
from pdp.admin import token_store


@contextlib.asynccontextmanager
async def admin_api(url: str, port: int) -> AsyncIterator[tuple[str, str, int]]:
    conn = await asyncpg.connect(url)
    try:
        token = (await token_store.create(conn, "bench", ("write",), TENANT)).text
    finally:
        await conn.close()
    env = {
        **os.environ,
        "PDP_DATABASE_URL": url,
        "PDP_ADMIN_PORT": str(port),
        "PDP_LOG_LEVEL": "WARNING",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pdp", "admin", "serve", env=env
    )
    base = f"http://127.0.0.1:{port}/admin/v1/tenants/{TENANT}"
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{base}/roles?limit=1", headers=headers) as resp:
                        if resp.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise RuntimeError("the admin API did not answer")
                await asyncio.sleep(0.1)  # polling its port with a deadline: no event to wait on
        yield base, token, proc.pid
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


async def writer(
    index: int,
    writers: int,
    admin: str,
    token: str,
    check: str,
    rate: float,
    until: float,
    sample: int,
    batch: int,
    results: dict[str, list[float]],
) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    granted: set[str] = set()
    period, n = batch / rate, 0
    own = 1000 // writers
    probes: list[asyncio.Task[None]] = []
    async with aiohttp.ClientSession() as http:
        next_at = time.monotonic()
        while time.monotonic() < until:
            users = [f"flip-{index + writers * ((n + i) % own):04d}" for i in range(batch)]
            n += batch
            started = time.monotonic()
            if batch > 1:  # one bulk request, one transaction
                ops = [
                    {"op": "delete", "kind": "user_roles", "key": {"user_id": u, "role_id": ROLE}}
                    if u in granted
                    else {
                        "op": "create",
                        "kind": "user_roles",
                        "key": {"user_id": u, "role_id": ROLE},
                    }
                    for u in users
                ]
                call = http.post(f"{admin}/bulk", json={"operations": ops}, headers=headers)
            elif users[0] in granted:
                call = http.delete(f"{admin}/users/{users[0]}/roles/{ROLE}", headers=headers)
            else:
                call = http.post(
                    f"{admin}/users/{users[0]}/roles", json={"role_id": ROLE}, headers=headers
                )
            async with call as resp:
                body = await resp.json()
                if resp.status not in (200, 201):
                    results["errors"].append(started)
                    if len(results["errors"]) == 1:
                        print(f"first error: {resp.status} {body}")
                    continue
            written = time.monotonic()
            results["requests"].append(written - started)
            results["writes"] += [written] * batch
            granted.symmetric_difference_update(users)
            if (n // batch) % sample == 0:
                last = users[-1]
                revision = int(body["revision"])
                probes.append(
                    asyncio.create_task(
                        probe(http, check, last, last in granted, revision, written, results)
                    )
                )
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await asyncio.gather(*probes)


async def probe(
    http: aiohttp.ClientSession,
    check: str,
    user: str,
    expected: bool,
    revision: int,
    written: float,
    results: dict[str, list[float]],
) -> None:
    decision, _ = await _decision(http, check, user, revision)
    results["visible"].append(time.monotonic() - written)
    if decision != expected:
        results["wrong"].append(written)


def _ms(values: list[float], q: float) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.1f}"


async def main_async(args: argparse.Namespace) -> int:
    server = os.environ.get("PDP_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    async with scratch_database(server) as url:
        await prepare(url, args.users)
        async with (
            sidecar(url, _free_port()) as check,
            admin_api(url, _free_port()) as (admin, token, pid),
        ):
            import psutil  # noqa: PLC0415  (a Locust dependency)

            server = psutil.Process(pid)
            cpu_before = sum(server.cpu_times()[:2])
            results: dict[str, list[float]] = {
                "writes": [],
                "requests": [],
                "visible": [],
                "wrong": [],
                "errors": [],
            }
            started = time.monotonic()
            until = started + args.seconds
            await asyncio.gather(
                *(
                    writer(
                        i,
                        args.writers,
                        admin,
                        token,
                        check,
                        args.rate / args.writers,
                        until,
                        args.sample,
                        args.batch,
                        results,
                    )
                    for i in range(args.writers)
                )
            )
            wall = time.monotonic() - started
            cpu = sum(server.cpu_times()[:2]) - cpu_before
    writes = results["writes"]
    print(
        f"admin writes: {len(writes):,} in {wall:.1f} s = {len(writes) / wall:,.0f}/s "
        f"(asked {args.rate:,.0f}/s, {args.writers} writers); errors {len(results['errors'])}"
    )
    requests = results["requests"]
    print(
        f"  {len(requests):,} requests of {args.batch} operation(s): latency"
        f" p50 {_ms(requests, 0.5)} / p99 {_ms(requests, 0.99)} ms"
        f" (mean {statistics.fmean(requests) * 1000:.1f} ms)"
        if requests
        else "  no request"
    )
    if writes:
        print(f"  admin API process CPU: {cpu:.1f} s = {cpu / len(writes) * 1000:.2f} ms per write")
    visible = results["visible"]
    print(
        f"admin write -> sidecar answer with X-PDP-Min-Revision: {len(visible)} samples, "
        f"p50 {_ms(visible, 0.5)} / p99 {_ms(visible, 0.99)} / max {_ms(visible, 1.0)} ms; "
        f"wrong answers {len(results['wrong'])}"
    )
    return 1 if results["wrong"] or results["errors"] else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=1000.0, help="admin writes/s in total")
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--sample", type=int, default=10, help="time one request in N")
    parser.add_argument(
        "--batch", type=int, default=1, help="operations per request (> 1: the bulk endpoint)"
    )
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
