"""Search fairness: checks' latency alone, and with clients looping `search/subject`.

    .venv/bin/python -m loadtests.bench_search_fairness [--users 100000] [--seconds 10]
        [--searchers 4] [--rounds 2] [--nice 10] [--share 0.25]

A real `pdp serve` over a database seeded by the real `pdp seed --users N` (database
`pdp_bench_search_fairness` on PDP_DATABASE_URL's server, else the embedded one;
reused while it holds N users). The question searched is the (type, action) on
resource "1" whose answer is closest to 17,378 users (the issue's figure for 100,000).

One checker (this process, one keep-alive connection, one request at a time, bodies
drawn from the tenant's users) measures check latency in three phases per round, all
in the same run: alone; with `--searchers` processes looping the same subject search
(page 1, so the cache may answer); with them asking a new question each time
(another resource id: every search computes). Reported: p50 and p99 per phase
(median over rounds), the ratio of each to "alone", and searches answered per second.
Target: checks' p99 with searches within 2x of without.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from loadtests.gateway_harness import Proc, free_port, poll, request
from loadtests.pg_dataset import server_url, with_database

DATABASE = "pdp_bench_search_fairness"
PREFIX = "fair"
TENANT = f"{PREFIX}-1"
TARGET_MATCHES = 17_378
TYPES = ("document", "folder", "project", "report", "invoice")
ACTIONS = ("read", "write", "delete", "share", "approve", "export")
SEARCH = "/access/v1/search/subject"
EVALUATION = "/access/v1/evaluation"


def _post(conn: http.client.HTTPConnection, path: str, body: bytes) -> dict[str, Any]:
    conn.request("POST", path, body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise RuntimeError(f"{path}: {response.status} {data[:200]!r}")
    answer: dict[str, Any] = json.loads(data)
    return answer


def _search_body(rtype: str, rid: str, action: str) -> bytes:
    return json.dumps({
        "subject": {"type": "user"}, "action": {"name": action},
        "resource": {"type": rtype, "id": rid}, "page": {"limit": 100},
    }).encode()  # fmt: skip


# --- the search loop (a child process) ----------------------------------------------------


def search_loop(port: int, rtype: str, action: str, distinct: bool, seconds: float) -> None:
    """Ask the search again and again for `seconds`; print how many were answered."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    ends, n = time.monotonic() + seconds, 0
    while time.monotonic() < ends:
        rid = f"fair-{os.getpid()}-{n}" if distinct else "1"
        answer = _post(conn, SEARCH, _search_body(rtype, rid, action))
        assert answer["page"]["total"] > 0, answer
        n += 1
    print(n)


# --- the orchestration --------------------------------------------------------------------


async def _prepare(users: int) -> str:
    """The URL of a database holding `users` users in tenant fair-1 (seeded if not)."""
    with server_url() as admin:
        conn = await asyncpg.connect(admin)
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
                await conn.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            await conn.close()
        url = with_database(admin, DATABASE)
        _pdp(url, "migrate")
        conn = await asyncpg.connect(url)
        try:
            have = await conn.fetchval(
                "SELECT count(*) FROM pdp.users WHERE tenant_id = $1", TENANT
            )
        finally:
            await conn.close()
        if have != users:
            started = time.monotonic()
            _pdp(url, "seed", "--users", str(users), "--tenant-prefix", PREFIX, "--replace")
            print(f"seeded {users} users in {time.monotonic() - started:.0f} s", file=sys.stderr)
        return url


def _pdp(url: str, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    subprocess.run([sys.executable, "-m", "pdp", *args], env={**env, "PDP_DATABASE_URL": url},
                   check=True, capture_output=True, timeout=1800)  # fmt: skip


def _question(port: int) -> tuple[str, str, int]:
    """The (type, action) on resource "1" whose answer is closest to TARGET_MATCHES."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    sizes = {
        (rtype, action): _post(conn, SEARCH, _search_body(rtype, "1", action))["page"]["total"]
        for rtype in TYPES for action in ACTIONS
    }  # fmt: skip
    (rtype, action), total = min(sizes.items(), key=lambda kv: abs(kv[1] - TARGET_MATCHES))
    return rtype, action, total


def _check_bodies(users: int, n: int = 2000) -> list[bytes]:
    rng = random.Random(7)
    return [
        json.dumps({
            "subject": {"type": "user", "id": f"user-{rng.randrange(1, users + 1):06d}"},
            "action": {"name": rng.choice(ACTIONS)},
            "resource": {"type": rng.choice(TYPES), "id": str(rng.randrange(1000))},
        }).encode()
        for _ in range(n)
    ]  # fmt: skip


def _checks(port: int, bodies: list[bytes], seconds: float) -> list[float]:
    """Check latencies (ms) of one client asking one at a time for `seconds`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    latencies: list[float] = []
    ends = time.monotonic() + seconds
    i = 0
    while time.monotonic() < ends:
        started = time.perf_counter()
        _post(conn, EVALUATION, bodies[i % len(bodies)])
        latencies.append((time.perf_counter() - started) * 1000)
        i += 1
    conn.close()
    return latencies


def _phase(port: int, bodies: list[bytes], args: argparse.Namespace,
           question: tuple[str, str], mode: str) -> tuple[float, float, float]:  # fmt: skip
    """(p50 ms, p99 ms, searches/s) of the checker with `mode` searchers running."""
    loops: list[subprocess.Popen[str]] = []
    if mode != "alone":
        argv = [sys.executable, "-m", "loadtests.bench_search_fairness", "--loop", str(port),
                question[0], question[1], mode, str(args.seconds + 1)]  # fmt: skip
        # At a lower CPU priority (--nice): on a small shared box the OS would otherwise
        # preempt the server for the clients' own JSON work, and that is not the
        # server's fairness.
        loops = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True,
                                  preexec_fn=lambda: os.nice(args.nice))  # noqa: PLW1509
                 for _ in range(args.searchers)]  # fmt: skip
        time.sleep(0.5)  # let the loops reach the server before measuring
    latencies = _checks(port, bodies, args.seconds)
    searches = 0
    for loop in loops:
        out, _ = loop.communicate(timeout=120)
        if loop.returncode != 0:
            raise RuntimeError(f"a search loop failed ({loop.returncode})")
        searches += int(out.strip())
    q = statistics.quantiles(latencies, n=100)
    return q[49], q[98], searches / (args.seconds + 1)


def orchestrate(args: argparse.Namespace) -> None:
    url = asyncio.run(_prepare(args.users))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    env |= {"PDP_DATABASE_URL": url, "PDP_PORT": str(port), "PDP_DEFAULT_TENANT": TENANT,
            "PDP_LOG_LEVEL": "WARNING"}  # fmt: skip
    if args.share is not None:
        env["PDP_SEARCH_SHARE"] = str(args.share)
    with tempfile.TemporaryDirectory(prefix="pdp-fairness-") as tmp:
        serve = Proc("serve", [sys.executable, "-m", "pdp", "serve"], Path(tmp) / "serve.log", env)
        try:
            poll(lambda: request(port, "GET", "/readyz", timeout=2).status == 200, 300, "serve",
                 serve)  # fmt: skip
            rtype, action, total = _question(port)
            print(f"users {args.users}; search: who may {action} {rtype}:1 -> {total} users; "
                  f"{args.searchers} searchers; {args.seconds:g} s per phase, "
                  f"{args.rounds} rounds")  # fmt: skip
            _report(port, _check_bodies(args.users), args, (rtype, action))
        finally:
            serve.stop()


def _report(port: int, bodies: list[bytes], args: argparse.Namespace,
            question: tuple[str, str]) -> None:  # fmt: skip
    modes = ("alone", "same", "distinct")
    runs: dict[str, list[tuple[float, float, float]]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode in modes:
            runs[mode].append(_phase(port, bodies, args, question, mode))
    base50 = statistics.median(r[0] for r in runs["alone"])
    base99 = statistics.median(r[1] for r in runs["alone"])
    labels = {
        "alone": "checks alone",
        "same": "+ searches, same question",
        "distinct": "+ searches, new question each",
    }
    print(f"{'phase':32} {'p50 ms':>8} {'p99 ms':>8} {'p50 x':>6} {'p99 x':>6} {'searches/s':>11}")
    for mode in modes:
        p50 = statistics.median(r[0] for r in runs[mode])
        p99 = statistics.median(r[1] for r in runs[mode])
        rate = statistics.median(r[2] for r in runs[mode])
        print(f"{labels[mode]:32} {p50:8.2f} {p99:8.2f} {p50 / base50:6.2f} {p99 / base99:6.2f}"
              f" {rate:11.1f}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--searchers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--nice", type=int, default=10, help="the search loops' niceness")
    parser.add_argument("--share", type=float, default=None,
                        help="PDP_SEARCH_SHARE for the server (default: its own)")  # fmt: skip
    parser.add_argument("--loop", nargs=5, metavar=("PORT", "TYPE", "ACTION", "MODE", "SECONDS"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args(argv)
    if args.loop:
        port, rtype, action, mode, seconds = args.loop
        search_loop(int(port), rtype, action, mode == "distinct", float(seconds))
        return
    orchestrate(args)


if __name__ == "__main__":
    main()
