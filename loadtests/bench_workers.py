"""`pdp serve --workers N` (issue 16 item 2): checks/s for 1 vs 2 workers, the second
worker's memory, propagation with workers.

    python -m loadtests.bench_workers [--users 100000] [--wrk-seconds 10] [--rounds 2]
        [--rate 200] [--seconds 10]

Seeds a scratch database (as `bench_sync.py`; PDP_DATABASE_URL names the server,
default the local PostgreSQL), then in one run:
1. throughput: `pdp serve` (1 process) and `pdp serve --workers 2` alternate for
   `--rounds` rounds of wrk (1 thread, 32 connections, no CPU pinning: the servers and
   wrk share every core alike); medians of req/s and their ratio;
2. memory, after the load: the first worker's RSS and the second's USS (private
   pages) and PSS, from /proc/PID/smaps_rollup, and the single process's RSS;
3. propagation, 1 process then 2 workers: writers commit `--rate` grant flips/s for `--seconds`;
   commit -> correct answer by polling (new connections: any worker) and with
   X-PDP-Min-Revision, and each worker's `pdp_sync_propagation_seconds` p99 (bucket
   bound) from the merged /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg

from loadtests.bench_sync import (
    ROLE,
    TENANT,
    _free_port,
    _pct,
    prepare,
    scratch_database,
    writer,
    wrk,
)


@contextlib.asynccontextmanager
async def served(url: str, workers: int) -> AsyncIterator[tuple[str, int]]:
    """(base URL, pid) of `pdp serve --workers N`, ready."""
    port = _free_port()
    env = {
        **os.environ,
        "PDP_DATABASE_URL": url,
        "PDP_PORT": str(port),
        "PDP_DEFAULT_TENANT": TENANT,
        "PDP_LOG_LEVEL": "WARNING",
        "PDP_WORKERS": str(workers),
        "PDP_DRAIN_SECONDS": "0",
    }
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "pdp", "serve", env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            deadline = time.monotonic() + 300
            seen: set[str] = set()
            while len(seen) < workers:  # every worker answers (a fresh connection each)
                if time.monotonic() > deadline:
                    raise RuntimeError("pdp serve did not become ready")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{base}/readyz") as resp:
                        if resp.status == 200:
                            seen.add(resp.headers.get("X-PDP-Worker", "1"))
                await asyncio.sleep(0.05)
        yield base, proc.pid
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)


def children(pid: int) -> list[int]:
    return sorted(int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())


def rollup(pid: int) -> dict[str, int]:
    """kB fields of /proc/PID/smaps_rollup (Rss, Pss, Private_Clean, ...)."""
    found = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        found[name] = int(value.split()[0])
    return found


def uss(fields: dict[str, int]) -> int:
    return fields["Private_Clean"] + fields["Private_Dirty"]


def histogram_p99(text: str, name: str, process: str) -> float:
    """The upper bound of the bucket holding the 99th percentile of one process's series."""
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        mine = f'process="{process}"' in line if process else True
        if line.startswith(f"{name}_bucket{{") and mine:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((math.inf if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return math.nan
    total = buckets[-1][1]
    return next(bound for bound, n in buckets if n >= 0.99 * total)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and its children (the workers) so far."""
    total = 0
    for p in (pid, *children(pid)):
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


async def throughput(url: str, args: argparse.Namespace) -> dict[int, list[float]]:
    rates: dict[int, list[float]] = {1: [], 2: []}
    # Server CPU seconds per 1,000 checks and the cores wrk itself used: on a machine
    # where the load generator shares the cores, the scaling a dedicated host would see
    # is the ratio of CPU per check, not of checks/s.
    per_check: dict[int, list[float]] = {1: [], 2: []}
    wrk_cores: dict[int, list[float]] = {1: [], 2: []}
    memory: dict[str, int] = {}
    for _ in range(args.rounds):
        for workers in (1, 2):
            async with served(url, workers) as (base, pid):
                await asyncio.to_thread(wrk, base, 2, args.users)  # warm-up
                cpu, kids = cpu_seconds(pid), resource.getrusage(resource.RUSAGE_CHILDREN)
                rate = await asyncio.to_thread(wrk, base, args.wrk_seconds, args.users)
                served_cpu = cpu_seconds(pid) - cpu
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                load = (after.ru_utime + after.ru_stime) - (kids.ru_utime + kids.ru_stime)
                rates[workers].append(rate)
                per_check[workers].append(served_cpu / (rate * args.wrk_seconds) * 1e3)
                wrk_cores[workers].append(load / args.wrk_seconds)
                print(
                    f"  {workers} worker(s): {rate:.0f} req/s, server "
                    f"{served_cpu / args.wrk_seconds:.2f} cores ({per_check[workers][-1]:.3f} "
                    f"CPU s per 1,000 checks), wrk {wrk_cores[workers][-1]:.2f} cores",
                    flush=True,
                )
                if workers == 1:
                    memory["single_rss"] = rollup(pid)["Rss"]
                else:
                    first, second = (rollup(p) for p in children(pid))
                    memory |= {
                        "first_rss": first["Rss"], "first_uss": uss(first),
                        "second_rss": second["Rss"], "second_uss": uss(second),
                        "second_pss": second["Pss"], "owner_rss": rollup(pid)["Rss"],
                    }  # fmt: skip
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(
        f"checks/s: 1 worker {one:.0f}, 2 workers {two:.0f}: {two / one:.2f}x (median of "
        f"{args.rounds} rounds, wrk -t1 -c32, unpinned, all cores shared with the load)"
    )
    cost1, cost2 = statistics.median(per_check[1]), statistics.median(per_check[2])
    print(
        f"server CPU per 1,000 checks: 1 worker {cost1:.3f} s, 2 workers {cost2:.3f} s; wrk "
        f"used {statistics.median(wrk_cores[1]):.2f} / {statistics.median(wrk_cores[2]):.2f}"
        f" cores. With a core per worker and the load elsewhere, 2 workers would give "
        f"{2 * cost1 / cost2:.2f}x (2 x the ratio of CPU per check)"
    )
    m = memory
    print(
        f"memory (kB, after the load): single process RSS {m['single_rss']}; owner RSS "
        f"{m['owner_rss']}; worker 1 RSS {m['first_rss']} (USS {m['first_uss']}); worker 2 "
        f"RSS {m['second_rss']}, USS {m['second_uss']} "
        f"({m['second_uss'] / m['first_rss']:.0%} of worker 1's RSS), "
        f"PSS {m['second_pss']} ({m['second_pss'] / m['first_rss']:.0%})"
    )
    return rates


async def propagation(url: str, args: argparse.Namespace, workers: int) -> None:
    conn = await asyncpg.connect(url)
    try:  # the writers start from no grant of the toggled role (an earlier run left some)
        await conn.execute("DELETE FROM pdp.user_roles WHERE role_id = $1", ROLE)
    finally:
        await conn.close()
    async with served(url, workers) as (base, _pid):
        results: dict[str, list[float]] = {
            k: [] for k in ("poll", "min-revision", "wrong", "fallback", "poll_timeouts", "commits")
        }
        until = time.monotonic() + args.seconds
        await asyncio.gather(*(
            writer(i, url, base, args.rate / 4, until, results, 10) for i in range(4)
        ))  # fmt: skip
        async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics") as resp:
            text = await resp.text()
    commits = len(results["commits"])
    print(f"propagation, {workers} worker(s): {commits} commits in {args.seconds}s by 4 writers")
    for kind in ("poll", "min-revision"):
        v = results[kind]
        print(
            f"  commit-to-visible [{kind}]: n={len(v)} p50={_pct(v, 50) * 1000:.1f} ms "
            f"p99={_pct(v, 99) * 1000:.1f} ms max={max(v, default=0) * 1000:.1f} ms"
        )
    print(
        f"  wrong answers: {len(results['wrong'])}, SQL fallbacks: {len(results['fallback'])}, "
        f"poll timeouts: {len(results['poll_timeouts'])}"
    )
    for process in ("owner", "1", "2") if workers == 2 else ("",):
        p99 = histogram_p99(text, "pdp_sync_propagation_seconds", process)
        where = f" [{process}]" if process else ""
        print(f"  pdp_sync_propagation_seconds p99 (bucket bound){where}: {p99 * 1000:g} ms")


async def main(args: argparse.Namespace) -> None:
    server = os.environ.get("PDP_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    async with scratch_database(server) as url:
        print(f"seeding {args.users} users ...", flush=True)
        await prepare(url, args.users)
        await throughput(url, args)
        for workers in (1, 2):
            await propagation(url, args, workers)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--wrk-seconds", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rate", type=float, default=200.0, help="commits/s during propagation")
    p.add_argument("--seconds", type=int, default=10, help="duration of the writes")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
