"""A very large tenant (issue 14): on-demand mode with a hot set beside full mode.

Two real `pdp serve` processes, one after the other, on the same seeded database:

1. full mode: seconds from start to /readyz 200 (the whole tenant loaded), its
   resident memory then (VmRSS, and the peak VmHWM, from /proc/PID/status), and
   check latency under the workload below;
2. on-demand mode (`PDP_CACHE_MODE=on_demand`, `PDP_CACHE_USERS=--cache`): seconds
   to ready, a warm-up that asks once for every hot user (all misses, timed), then
   `--requests` checks: hit ratio (the sidecar's pdp_cache_hits_total and
   pdp_cache_misses_total over this phase), check latency p50/p99 as the client sees
   it, and resident memory after.

The workload: `--hot-share` of requests name one of `--hot` users (a random 1% of
a 5,000,000-user tenant by default), the rest any user of the tenant, uniformly;
`--concurrency` requests in flight over HTTP keep-alive from this process.

    python -m loadtests.bench_big_tenant --users 5000000 --hot 50000 --cache 60000

Without `--database`, a scratch database is created on PDP_DATABASE_URL's server
(default the local PostgreSQL), seeded with `pdp seed --users N` (timed) and dropped
at the end; `--database URL` uses an already seeded one and leaves it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import sys
import time
from collections.abc import AsyncIterator

import aiohttp

from loadtests.bench_sync import _free_port, scratch_database

TENANT = "tenant-1"


def _memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of `pid`, in MiB."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in {"VmRSS", "VmHWM"}:
                out[key] = int(value.split()[0]) / 1024
    return out


@contextlib.asynccontextmanager
async def serve(url: str, extra: dict[str, str]) -> AsyncIterator[tuple[str, int, float]]:
    """A `pdp serve` on a free port; yields (base URL, pid, seconds to ready)."""
    port = _free_port()
    env = {
        **os.environ, "PDP_DATABASE_URL": url, "PDP_PORT": str(port),
        "PDP_DEFAULT_TENANT": TENANT, "PDP_LOG_LEVEL": "WARNING", **extra,
    }  # fmt: skip
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "pdp", "serve", env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            while True:
                if proc.returncode is not None or time.monotonic() - t0 > 3600:
                    raise RuntimeError("the sidecar exited or did not become ready")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{base}/readyz") as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.2)  # readiness is only observable by asking
        yield base, proc.pid, time.monotonic() - t0
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 60)


def _body(user: str) -> bytes:
    return json.dumps(
        {
            "subject": {"type": "user", "id": user, "properties": {"tenant": TENANT}},
            "action": {"name": "read"},
            "resource": {"type": "document", "id": "d1"},
        }
    ).encode()


async def drive(base: str, users: list[str], concurrency: int) -> tuple[list[float], float]:
    """Ask one check per entry of `users`; return each latency (s) and the wall time."""
    latencies: list[float] = []
    queue = iter(users)
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)

    async def one(http: aiohttp.ClientSession) -> None:
        for user in queue:
            t = time.perf_counter()
            async with http.post(
                f"{base}/access/v1/evaluation", data=_body(user), headers=headers
            ) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status} for {user}")
            latencies.append(time.perf_counter() - t)

    t0 = time.monotonic()
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(one(http) for _ in range(concurrency)))
    return latencies, time.monotonic() - t0


async def counters(base: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    found = re.findall(r"^(pdp_cache_(?:hits|misses)_total) (\S+)$", text, re.MULTILINE)
    return {k: float(v) for k, v in found}


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000


def _latency(values: list[float], seconds: float) -> str:
    return (
        f"{len(values)} checks in {seconds:.1f} s ({len(values) / seconds:.0f}/s), "
        f"p50 {_pct(values, 0.5):.2f} ms, p99 {_pct(values, 0.99):.2f} ms"
    )


def workload(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(hot users, `--requests` draws): hot-share to the hot set, the rest uniform."""
    rng = random.Random(7)
    hot = [f"user-{i:06d}" for i in rng.sample(range(args.users), args.hot)]
    draws = [
        rng.choice(hot)
        if rng.random() < args.hot_share
        else f"user-{rng.randrange(args.users):06d}"
        for _ in range(args.requests)
    ]
    return hot, draws


async def run(url: str, args: argparse.Namespace) -> None:
    hot, draws = workload(args)
    print(f"users={args.users} hot={args.hot} hot_share={args.hot_share} cache={args.cache} "
          f"requests={args.requests} concurrency={args.concurrency}", flush=True)  # fmt: skip
    if not args.skip_full:
        async with serve(url, {"PDP_CACHE_MODE": "full"}) as (base, pid, ready):
            mem = _memory(pid)
            print(f"full: ready in {ready:.1f} s, VmRSS {mem['VmRSS']:.0f} MiB, VmHWM "
                  f"{mem['VmHWM']:.0f} MiB", flush=True)  # fmt: skip
            latencies, seconds = await drive(base, draws, args.concurrency)
            mem = _memory(pid)
            print(f"full: {_latency(latencies, seconds)}; VmRSS {mem['VmRSS']:.0f} MiB",
                  flush=True)  # fmt: skip
    extra = {"PDP_CACHE_MODE": "on_demand", "PDP_CACHE_USERS": str(args.cache),
             "PDP_CACHE_TTL_SECONDS": "3600"}  # fmt: skip
    async with serve(url, extra) as (base, pid, ready):
        mem = _memory(pid)
        print(f"on_demand: ready in {ready:.1f} s, VmRSS {mem['VmRSS']:.0f} MiB", flush=True)
        latencies, seconds = await drive(base, hot, args.concurrency)
        mem = _memory(pid)
        print(f"on_demand warm-up (each hot user once: misses): {_latency(latencies, seconds)}; "
              f"VmRSS {mem['VmRSS']:.0f} MiB", flush=True)  # fmt: skip
        before = await counters(base)
        latencies, seconds = await drive(base, draws, args.concurrency)
        after = await counters(base)
        hits = after["pdp_cache_hits_total"] - before["pdp_cache_hits_total"]
        misses = after["pdp_cache_misses_total"] - before["pdp_cache_misses_total"]
        mem = _memory(pid)
        print(f"on_demand: hit ratio {hits / (hits + misses):.4f} ({hits:.0f} hits, "
              f"{misses:.0f} misses); {_latency(latencies, seconds)}; VmRSS "
              f"{mem['VmRSS']:.0f} MiB, VmHWM {mem['VmHWM']:.0f} MiB", flush=True)  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    if args.database:
        await run(args.database, args)
        return
    server = os.environ.get("PDP_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    async with scratch_database(server) as url:
        env = {**os.environ, "PDP_DATABASE_URL": url}
        for step in (["migrate"], ["seed", "--users", str(args.users)]):
            t0 = time.monotonic()
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "pdp", *step, env=env)
            if await proc.wait() != 0:
                raise RuntimeError(f"pdp {step[0]} failed")
            print(f"pdp {' '.join(step)}: {time.monotonic() - t0:.1f} s", flush=True)
        await run(url, args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--users", type=int, default=5_000_000, help="seeded users (with --database: as seeded)"
    )
    parser.add_argument("--hot", type=int, default=50_000)
    parser.add_argument("--hot-share", type=float, default=0.99)
    parser.add_argument("--cache", type=int, default=60_000)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--database", help="an already seeded database (left as it is)")
    parser.add_argument("--skip-full", action="store_true", help="on-demand mode only")
    asyncio.run(main(parser.parse_args()))
