"""Fleet benchmark (issue 14): PostgreSQL load of N sidecars, direct vs relay mode.

Unlike `bench_relay.py` (everything on one event loop, which was the bound from 40
sidecars on), every part runs in its own process:

- a PRIVATE PostgreSQL 15 cluster (initdb in a temp dir, Unix socket only,
  `max_connections` from `--max-connections`, stopped and deleted at the end): direct
  mode at 1,000 sidecars needs ~2,000 sessions, more than a shared server allows;
- a private redis-server (Unix socket);
- in relay mode one relay process (`sync.relay.Relay`, as `pdp relay` runs it);
- `--workers` sidecar processes, each running N/workers sidecars: a `SyncService`
  each (direct: a LISTEN session and a catch-up session) or a `RedisFollower` each
  (relay), every one with its own small replica of the seeded tenant;
- one writer process committing `--rate` changes/s (one user's status flipped per
  transaction); after each commit it publishes (xid, commit time) on a Redis channel,
  and every sidecar process times how long until that xid is visible in all of its
  replicas (what `X-PDP-Min-Revision` waits for).

Printed per mode and N, over the writer's `--seconds`: PostgreSQL sessions of the
database less the writer's and LISTEN sessions (pg_stat_activity, sampled mid-run), the transactions
per second PostgreSQL committed less the writer's (pg_stat_database.xact_commit:
catch-ups, polls and listener heartbeats, as PostgreSQL sees them), the catch-ups
per second the sidecars (or the relay) counted, the commits per second the writer
reached, and commit -> visible in EVERY sidecar p50/p99 (per commit, the slowest
sidecar process; commits never visible within 10 s are counted, not timed).

    python -m loadtests.bench_fleet --sidecars 1,10,100,1000 --rate 100 --seconds 20

Results go to `--json` (default loadtests/results/fleet.json) and a plot to `--plot`
(loadtests/results/fleet.png, needs matplotlib: `pip install -e '.[load]'`);
`--plot-only` redraws the plot from the JSON. `PDP_FLEET_PROFILE=DIR` writes a
cProfile of each sidecar process to DIR (where their CPU goes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from loadtests.bench_relay import flip_status, redis_server, supervised
from pdp.pg import migrate
from pdp.pg import seed as pg_seed
from pdp.pg.seed_data import SeedSpec, synthetic
from pdp.replica import Replica
from sync.options import RelayOptions, SyncOptions
from sync.redis_follower import RedisFollower
from sync.relay import Relay
from sync.service import SyncService

ROOT = Path(__file__).resolve().parent.parent
BIN = Path("/usr/lib/postgresql/15/bin")
CHANNEL = "pdp-bench:commits"
OPTIONS = SyncOptions(backoff_initial=0.05, backoff_max=0.5)
VISIBLE_WITHIN = 10.0  # a commit not visible everywhere this long after the writer stops
START_CHUNK = 25  # sidecars a worker process starts at once


# -- the private cluster -----------------------------------------------------------------


def _as_postgres(*args: str | Path) -> None:
    cmd = [str(a) for a in args]
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)


@contextlib.contextmanager
def private_cluster(max_connections: int) -> Any:
    """A fresh PostgreSQL 15 cluster on a private Unix socket; yields its URL."""
    root = Path(tempfile.mkdtemp(prefix="pdp-fleet-"))
    sockets, data = root / "sock", root / "data"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    options = (
        f"-c listen_addresses='' -k {sockets} -p 5432 -c max_connections={max_connections}"
        " -c shared_buffers=256MB -c shared_preload_libraries=pg_stat_statements"
    )
    _as_postgres(BIN / "initdb", "-D", data, "-U", "postgres", "--auth=trust")
    try:
        _as_postgres(
            BIN / "pg_ctl", "-D", data, "-l", root / "pg.log", "-w", "-o", options, "start"
        )
        try:
            yield f"postgresql://postgres@/postgres?host={sockets}&port=5432"
        finally:
            _as_postgres(BIN / "pg_ctl", "-D", data, "-m", "fast", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- child processes: a sidecar worker, the relay, the writer ---------------------------


def _emit(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _commands() -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        yield line.strip()


async def _start(
    stack: contextlib.AsyncExitStack, lifespans: list[Any]
) -> tuple[list[int], list[str]]:
    """Start sidecars START_CHUNK at a time; return those started, and the errors of the others."""
    started: list[int] = []
    errors: list[str] = []
    for i in range(0, len(lifespans), START_CHUNK):
        chunk = lifespans[i : i + START_CHUNK]
        stacks = [contextlib.AsyncExitStack() for _ in chunk]
        results = await asyncio.gather(
            *(
                s.enter_async_context(supervised("sync", ls))
                for s, ls in zip(stacks, chunk, strict=True)
            ),
            return_exceptions=True,
        )
        for j, (s, result) in enumerate(zip(stacks, results, strict=True)):
            if isinstance(result, BaseException):
                errors.append(f"{type(result).__name__}: {result}")
            else:
                started.append(i + j)
                stack.push_async_callback(s.aclose)
    return started, errors


async def worker(args: argparse.Namespace) -> None:
    """N sidecars in this process; times each published commit until all replicas have it."""
    t0 = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        replicas = [Replica() for _ in range(args.count)]
        services: list[SyncService] = []
        lifespans = []
        for replica in replicas:
            if args.mode == "direct":
                service = SyncService(args.url, replica, options=OPTIONS)
                services.append(service)
                lifespans.append(service.lifespan)
            else:
                follower = RedisFollower(
                    args.redis, args.url, replica, options=OPTIONS, stream=args.stream
                )
                lifespans.append(follower.lifespan)
        started, errors = await _start(stack, lifespans)
        replicas = [replicas[i] for i in started]
        async with asyncio.timeout(600):
            while not all(r.ready for r in replicas):  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # no event says "every replica loaded"
        bus = aioredis.from_url(args.redis)
        stack.push_async_callback(bus.aclose)
        pubsub = bus.pubsub()
        await pubsub.subscribe(CHANNEL)
        visible: dict[int, float] = {}
        probes: set[asyncio.Task[None]] = set()

        async def probe(xid: int) -> None:
            for r in replicas:
                if not await r.wait_for_revision(xid, 120):
                    return
            visible[xid] = time.time()

        async def listen() -> None:
            async for message in pubsub.listen():
                if message["type"] == "message":
                    task = asyncio.create_task(probe(int(message["data"])))
                    probes.add(task)
                    task.add_done_callback(probes.discard)

        listening = asyncio.create_task(listen())
        _emit({"ready": time.monotonic() - t0, "errors": errors})

        def catchups() -> int:
            return sum(s.sync.catchups for s in services)

        async for command in _commands():
            if command == "mark":
                _emit({"catchups": catchups()})
            elif command == "stop":
                counted = catchups()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(VISIBLE_WITHIN):
                        await asyncio.gather(*probes)
                listening.cancel()
                _emit({"catchups": counted, "visible": visible})
                break
        await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped


async def relay(args: argparse.Namespace) -> None:
    """The relay (leader at once: it is alone), reporting its catch-ups on demand."""
    r = Relay(args.url, args.redis, options=OPTIONS, relay_options=RelayOptions(stream=args.stream))
    async with supervised("relay", r.lifespan):
        async with asyncio.timeout(60):
            while r.published == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        _emit({"ready": True})
        async for command in _commands():
            _emit({"catchups": r.catchups})
            if command == "stop":
                break


async def writer(args: argparse.Namespace) -> None:
    """Commit `rate` changes/s for `seconds`; publish each commit's xid; print them all."""
    conn = await asyncpg.connect(args.url)
    bus = aioredis.from_url(args.redis)
    commits: list[tuple[int, float]] = []
    try:
        started = time.monotonic()
        t0 = time.time()
        n = 0
        while time.monotonic() - started < args.seconds:
            xid = await flip_status(conn, n)
            commits.append((xid, time.time()))
            await bus.publish(CHANNEL, str(xid))
            n += 1
            await asyncio.sleep(max(0.0, started + n / args.rate - time.monotonic()))
        _emit({"commits": commits, "seconds": time.time() - t0})
    finally:
        await bus.aclose()
        await conn.close()


# -- the orchestrator -----------------------------------------------------------------------


class Child:
    """A `python -m loadtests.bench_fleet ROLE ...` process spoken to by JSON lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, *args: str) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loadtests.bench_fleet", *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT,
            limit=64 * 1024 * 1024,
        )  # fmt: skip
        return cls(proc)

    async def read(self, within: float = 900) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), within)
        if not line:
            raise RuntimeError(f"child exited with {await self.proc.wait()}")
        return json.loads(line)  # type: ignore[no-any-return]

    async def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()
        return await self.read()

    async def close(self, grace: float) -> None:
        """Let a child that was told to stop exit by itself (`grace` s at most), else end it."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), grace)
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
        await self.proc.wait()


async def _pg_state(pg: asyncpg.Connection) -> dict[str, int]:
    await pg.execute("SELECT pg_stat_clear_snapshot()")
    rows = await pg.fetch(
        "SELECT coalesce(application_name, '') AS app, count(*) AS n FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() GROUP BY 1"
    )
    commits = await pg.fetchval(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
    )
    state = {f"app:{r['app']}": r["n"] for r in rows}
    state["sessions"] = sum(r["n"] for r in rows)
    state["xact_commit"] = commits
    return state


async def _statements(pg: asyncpg.Connection) -> dict[str, int]:
    """Calls per statement (pg_stat_statements), keyed by the statement's first 70 characters."""
    rows = await pg.fetch(
        "SELECT CASE WHEN query LIKE '%pdp.change_log%' AND query LIKE '%pg_snapshot%' "
        "THEN 'catch-up: ' ELSE '' END || left(regexp_replace(query, '\\s+', ' ', 'g'), 60) AS q, "
        "sum(calls)::bigint AS n "
        "FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database "
        "WHERE datname = current_database()) GROUP BY 1"
    )
    return {r["q"]: r["n"] for r in rows}


def _catchup_queries(calls: dict[str, int]) -> int:
    """The catch-up reads among `calls`: the one-statement fast path and the full read's."""
    return sum(n for q, n in calls.items() if q.startswith("catch-up: "))


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1000


async def case(
    url: str, redis_url: str, mode: str, n: int, args: argparse.Namespace
) -> dict[str, Any]:
    stream = f"pdp:fleet:{mode}:{n}"
    common = ["--url", url, "--redis", redis_url, "--stream", stream]
    children: list[Child] = []
    grace = 0.0
    pg = await asyncpg.connect(url)
    try:
        relay_child = None
        if mode == "relay":
            relay_child = await Child.start("relay", *common)
            children.append(relay_child)
            await relay_child.read(60)
        k = min(args.workers, n)
        workers = [
            await Child.start(
                "worker", *common, "--mode", mode, "--count", str(n // k + (i < n % k))
            )
            for i in range(k)
        ]
        children.extend(workers)
        t0 = time.monotonic()
        readies = await asyncio.gather(*(w.read() for w in workers))
        errors = [e for r in readies for e in r["errors"]]
        started = time.monotonic() - t0
        idle = await _pg_state(pg)
        marks = await asyncio.gather(
            *(c.ask("mark") for c in ([relay_child] if relay_child else workers))
        )
        before = await _pg_state(pg)
        calls_before = await _statements(pg)
        w = await Child.start(
            "writer", *common, "--rate", str(args.rate), "--seconds", str(args.seconds)
        )
        children.append(w)
        await asyncio.sleep(args.seconds / 2)
        mid = await _pg_state(pg)
        written = await w.read(args.seconds * 10 + 60)
        after = await _pg_state(pg)
        calls_after = await _statements(pg)
        ends = await asyncio.gather(
            *(c.ask("stop") for c in ([relay_child] if relay_child else []))
        )
        finals = await asyncio.gather(*(c.ask("stop") for c in workers))
        grace = 30.0  # every child was told to stop: let it leave cleanly
    finally:
        await pg.close()
        for c in reversed(children):
            await c.close(grace)
    commits = written["commits"]
    seconds = written["seconds"]
    counted = ends or finals
    catchups = sum(c["catchups"] for c in counted) - sum(m["catchups"] for m in marks)
    lags, lost = [], 0
    for xid, at in commits:
        seen = [f["visible"].get(str(xid)) for f in finals]
        if None in seen:
            lost += 1
        else:
            lags.append(max(seen) - at)
    calls = {q: n - calls_before.get(q, 0) for q, n in calls_after.items()}
    top = sorted(calls.items(), key=lambda item: -item[1])[:8]
    pg_xacts = after["xact_commit"] - before["xact_commit"] - len(commits) - 3  # less ours
    return {
        "mode": mode, "sidecars": n, "workers": k, "start_seconds": round(started, 1),
        "start_errors": len(errors), "first_errors": sorted(set(errors))[:3],
        "sessions_idle": idle["sessions"], "sessions": mid["sessions"] - 1,  # less the writer
        "listen_sessions": mid.get("app:pdp-listen", 0),
        "by_application": {a[4:]: v for a, v in mid.items() if a.startswith("app:")},
        "commits_per_s": round(len(commits) / seconds, 1),
        "pg_xacts_per_s": round(pg_xacts / seconds, 1),
        "catchups_per_s": round(catchups / seconds, 1),
        "catchup_queries_per_s": round(_catchup_queries(calls) / seconds, 1),
        "top_statements_per_s": {q: round(n / seconds, 1) for q, n in top},
        "visible_p50_ms": _pct(lags, 0.5), "visible_p99_ms": _pct(lags, 0.99),
        "not_visible": lost, "load_avg": os.getloadavg()[0],
    }  # fmt: skip


def _line(r: dict[str, Any]) -> str:
    p50, p99 = r["visible_p50_ms"], r["visible_p99_ms"]
    lag = f"p50 {p50:.0f} ms / p99 {p99:.0f} ms" if p99 is not None else "never"
    return (
        f"{r['mode']:6} N={r['sidecars']:5}: sessions {r['sessions']:5} (LISTEN "
        f"{r['listen_sessions']}), PostgreSQL xacts {r['pg_xacts_per_s']:8.1f}/s, catch-up "
        f"queries {r['catchup_queries_per_s']:8.1f}/s, catch-ups counted "
        f"{r['catchups_per_s']:8.1f}/s, writer {r['commits_per_s']:.0f} commits/s, visible in "
        f"every sidecar {lag} (not within {VISIBLE_WITHIN:.0f} s: {r['not_visible']}); started "
        f"in {r['start_seconds']} s, {r['start_errors']} start errors {r['first_errors']}; "
        f"load {r['load_avg']:.1f}"
    )


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 -- optional: the `load` extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (left, right, lag) = plt.subplots(1, 3, figsize=(15, 4.4))
    for mode, marker in (("direct", "o"), ("relay", "s")):
        rows = sorted((r for r in results if r["mode"] == mode), key=lambda r: r["sidecars"])
        if not rows:
            continue
        xs = [r["sidecars"] for r in rows]
        left.plot(xs, [r["sessions"] for r in rows], marker=marker, label=f"{mode}: all sessions")
        left.plot(xs, [r["listen_sessions"] for r in rows], marker=marker, linestyle="--",
                  label=f"{mode}: LISTEN sessions")  # fmt: skip
        seen = [r.get("catchup_queries_per_s", r["pg_xacts_per_s"]) for r in rows]
        right.plot(xs, seen, marker=marker,
                   label=f"{mode}: catch-up queries/s (pg_stat_statements)")  # fmt: skip
        right.plot(xs, [r["commits_per_s"] for r in rows], marker=marker, linestyle=":",
                   label=f"{mode}: commits/s the writer reached")  # fmt: skip
        timed = [r for r in rows if r["visible_p99_ms"] is not None]
        lag.plot([r["sidecars"] for r in timed], [r["visible_p99_ms"] for r in timed],
                 marker=marker, label=f"{mode}: p99")  # fmt: skip
        lag.plot([r["sidecars"] for r in timed], [r["visible_p50_ms"] for r in timed],
                 marker=marker, linestyle="--", label=f"{mode}: p50")  # fmt: skip
        for r in timed:
            late = f", {r['not_visible']} never" if r["not_visible"] else ""
            lag.annotate(f"{r['commits_per_s']:.0f}/s{late}", (r["sidecars"], r["visible_p99_ms"]),
                         fontsize=7, textcoords="offset points", xytext=(4, 4))  # fmt: skip
    titles = (
        (left, "PostgreSQL sessions"),
        (right, "PostgreSQL catch-ups per second"),
        (
            lag,
            "commit -> visible in every sidecar, ms\n(commits/s reached; never: not in 10 s)",
        ),
    )
    for ax, title in titles:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("simulated sidecars (separate processes)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        "pdp fleet, writer asked 100 commits/s, 2 shared cores: direct (LISTEN per sidecar) "
        "vs relay (Redis Stream)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _load(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text()) if path.exists() else []


def _save(path: Path, results: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps(results, indent=1) + "\n")


async def orchestrate(args: argparse.Namespace) -> None:
    out = Path(args.json)
    results = _load(out) if args.append else []
    with private_cluster(args.max_connections) as server:
        async with redis_server() as redis_url:
            admin = await asyncpg.connect(server)
            await admin.execute("CREATE DATABASE fleet")
            await admin.close()
            url = server.replace("/postgres?", "/fleet?")
            ext = await asyncpg.connect(url)
            await ext.execute("CREATE EXTENSION pg_stat_statements")
            await ext.close()
            await migrate.upgrade(url)
            spec = SeedSpec(tenants=1, users=args.users, roles=20, seed=7)
            await pg_seed.load(url, synthetic(spec))
            for n in (int(x) for x in args.sidecars.split(",")):
                for mode in args.modes.split(","):
                    try:
                        r = await case(url, redis_url, mode, n, args)
                    except Exception as exc:  # report it and go on with the next case
                        print(f"{mode:6} N={n:5}: FAILED {type(exc).__name__}: {exc}", flush=True)
                        continue
                    print(_line(r), flush=True)
                    results = [x for x in results if (x["mode"], x["sidecars"]) != (mode, n)]
                    results.append(r)
                    _save(out, results)
    if args.plot:
        plot(results, Path(args.plot))


def _raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="role")
    for role in ("worker", "relay", "writer"):
        p = sub.add_parser(role)
        p.add_argument("--url", required=True)
        p.add_argument("--redis", required=True)
        p.add_argument("--stream", required=True)
        p.add_argument("--mode", default="direct")
        p.add_argument("--count", type=int, default=1)
        p.add_argument("--rate", type=float, default=100.0)
        p.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--sidecars", default="1,10,100,1000")
    parser.add_argument("--modes", default="direct,relay")
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=4, help="sidecar processes")
    parser.add_argument("--users", type=int, default=1000, help="users of the seeded tenant")
    parser.add_argument("--max-connections", type=int, default=2300)
    parser.add_argument("--json", default=str(ROOT / "loadtests/results/fleet.json"))
    parser.add_argument("--plot", default=str(ROOT / "loadtests/results/fleet.png"))
    parser.add_argument("--append", action="store_true", help="keep other cases of --json")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    _raise_fd_limit()
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    if args.role is None and args.plot_only:
        plot(json.loads(Path(args.json).read_text()), Path(args.plot))
        return
    body = {"worker": worker, "relay": relay, "writer": writer}.get(args.role, orchestrate)
    profile_dir = os.environ.get("PDP_FLEET_PROFILE")  # cProfile each sidecar process
    if args.role == "worker" and profile_dir:
        import cProfile  # noqa: PLC0415

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            _run(body, args)
        finally:
            profiler.disable()
            profiler.dump_stats(f"{profile_dir}/worker-{os.getpid()}.prof")
        return
    _run(body, args)


def _run(body: Any, args: argparse.Namespace) -> None:
    try:
        import uvloop  # noqa: PLC0415 -- as `pdp serve`: the `fast` extra when installed
    except ImportError:
        asyncio.run(body(args))
    else:
        uvloop.run(body(args))


if __name__ == "__main__":
    main()
