"""Commit-to-visible latency and check throughput while syncing (issue 4 benchmark).

Runs a real `pdp serve` against a seeded database, then:
1. idle throughput: wrk on /access/v1/evaluation for `--wrk-seconds`;
2. writes: `--writers` connections commit `--rate` changes/s in total; every change
   flips one user's permission. Right after each commit the writer asks the
   sidecar for the new decision, measuring commit -> correct answer two ways, and a
   baseline:
     - `poll`:         plain requests repeated until the decision flips;
     - `min-revision`: one request carrying X-PDP-Min-Revision (answered as soon as
                       the sidecar's snapshot covers the commit);
     - `request`:      one plain request whatever its answer: the measuring path alone
                       (a task on the writers' busy event loop, a round trip);
   and wrk runs again during the writes for the "throughput while syncing" ratio;
3. catch-up cost per change, from the sidecar's own metrics;
4. the same split by whether wrk was running: commit -> answer percentiles, catch-ups/s,
   the phase breakdown (`pdp_sync_phase_seconds`) and CPU seconds per second of the
   sidecar and of its catch-up connection's PostgreSQL backend, for the writes alone and
   for the writes while wrk saturates the cores.

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
from dataclasses import dataclass
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
    async with sidecar_process(url, port) as (base, _pid):
        yield base


@contextlib.asynccontextmanager
async def sidecar_process(url: str, port: int) -> AsyncIterator[tuple[str, int]]:
    """(base URL, pid) of a ready `pdp serve`."""
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
        yield base, proc.pid
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
    *,
    synchronous_commit: str = "on",
) -> None:
    """Flip grants of this writer's own users at `rate` commits/s; time a sample of flips.

    `synchronous_commit` "off" lets a machine whose WAL flushes are slow (a shared disk)
    still commit the asked rate; what a sidecar sees of a commit does not change.
    """
    conn = await asyncpg.connect(url, server_settings={"synchronous_commit": synchronous_commit})
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
            elif n % sample == 2 and "request" in results:
                probes.append(asyncio.create_task(round_trip(http, base, user, committed, results)))
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await asyncio.gather(*probes)
    await conn.close()


async def round_trip(
    http: aiohttp.ClientSession,
    base: str,
    user: str,
    committed: float,
    results: dict[str, list[float]],
) -> None:
    """Commit -> any answer (one request, whatever the decision): the measuring path
    alone (a task on this busy event loop, one HTTP round trip), no sync in it."""
    await _decision(http, base, user)
    results["request"].append(time.monotonic() - committed)
    results["request_at"].append(committed)


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
        results.setdefault("poll_at", []).append(committed)
        return
    decision, revision = await _decision(http, base, user, xid)
    results["min-revision"].append(time.monotonic() - committed)
    results.setdefault("min-revision_at", []).append(committed)
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


COUNTERS = (
    "pdp_sync_changes_applied_total",
    "pdp_sync_catchups_total",
    "pdp_sync_catchup_seconds_sum",
)
PHASES = ("notify", "wait", "read", "apply")
_BUCKET = re.compile(r'pdp_sync_phase_seconds_bucket\{le="([^"]+)",phase="([^"]+)"\} (\S+)')
_PHASE_SUM = re.compile(r'pdp_sync_phase_seconds_(sum|count)\{phase="([^"]+)"\} (\S+)')
SYNC_BACKEND = (
    "SELECT pid FROM pg_stat_activity "
    "WHERE application_name = 'pdp-sync' AND datname = current_database()"
)


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process on this host (0 when it is gone)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Scrape:
    """At one moment: the sidecar's sync counters (by name), phase histograms (as
    `phase:{phase}:{sum|count|le}`) and CPU seconds (`cpu:sidecar`, `cpu:backend`: the
    sidecar's catch-up connection's PostgreSQL backend)."""

    at: float
    values: dict[str, float]


async def scrape(http: aiohttp.ClientSession, base: str, pid: int, backend: int | None) -> Scrape:
    async with http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    values = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in COUNTERS:
            values[name] += float(line.rsplit(" ", 1)[1])
    for le, phase, value in _BUCKET.findall(text):
        values[f"phase:{phase}:{le}"] = float(value)
    for kind, phase, value in _PHASE_SUM.findall(text):
        values[f"phase:{phase}:{kind}"] = float(value)
    values["cpu:sidecar"] = cpu_seconds(pid)
    values["cpu:backend"] = cpu_seconds(backend)
    return Scrape(time.monotonic(), values)


Spans = list[tuple[Scrape, Scrape]]


def _delta(spans: Spans, key: str) -> float:
    """How much `key` grew over the spans (`at`: their seconds)."""
    if key == "at":
        return sum(b.at - a.at for a, b in spans)
    return sum(b.values.get(key, 0.0) - a.values.get(key, 0.0) for a, b in spans)


def phase_report(spans: Spans) -> str:
    """Mean and bucket-bound p99 of each phase over the spans (differences of scrapes)."""
    parts = []
    for phase in PHASES:
        count = _delta(spans, f"phase:{phase}:count")
        if count <= 0:
            parts.append(f"{phase}: none")
            continue
        mean = _delta(spans, f"phase:{phase}:sum") / count
        prefix = f"phase:{phase}:"
        bounds = sorted(
            (float(key[len(prefix) :]), key)
            for key in spans[0][1].values
            if key.startswith(prefix) and key[len(prefix)].isdigit()
        )
        p99 = next(
            (f"<= {v * 1000:g} ms" for v, key in bounds if _delta(spans, key) >= 0.99 * count),
            "> the last bucket",
        )
        parts.append(f"{phase}: n={count:.0f} mean={mean * 1000:.2f} ms p99 {p99}")
    return "; ".join(parts)


def span_report(label: str, spans: Spans, results: dict[str, list[float]]) -> None:
    """Propagation, catch-ups and CPU over the spans (writes with or without wrk)."""
    seconds = _delta(spans, "at")
    commits = sum(1 for t in results["commits"] if any(a.at <= t < b.at for a, b in spans))
    catchups = _delta(spans, "pdp_sync_catchups_total")
    changes = _delta(spans, "pdp_sync_changes_applied_total")
    catchup_s = _delta(spans, "pdp_sync_catchup_seconds_sum")
    print(
        f"[{label}] {seconds:.1f} s, {commits / seconds:.0f} commits/s, "
        f"{catchups / seconds:.0f} catch-ups/s ({changes / max(catchups, 1):.1f} changes and "
        f"{catchup_s / max(catchups, 1) * 1000:.2f} ms each); CPU: sidecar "
        f"{_delta(spans, 'cpu:sidecar') / seconds:.2f} s/s, its catch-up backend "
        f"{_delta(spans, 'cpu:backend') / seconds:.2f} s/s"
    )
    for kind in ("poll", "min-revision", "request"):
        v = [
            latency
            for latency, t in zip(results[kind], results[f"{kind}_at"], strict=True)
            if any(a.at <= t < b.at for a, b in spans)
        ]
        what = "commit-to-any-answer" if kind == "request" else "commit-to-visible"
        print(
            f"[{label}] {what} [{kind}]: n={len(v)} p50={_pct(v, 50) * 1000:.1f} ms "
            f"p99={_pct(v, 99) * 1000:.1f} ms max={max(v, default=0) * 1000:.1f} ms"
        )
    print(f"[{label}] where propagation goes: {phase_report(spans)}")


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def _backend_pid(url: str) -> int | None:
    conn = await asyncpg.connect(url)
    try:
        pid = await conn.fetchval(SYNC_BACKEND)
    finally:
        await conn.close()
    return None if pid is None else int(pid)


def _loadavg() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


async def main(args: argparse.Namespace) -> None:
    server = os.environ.get("PDP_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    async with scratch_database(server) as url:
        print(f"seeding {args.users} users ...", flush=True)
        await prepare(url, args.users)
        async with sidecar_process(url, _free_port()) as (base, pid):
            print(f"load average (1/5/15 min) before the writes: {_loadavg()}", flush=True)
            idle = await asyncio.to_thread(wrk, base, args.wrk_seconds, args.users)
            backend = await _backend_pid(url)
            async with aiohttp.ClientSession() as http:
                results: dict[str, list[float]] = {
                    k: []
                    for k in (
                        "poll",
                        "min-revision",
                        "poll_at",
                        "min-revision_at",
                        "request",
                        "request_at",
                        "wrong",
                        "fallback",
                        "poll_timeouts",
                        "commits",
                    )
                }
                marks = [await scrape(http, base, pid, backend)]
                until = time.monotonic() + args.seconds
                writers = [
                    asyncio.create_task(
                        writer(
                            i,
                            url,
                            base,
                            args.rate / args.writers,
                            until,
                            results,
                            args.sample,
                            synchronous_commit=args.synchronous_commit,
                        )
                    )
                    for i in range(args.writers)
                ]
                await asyncio.sleep(max(0, (args.seconds - args.wrk_seconds) / 2))
                marks.append(await scrape(http, base, pid, backend))
                busy = await asyncio.to_thread(wrk, base, args.wrk_seconds, args.users)
                marks.append(await scrape(http, base, pid, backend))
                await asyncio.sleep(max(0.0, until - time.monotonic()))
                marks.append(await scrape(http, base, pid, backend))
                await asyncio.gather(*writers)
            print(f"load average (1/5/15 min) after the writes: {_loadavg()}")
    everything, quiet, loaded = (
        [(marks[0], marks[3])],
        [(marks[0], marks[1]), (marks[2], marks[3])],
        [(marks[1], marks[2])],
    )
    commits = len(results["commits"])
    changes = _delta(everything, "pdp_sync_changes_applied_total")
    catchups = _delta(everything, "pdp_sync_catchups_total")
    catchup_s = _delta(everything, "pdp_sync_catchup_seconds_sum")
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
    print(f"where propagation goes: {phase_report(everything)}")
    print(
        f"check throughput: idle {idle:.0f} req/s, while syncing {busy:.0f} req/s, "
        f"ratio {busy / idle if idle else 0:.2f}"
    )
    # The sync target is about sync; while wrk saturates the cores the tail is CPU
    # contention. So the writes without wrk and the writes during it, apart.
    span_report("writes alone", quiet, results)
    span_report("writes + wrk", loaded, results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=1000.0, help="commits/s in total")
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--wrk-seconds", type=int, default=8)
    parser.add_argument(
        "--synchronous-commit",
        choices=("on", "off"),
        default="on",
        help="the writers' synchronous_commit: off when slow WAL flushes cap the commit rate",
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=10,
        help="measure 1 change in N by polling, 1 in N with X-PDP-Min-Revision, and 1 in N "
        "by one plain request (the measuring path alone, no sync in it) (default 10)",
    )
    asyncio.run(main(parser.parse_args()))
