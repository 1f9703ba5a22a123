"""Compliance sizes: audit export rows/s; access-review time and peak memory.

On a scratch database seeded with `--users` users (`pdp seed`), with `--audit-rows`
synthetic change-log rows of that tenant (half of them moved to the audit archive by
`pdp prune`, so the export reads the union), it runs the real commands as child
processes with stdout to /dev/null and reports wall time, rows and the child's peak
RSS (ru_maxrss of the child):

- `pdp audit --tenant T --format jsonl` and `--format csv`;
- `pdp access-review --tenant T --format csv` (now), `--at` (a past state rebuilt
  from the change log, after `--changes` later writes) and `--since` (the diff from
  that moment to now: the rows the later writes gained).

    python -m loadtests.bench_compliance --users 100000 --audit-rows 1000000

PDP_DATABASE_URL names the server (a scratch database is created and dropped),
default the local PostgreSQL on 127.0.0.1:5432.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

import asyncpg

from loadtests.bench_sync import TENANT, prepare, scratch_database

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass(frozen=True, slots=True)
class Run:
    name: str
    seconds: float
    rows: int
    peak_rss_mb: float

    def line(self) -> str:
        rate = self.rows / self.seconds if self.seconds else 0.0
        return (
            f"{self.name:<34} {self.rows:>10,} rows {self.seconds:>8.2f} s"
            f" {rate:>11,.0f} rows/s  peak RSS {self.peak_rss_mb:>6.1f} MB"
        )


def _child(name: str, url: str, *args: str) -> Run:
    """Run `pdp ARGS` alone (one child at a time, so ru_maxrss is its own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    env |= {"PDP_DATABASE_URL": url, "PDP_LOG_LEVEL": "WARNING"}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdp", *args], env=env, stdout=subprocess.PIPE, text=False
    )
    out = proc.stdout
    assert out is not None
    lines = 0
    while chunk := out.read(1 << 20):
        lines += chunk.count(b"\n")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"pdp {' '.join(args)} exited {proc.returncode}")
    header = 1 if "csv" in args else 0
    return Run(name, seconds, lines - header, usage.ru_maxrss / 1024)


async def _audit_rows(url: str, rows: int) -> None:
    """`rows` change-log rows of the tenant (user_roles inserts), written in one statement."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            """
INSERT INTO pdp.change_log (tenant_id, entity, op, key, old, new, actor, changed_at)
SELECT $1::text, 'user_roles', 'insert',
       jsonb_build_object('tenant_id', $1::text, 'user_id', 'u' || g, 'role_id', 'r' || (g % 40),
                          'scope', '*'),
       NULL,
       jsonb_build_object('tenant_id', $1::text, 'user_id', 'u' || g, 'role_id', 'r' || (g % 40),
                          'scope', '*', 'expires_at', NULL),
       'bench', now() - interval '1 hour' + g * interval '1 microsecond'
FROM generate_series(1, $2) g""",
            TENANT,
            rows,
        )
    finally:
        await conn.close()


async def _archive_half(url: str, rows: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "WITH moved AS (DELETE FROM pdp.change_log WHERE id IN"
            " (SELECT id FROM pdp.change_log WHERE actor = 'bench' ORDER BY id LIMIT $1)"
            " RETURNING *) INSERT INTO pdp.audit_archive SELECT * FROM moved",
            rows // 2,
        )
        await conn.execute("ANALYZE pdp.change_log; ANALYZE pdp.audit_archive")
    finally:
        await conn.close()


async def _later_changes(url: str, changes: int) -> str:
    """The moment before `changes` captured writes (assignments added and removed)."""
    conn = await asyncpg.connect(url)
    try:
        at = str(await conn.fetchval("SELECT now()::text"))
        role = await conn.fetchval("SELECT id FROM pdp.roles WHERE tenant_id = $1 LIMIT 1", TENANT)
        await conn.execute(
            "INSERT INTO pdp.user_roles (tenant_id, user_id, role_id, scope)"
            " SELECT tenant_id, id, $2, 'report:later' FROM pdp.users WHERE tenant_id = $1"
            " ORDER BY id LIMIT $3",
            TENANT, role, changes,
        )  # fmt: skip
        return at
    finally:
        await conn.close()


async def main(args: argparse.Namespace) -> list[Run]:
    server = os.environ.get("PDP_DATABASE_URL", DEFAULT_SERVER)
    runs: list[Run] = []
    async with scratch_database(server) as url:
        started = time.perf_counter()
        await prepare(url, args.users)
        print(f"seeded {args.users:,} users in {time.perf_counter() - started:.1f} s", flush=True)
        await _audit_rows(url, args.audit_rows)
        await _archive_half(url, args.audit_rows)
        for form in ("jsonl", "csv"):
            audit = ("audit", "--tenant", TENANT, "--format", form)
            runs.append(await asyncio.to_thread(_child, f"audit --format {form}", url, *audit))
            print(runs[-1].line(), flush=True)
        at = await _later_changes(url, args.changes)
        review = ("access-review", "--tenant", TENANT, "--format", "csv")
        cases = (
            ("access-review (now)", ()),
            ("access-review --at", ("--at", at)),
            ("access-review --since (diff)", ("--since", at)),
        )
        for name, extra in cases:
            runs.append(await asyncio.to_thread(_child, name, url, *review, *extra))
            print(runs[-1].line(), flush=True)
    return runs


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--audit-rows", type=int, default=1_000_000)
    parser.add_argument("--changes", type=int, default=1000, help="writes after --at")
    parser.add_argument("--json", action="store_true", help="also print the runs as JSON")
    args = parser.parse_args()
    runs = asyncio.run(main(args))
    print(f"(machine: {os.cpu_count()} CPUs; parent peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")  # fmt: skip
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in runs]))


if __name__ == "__main__":
    cli()
