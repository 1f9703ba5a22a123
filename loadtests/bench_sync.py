"""Commit-to-visible latency and check throughput while syncing (issue 4 benchmark).

Runs a real `pdp serve` against a seeded database, then:
1. idle throughput: wrk on /access/v1/evaluation for `--wrk-seconds`;
2. writes: `--writers` connections commit `--rate` changes/s in total; every change
   flips one user's permission. Right after each commit the writer asks the
   sidecar for the new decision, measuring commit -> correct answer two ways:
     - `poll`:         plain requests repeated until the decision flips;
     - `min-revision`: one request carrying X-PDP-Min-Revision (answered as soon as
                       the sidecar's snapshot covers the commit);
   and wrk runs again during the writes for the "throughput while syncing" ratio;
3. catch-up cost per change, from the sidecar's own metrics.

    python loadtests/bench_sync.py --users 100000 --rate 1000 --seconds 20

PDP_DATABASE_URL names the server (a scratch database is created on it and dropped
afterwards), default the local PostgreSQL on 127.0.0.1:5432.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
TENANT = "tenant-1"
ROLE = "bench-toggle"
PERMISSION = ("benchdoc", "flip")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def _pdp(*args: str, env: dict[str, str]) -> None:
    subprocess.run(
        [sys.executable, "-m", "pdp", *args], env=env, check=True, stdout=subprocess.DEVNULL
    )


@contextlib.asynccontextmanager
async def scratch_database(server_url: str) -> AsyncIterator[str]:
    name = f"pdp_bench_sync_{uuid.uuid4().hex[:8]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(server_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    await admin(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(server_url, name)
    finally:
        await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def sidecar(url: str, port: int) -> AsyncIterator[str]:
    env = {
        **os.environ,
        "PDP_DATABASE_URL": url,
        "PDP_PORT": str(port),
        "PDP_DEFAULT_TENANT": TENANT,
        "PDP_LOG_LEVEL": "WARNING",
    }
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "pdp", "serve", env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{base}/readyz") as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.2)
            else:
                raise RuntimeError("sidecar did not become ready")
        yield base
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


async def prepare(url: str, users: int) -> None:
    env = {**os.environ, "PDP_DATABASE_URL": url}
    await asyncio.to_thread(_pdp, "migrate", env=env)
    await asyncio.to_thread(_pdp, "seed", "--users", str(users), env=env)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("INSERT INTO pdp.roles (tenant_id, id) VALUES ($1, $2)", TENANT, ROLE)
        await conn.execute(
            "INSERT INTO pdp.role_permissions VALUES ($1, $2, $3)",
            TENANT,
            ROLE,
            ":".join(PERMISSION),
        )
        # Users whose only grant is the one the writers flip (seeded users may be
        # disabled or hold a superuser role, and then a flip changes no decision).
        await conn.execute(
            "INSERT INTO pdp.users (tenant_id, id) "
            "SELECT $1, 'flip-' || lpad(g::text, 4, '0') FROM generate_series(0, 999) g",
            TENANT,
        )
    finally:
        await conn.close()


def _body(user: str) -> bytes:
    return json.dumps(
        {
            "subject": {"type": "user", "id": user},
            "action": {"name": PERMISSION[1]},
            "resource": {"type": PERMISSION[0], "id": "x"},
        }
    ).encode()


async def _decision(
    http: aiohttp.ClientSession, base: str, user: str, min_revision: int | None = None
) -> tuple[bool, str]:
    headers = {"Content-Type": "application/json"}
    if min_revision is not None:
        headers["X-PDP-Min-Revision"] = str(min_revision)
    async with http.post(f"{base}/access/v1/evaluation", data=_body(user), headers=headers) as r:
        answer = await r.json()
    return bool(answer["decision"]), str(answer.get("context", {}).get("revision", ""))


async def writer(
    index: int,
    url: str,
    base: str,
    rate: float,
    until: float,
    results: dict[str, list[float]],
    sample: int,
) -> None:
    """Flip grants of this writer's own users at `rate` commits/s; time a sample of flips."""
    conn = await asyncpg.connect(url)
    granted: set[str] = set()
    period = 1.0 / rate
    n = 0
    probes: list[asyncio.Task[None]] = []
    async with aiohttp.ClientSession() as http:
        next_at = time.monotonic()
        while time.monotonic() < until:
            user = f"flip-{(index * 997 + n * 8) % 1000:04d}"
            n += 1
            grant = user not in granted
            async with conn.transaction():
                xid = int(await conn.fetchval("SELECT pg_current_xact_id()::text::bigint"))
                if grant:
                    await conn.execute(
                        "INSERT INTO pdp.user_roles (tenant_id, user_id, role_id) "
                        "VALUES ($1, $2, $3)",
                        TENANT,
                        user,
                        ROLE,
                    )
                else:
                    await conn.execute(
                        "DELETE FROM pdp.user_roles "
                        "WHERE tenant_id = $1 AND user_id = $2 AND role_id = $3",
                        TENANT,
                        user,
                        ROLE,
                    )
            committed = time.monotonic()
            results["commits"].append(committed)
            granted.symmetric_difference_update({user})
            # Measured off the writer's schedule, so the commit rate stays as asked;
            # one change in `sample` each way, so that the measuring requests (a poll
            # is several) do not become a load of their own on the sidecar.
            if n % sample in (0, 1):
                xid_or_poll = xid if n % sample == 0 else None
                probes.append(
                    asyncio.create_task(
                        measure(http, base, user, grant, xid_or_poll, committed, results)
                    )
                )
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await asyncio.gather(*probes)
    await conn.close()


async def measure(
    http: aiohttp.ClientSession,
    base: str,
    user: str,
    grant: bool,
    xid: int | None,
    committed: float,
    results: dict[str, list[float]],
) -> None:
    """Commit -> correct answer: by polling (xid None) or with X-PDP-Min-Revision."""
    if xid is None:
        while (await _decision(http, base, user))[0] != grant:
            if time.monotonic() - committed > 10:
                results["poll_timeouts"].append(1.0)
                return
        results["poll"].append(time.monotonic() - committed)
        return
    decision, revision = await _decision(http, base, user, xid)
    results["min-revision"].append(time.monotonic() - committed)
    if decision != grant:
        results["wrong"].append(1.0)
    if revision == "sql":
        results["fallback"].append(1.0)


def wrk(base: str, seconds: int, users: int) -> float:
    """Requests/s of wrk against the evaluation endpoint."""
    script = Path(tempfile.mkdtemp()) / "post.lua"
    bodies = ",".join(
        "'" + _body(f"user-{1 + (i * 7919) % users:06d}").decode() + "'" for i in range(200)
    )
    script.write_text(
        f"local bodies = {{{bodies}}}\nlocal i = 0\n"
        "wrk.method = 'POST'\nwrk.headers['Content-Type'] = 'application/json'\n"
        "request = function()\n  i = i % #bodies + 1\n"
        "  return wrk.format(nil, '/access/v1/evaluation', nil, bodies[i])\nend\n"
    )
    out = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{seconds}s", "-s", str(script), f"{base}/access/v1/evaluation"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return float(match.group(1)) if match else 0.0


async def metric(http: aiohttp.ClientSession, base: str, name: str) -> float:
    async with http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


PHASES = ("notify", "wait", "read", "apply")
_BUCKET = re.compile(r'pdp_sync_phase_seconds_bucket\{le="([^"]+)",phase="([^"]+)"\} (\S+)')
_PHASE_SUM = re.compile(r'pdp_sync_phase_seconds_(sum|count)\{phase="([^"]+)"\} (\S+)')


async def phases(http: aiohttp.ClientSession, base: str) -> dict[str, dict[str, float]]:
    """The sidecar's pdp_sync_phase_seconds: per phase its sum, count and buckets."""
    async with http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    found: dict[str, dict[str, float]] = {p: {} for p in PHASES}
    for le, phase, value in _BUCKET.findall(text):
        found.setdefault(phase, {})[le] = float(value)
    for kind, phase, value in _PHASE_SUM.findall(text):
        found.setdefault(phase, {})[kind] = float(value)
    return found


def phase_report(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> str:
    """Mean and bucket-bound p99 of each phase over the run (the difference of two scrapes)."""
    parts = []
    for phase in PHASES:
        a, b = after.get(phase, {}), before.get(phase, {})
        count = a.get("count", 0.0) - b.get("count", 0.0)
        if count <= 0:
            parts.append(f"{phase}: none")
            continue
        mean = (a.get("sum", 0.0) - b.get("sum", 0.0)) / count
        bounds = sorted((float(le), le) for le in a if le not in {"sum", "count", "+Inf"})
        p99 = next(
            (f"<= {v * 1000:g} ms" for v, le in bounds if a[le] - b.get(le, 0.0) >= 0.99 * count),
            "> the last bucket",
        )
        parts.append(f"{phase}: n={count:.0f} mean={mean * 1000:.2f} ms p99 {p99}")
    return "; ".join(parts)


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def main(args: argparse.Namespace) -> None:
    server = os.environ.get("PDP_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    async with scratch_database(server) as url:
        print(f"seeding {args.users} users ...", flush=True)
        await prepare(url, args.users)
        async with sidecar(url, _free_port()) as base:
            idle = await asyncio.to_thread(wrk, base, args.wrk_seconds, args.users)
            async with aiohttp.ClientSession() as http:
                before = {
                    n: await metric(http, base, n)
                    for n in (
                        "pdp_sync_changes_applied_total",
                        "pdp_sync_catchups_total",
                        "pdp_sync_catchup_seconds_sum",
                    )
                }
                phases_before = await phases(http, base)
                results: dict[str, list[float]] = {
                    k: []
                    for k in (
                        "poll",
                        "min-revision",
                        "wrong",
                        "fallback",
                        "poll_timeouts",
                        "commits",
                    )
                }
                until = time.monotonic() + args.seconds
                writers = [
                    asyncio.create_task(
                        writer(i, url, base, args.rate / args.writers, until, results, args.sample)
                    )
                    for i in range(args.writers)
                ]
                await asyncio.sleep(max(0, (args.seconds - args.wrk_seconds) / 2))
                busy = await asyncio.to_thread(wrk, base, args.wrk_seconds, args.users)
                await asyncio.gather(*writers)
                after = {n: await metric(http, base, n) for n in before}
                phases_after = await phases(http, base)
    commits = len(results["commits"])
    changes = after["pdp_sync_changes_applied_total"] - before["pdp_sync_changes_applied_total"]
    catchups = after["pdp_sync_catchups_total"] - before["pdp_sync_catchups_total"]
    catchup_s = after["pdp_sync_catchup_seconds_sum"] - before["pdp_sync_catchup_seconds_sum"]
    print(
        f"commits: {commits} in {args.seconds}s ({commits / args.seconds:.0f}/s) "
        f"by {args.writers} writers; catch-ups: {catchups:.0f}; rows applied: {changes:.0f}"
    )
    for kind in ("poll", "min-revision"):
        v = results[kind]
        print(
            f"commit-to-visible [{kind}]: n={len(v)} p50={_pct(v, 50) * 1000:.1f} ms "
            f"p99={_pct(v, 99) * 1000:.1f} ms max={max(v, default=0) * 1000:.1f} ms "
            f"mean={statistics.fmean(v) * 1000 if v else 0:.1f} ms"
        )
    print(
        f"wrong answers: {len(results['wrong'])}, SQL fallbacks: {len(results['fallback'])}, "
        f"poll timeouts: {len(results['poll_timeouts'])}"
    )
    if changes and catchup_s:
        print(
            f"catch-up cost: {catchup_s / max(catchups, 1) * 1000:.2f} ms per catch-up, "
            f"{catchup_s / changes * 1e6:.0f} us per applied change"
        )
    print(f"where propagation goes: {phase_report(phases_before, phases_after)}")
    print(
        f"check throughput: idle {idle:.0f} req/s, while syncing {busy:.0f} req/s, "
        f"ratio {busy / idle if idle else 0:.2f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=1000.0, help="commits/s in total")
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--wrk-seconds", type=int, default=8)
    parser.add_argument(
        "--sample",
        type=int,
        default=10,
        help="measure 1 change in N by polling and 1 in N with X-PDP-Min-Revision (default 10)",
    )
    asyncio.run(main(parser.parse_args()))
