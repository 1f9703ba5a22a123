"""Restart-to-ready with and without PDP_SNAPSHOT_FILE (issue 14, instant restarts).

Seeds a scratch database (`pdp seed --users N`), then runs a real `pdp serve` with
PDP_SNAPSHOT_FILE pointing at a fresh temporary directory:
1. cold: no file yet, the replica loads from PostgreSQL; start -> /readyz 200;
2. SIGTERM: the clean shutdown writes the file (time to exit, file size);
3. `--changes` transactions are committed while the sidecar is down;
4. warm: the same command again, now with the file: restore, catch up; start -> ready;
5. after each warm start, the replica's digest of the tenant equals PostgreSQL's.
Steps 2-5 repeat `--runs` times; each number printed is one run.

    python loadtests/bench_snapshot_file.py --users 1000000

PDP_DATABASE_URL names the server (a scratch database is created on it and dropped
afterwards), default the local PostgreSQL on 127.0.0.1:5432. BENCH_PDP_LOG_LEVEL=INFO
shows the sidecars' own lines (how long the load from PostgreSQL or the file took).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import asyncpg

from loadtests.bench_sync import _free_port, prepare, scratch_database

TENANT = "tenant-1"
LOG_LEVEL = os.environ.get("BENCH_PDP_LOG_LEVEL", "WARNING")  # INFO: the sidecars' load lines
DIGEST = re.compile(r'^pdp_cache_consistent\{tenant="tenant-1"\} (\S+)$', re.MULTILINE)


async def _ready(base: str, proc: asyncio.subprocess.Process, started: float) -> float:
    """Seconds from `started` to the first /readyz 200 (polled every 20 ms)."""
    async with aiohttp.ClientSession() as http:
        deadline = started + 900
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"pdp serve exited with {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{base}/readyz") as resp:
                    if resp.status == 200:
                        return time.monotonic() - started
            await asyncio.sleep(0.02)
    raise RuntimeError("the sidecar did not become ready")


async def _serve(url: str, snapshot_file: Path | None) -> tuple[float, float]:
    """Start `pdp serve`, wait until ready, stop it; (start -> ready, SIGTERM -> exit)."""
    port = _free_port()
    env = {
        **os.environ,
        "PDP_DATABASE_URL": url,
        "PDP_PORT": str(port),
        "PDP_DEFAULT_TENANT": TENANT,
        "PDP_DRAIN_SECONDS": "0",
        "PDP_VERIFY_INTERVAL_SECONDS": "2",
        "PDP_LOG_LEVEL": LOG_LEVEL,
    }
    if snapshot_file is not None:
        env["PDP_SNAPSHOT_FILE"] = str(snapshot_file)
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "pdp", "serve", env=env)
    try:
        ready = await _ready(f"http://127.0.0.1:{port}", proc, started)
        await _equal(url, f"http://127.0.0.1:{port}")
    finally:
        stopping = time.monotonic()
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 300)
    return ready, time.monotonic() - stopping


async def _equal(url: str, base: str) -> None:
    """The sidecar's cache equals the database: the verifier's first pass says so."""
    del url  # the verifier inside the sidecar compares with PostgreSQL itself
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            async with http.get(f"{base}/metrics") as resp:
                match = DIGEST.search(await resp.text())
            if match:
                if float(match.group(1)) != 1.0:
                    raise RuntimeError("the sidecar's cache differs from PostgreSQL")
                return
            await asyncio.sleep(0.5)
    raise RuntimeError("the verifier did not report")


async def _write(url: str, changes: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        for i in range(changes):
            await conn.execute(
                "UPDATE pdp.users SET status = CASE status WHEN 'active' THEN 'disabled' "
                "ELSE 'active' END WHERE tenant_id = $1 AND id = $2",
                TENANT, f"user-{i * 7919 % 1000:06d}",
            )  # fmt: skip
    finally:
        await conn.close()


async def main(args: argparse.Namespace) -> None:
    server = os.environ.get("PDP_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    async with scratch_database(server) as url:
        began = time.monotonic()
        await prepare(url, args.users)
        print(f"seeded {args.users} users in {time.monotonic() - began:.0f} s", flush=True)
        with tempfile.TemporaryDirectory(prefix="pdp-bench-snap-") as tmp:
            path = Path(tmp) / "replica.pdpsnap"
            for run in range(args.runs):
                ready, _ = await _serve(url, None)
                print(f"run {run + 1}: without the file: start -> ready {ready:.2f} s", flush=True)
                path.unlink(missing_ok=True)
                ready, stop = await _serve(url, path)  # no file yet: writes one at exit
                size = path.stat().st_size
                print(
                    f"run {run + 1}: first start with PDP_SNAPSHOT_FILE (no file yet): "
                    f"start -> ready {ready:.2f} s; SIGTERM -> exit (writes the file) "
                    f"{stop:.2f} s; file {size / 1e6:.1f} MB",
                    flush=True,
                )
                await _write(url, args.changes)
                ready, stop = await _serve(url, path)
                print(
                    f"run {run + 1}: with the file ({args.changes} transactions while down): "
                    f"start -> ready {ready:.2f} s; SIGTERM -> exit {stop:.2f} s",
                    flush=True,
                )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--changes", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=1)
    asyncio.run(main(parser.parse_args()))
