"""A tenant reloaded whole while `pdp serve` answers checks: how long, how much memory,
and how long checks wait meanwhile (issue 16).

Runs a real `pdp serve` against PDP_DATABASE_URL (seed it first: `pdp seed --users
1000000`); once ready, marks the tenant bulk-loaded (`pdp.mark_bulk_load`, what a bulk
import does), which makes the sidecar re-read and rebuild it whole, while one client
sends a check every 5 ms. Prints per run: seconds from the mark to the reload counted
(`pdp_cache_tenant_reloads_total`), the checks' p50 / p99 / max latency during the
reload, and VmHWM (peak RSS) before and after.

    PDP_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/pdp_1m \\
        python -m loadtests.bench_tenant_reload --runs 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import time

import aiohttp
import asyncpg

from loadtests.bench_ready import _status_kib
from loadtests.bench_snapshot_file import _ready
from loadtests.bench_sync import _free_port

TENANT = "tenant-1"
RELOADS = re.compile(rb"^pdp_cache_tenant_reloads_total (\S+)$", re.MULTILINE)
CHECK = {
    "subject": {"type": "user", "id": "user-1", "properties": {"tenant": TENANT}},
    "action": {"name": "read"},
    "resource": {"type": "document", "id": "1"},
}


async def _reloads(http: aiohttp.ClientSession, base: str) -> float:
    async with http.get(f"{base}/metrics") as resp:
        found = RELOADS.search(await resp.read())
    return float(found.group(1)) if found else 0.0


async def _checks(http: aiohttp.ClientSession, base: str, out: list[float]) -> None:
    """One check every 5 ms, each latency appended (seconds)."""
    while True:
        started = time.monotonic()
        async with http.post(f"{base}/access/v1/evaluation", json=CHECK) as resp:
            await resp.read()
            assert resp.status == 200, resp.status
        out.append(time.monotonic() - started)
        await asyncio.sleep(max(0.0, 0.005 - (time.monotonic() - started)))


async def run(url: str) -> dict[str, float]:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PDP_DATABASE_URL": url,
        "PDP_PORT": str(port),
        "PDP_DRAIN_SECONDS": "0",
        "PDP_LOG_LEVEL": os.environ.get("BENCH_PDP_LOG_LEVEL", "WARNING"),
    }
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "pdp", "serve", env=env)
    try:
        await _ready(base, proc, time.monotonic())
        before = _status_kib(proc.pid, "VmHWM") / 1024
        async with aiohttp.ClientSession() as http:
            counted = await _reloads(http, base)
            latencies: list[float] = []
            checking = asyncio.create_task(_checks(http, base, latencies))
            conn = await asyncpg.connect(url)
            try:
                marked = time.monotonic()
                await conn.execute("SELECT pdp.mark_bulk_load($1)", TENANT)
            finally:
                await conn.close()
            deadline = marked + 600
            while await _reloads(http, base) <= counted:
                if time.monotonic() > deadline:
                    raise RuntimeError("the tenant was not reloaded")
                await asyncio.sleep(0.05)
            seconds = time.monotonic() - marked
            checking.cancel()
            await asyncio.gather(checking, return_exceptions=True)
        after = _status_kib(proc.pid, "VmHWM") / 1024
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 300)
    ordered = sorted(latencies)
    return {
        "reload_s": seconds,
        "checks": len(ordered),
        "p50_ms": ordered[len(ordered) // 2] * 1000,
        "p99_ms": ordered[int(len(ordered) * 0.99)] * 1000,
        "max_ms": ordered[-1] * 1000,
        "peak_before_mib": before,
        "peak_after_mib": after,
    }


async def main(args: argparse.Namespace) -> None:
    url = os.environ["PDP_DATABASE_URL"]
    results = []
    for i in range(args.runs):
        got = await run(url)
        results.append(got)
        print(f"run {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in got.items()), flush=True)
    print(
        "median: "
        + ", ".join(f"{k} {statistics.median(r[k] for r in results):.2f}" for k in results[0])
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    asyncio.run(main(parser.parse_args()))
