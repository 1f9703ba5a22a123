"""Decision-log benchmark: /access/v1/evaluation with decision logging off vs 100% to PostgreSQL.

    .venv/bin/python loadtests/bench_decision_log.py [--database-url URL] [--users 100000]
        [--duration 15] [--rounds 3] [--connections 64] [--no-uvloop]

Two pdp servers (processes, as `loadtests/bench_http.py` builds them: a Replica loaded
from the synthetic dataset, no sync worker) run side by side, one with decision logging
off, one with PDP_DECISION_LOG=postgres at sample 1 (every decision a row) and its
writer under a Supervisor, COPYing into a scratch database migrated for the run (created
on the server of `--database-url` / PDP_DATABASE_URL, dropped afterwards). wrk (1
thread) drives them in alternating rounds; medians are reported, with the ratio
logged / off (the target is >= 0.8). Then the rows the logged server wrote, the ones it
dropped (pdp_decision_log_dropped_total), and the raw rate of the PostgreSQL writer:
`--rows` entries through `sync.pg_decision_log` in batches of `--batch-size`.

PostgreSQL shares the machine: its COPY work competes with pdp and wrk for the CPUs, as
it would next to a sidecar on one host.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a script: make `loadtests` importable

from loadtests import bench_http  # noqa: E402 -- after the path is set

EVALUATION = bench_http.EVALUATION


# --- the pdp server process --------------------------------------------------------


async def _serve(users: int, workdir: Path, url: str | None) -> None:
    from aiohttp import web  # noqa: PLC0415 -- server process only
    from prometheus_client import CollectorRegistry  # noqa: PLC0415 -- server process only

    from pdp.config import Settings  # noqa: PLC0415 -- server process only
    from pdp.decision_log import DecisionLog  # noqa: PLC0415 -- server process only
    from pdp.engine import Engine, Snapshot  # noqa: PLC0415 -- server process only
    from pdp.metrics import Metrics  # noqa: PLC0415 -- server process only
    from pdp.replica import Replica  # noqa: PLC0415 -- server process only
    from pdp.supervisor import Supervisor  # noqa: PLC0415 -- server process only
    from pdp.web.app import build_app  # noqa: PLC0415 -- server process only
    from sync.pg_decision_log import PgDecisionLog  # noqa: PLC0415 -- server process only

    engine = Engine.build(bench_http._engine_rows(users), Snapshot(1, 1))
    replica = Replica(clock=time.monotonic)
    replica.install(engine, epoch="bench", synced_at=time.monotonic())
    settings = Settings(default_tenant=bench_http.TENANT, max_staleness_seconds=1e9)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    supervisor = Supervisor(metrics)
    decision_log = None
    if url is not None:
        decision_log = DecisionLog.from_settings(settings, metrics)
        sink = PgDecisionLog(url, settings.decision_log_retention_seconds)
        supervisor.add("decision_log", decision_log.lifespan(sink.opened))
    app = build_app(
        settings, replica=replica, registry=registry, metrics=metrics, decision_log=decision_log
    )
    singles, _ = bench_http._bodies(users, 2000, 1)
    (workdir / "single.jsonl").write_text("\n".join(singles) + "\n")
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    async with supervisor.running():
        print(f"INFO decision log {'postgres' if url else 'off'}", flush=True)
        print(f"PORT {runner.addresses[0][1]}", flush=True)
        await asyncio.Event().wait()


# --- the database ----------------------------------------------------------------


async def _create_db(admin_url: str) -> str:
    import asyncpg  # noqa: PLC0415

    from pdp.pg import migrate  # noqa: PLC0415

    name = f"pdp_bench_dl_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    await migrate.upgrade(url)
    return url


async def _drop_db(admin_url: str, url: str) -> None:
    import asyncpg  # noqa: PLC0415

    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")
    finally:
        await conn.close()


async def _count(url: str) -> int:
    import asyncpg  # noqa: PLC0415

    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM pdp.decision_log"))
    finally:
        await conn.close()


async def _writer_rate(url: str, rows: int, batch_size: int) -> float:
    """Rows/s of the PostgreSQL writer alone: `rows` entries COPYed in batches."""
    from pdp.decision_log import Entry  # noqa: PLC0415
    from sync.pg_decision_log import PgDecisionLog  # noqa: PLC0415

    now = time.time()
    entries: list[Entry] = [
        (f"bench{i:012x}", now, "evaluation", bench_http.TENANT, "user", f"user-{i % 1000}",
         "read", "document", str(i % 5000), i % 3 != 0, "granted" if i % 3 else "no_grant",
         "1:1:", 0.00012)
        for i in range(rows)
    ]  # fmt: skip
    async with PgDecisionLog(url, 30 * 86400.0).opened() as sink:
        started = time.perf_counter()
        for start in range(0, rows, batch_size):
            await sink.write(entries[start : start + batch_size])
        return rows / (time.perf_counter() - started)


def _dropped(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith("pdp_decision_log_dropped_total "):
            return float(line.split()[1])
    return 0.0


# --- the orchestrating parent ------------------------------------------------------


def orchestrate(args: argparse.Namespace) -> None:
    admin_url = args.database_url or os.environ.get("PDP_DATABASE_URL")
    if not admin_url:
        sys.exit("give --database-url or PDP_DATABASE_URL (a server to create a scratch db on)")
    server_cpus, wrk_cpus = bench_http._cpus()
    loop_flag = ["--no-uvloop"] if args.no_uvloop else []
    me = [sys.executable, str(Path(__file__).resolve())]
    print(f"python {sys.version.split()[0]}  users={args.users}  connections={args.connections}"
          f"  duration={args.duration}s x {args.rounds} rounds  uvloop={not args.no_uvloop}  "
          f"server cpu {sorted(server_cpus)}, wrk cpu {sorted(wrk_cpus)}")  # fmt: skip
    url = asyncio.run(_create_db(admin_url))
    try:
        with tempfile.TemporaryDirectory(prefix="pdp-bench-dl-") as tmp:
            off_dir, on_dir = Path(tmp, "off"), Path(tmp, "on")
            off_dir.mkdir()
            on_dir.mkdir()
            common = ["--serve", "--users", str(args.users), *loop_flag]
            off, off_port, _ = bench_http._start(
                [*me, *common, "--workdir", str(off_dir)], server_cpus
            )
            on, on_port, _ = bench_http._start(
                [*me, *common, "--workdir", str(on_dir), "--log-url", url], server_cpus
            )
            try:
                offs, ons = [], []
                for _ in range(args.rounds):
                    offs.append(
                        bench_http._measure(off_port, EVALUATION, off_dir / "single.jsonl", args)
                    )
                    ons.append(
                        bench_http._measure(on_port, EVALUATION, on_dir / "single.jsonl", args)
                    )
                dropped = _dropped(on_port)
                sent = sum(r.requests for r in ons)
                # The writer drains what is still buffered (a bound, then read what arrived).
                rows = asyncio.run(_settled_count(url))
            finally:
                for proc in (off, on):
                    proc.kill()
                    proc.wait()
        rate = asyncio.run(_writer_rate(url, args.rows, args.batch_size))
    finally:
        asyncio.run(_drop_db(admin_url, url))
    report(args, offs, ons, sent, rows, dropped, rate)


async def _settled_count(url: str, within: float = 30.0) -> int:
    """Rows written once the count stops growing (the writer drained), at most `within` s."""
    deadline, last = time.monotonic() + within, -1
    while time.monotonic() < deadline:
        count = await _count(url)
        if count == last:
            return count
        last = count
        await asyncio.sleep(0.5)
    return last


def report(
    args: argparse.Namespace,
    offs: list[bench_http.Result],
    ons: list[bench_http.Result],
    sent: int,
    rows: int,
    dropped: float,
    rate: float,
) -> None:
    off, on = bench_http._median(offs), bench_http._median(ons)
    print(bench_http._line("decision log off", off))
    print(bench_http._line("decision log postgres 100%", on))
    ratios = ", ".join(f"{n.rps / f.rps:.2f}" for f, n in zip(offs, ons, strict=True))
    print(
        f"{'ratio postgres / off':<28}{on.rps / off.rps:>9.2f}   "
        f"(per round: {ratios}; target >= 0.8)"
    )
    print(f"logged server: {sent:,} requests measured (plus warm-ups), {rows:,} rows in "
          f"pdp.decision_log, {dropped:,.0f} dropped (queue full)")  # fmt: skip
    print(f"PostgreSQL writer alone: {rate:,.0f} rows/s ({args.rows:,} rows, COPY batches of "
          f"{args.batch_size})")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url")
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=200_000, help="entries of the writer-alone run")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--log-url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.serve:
        orchestrate(args)
        return
    from loadtests.bare_app import run_loop  # noqa: PLC0415 -- server process only

    run_loop(_serve(args.users, args.workdir, args.log_url), uvloop=not args.no_uvloop)


if __name__ == "__main__":
    main()
