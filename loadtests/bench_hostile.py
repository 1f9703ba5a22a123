"""Hostile-input benchmark: a client's check latency while another sends gzip bombs.

    .venv/bin/python loadtests/bench_hostile.py [--duration 10] [--sizes 1 3]

A real `pdp serve` (the demo tenant, in database `pdp_bench_hostile` of
PDP_DATABASE_URL's server, else the embedded one). One client asks checks back to
back on a keep-alive connection for `--duration` seconds, twice in the same run:
alone, then while an attacker sends gzip bombs (`--sizes` megabytes each, ~1000x
inflation: 1 MB -> ~1 GiB) on new connections in a loop. Prints p50 / p99 / max of
the checks in both phases and their ratio, and how the bombs were answered (415,
refused unread). Before issue 9 the bombs were inflated on the event loop: no
client was answered for 1.6 s (1 MB) or 3.3 s (3 MB).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests.gateway_harness import Pdp
from loadtests.pg_dataset import server_url, with_database
from pdp.pg import migrate, seed, seed_data

DATABASE = "pdp_bench_hostile"
CHECK = json.dumps({
    "subject": {"type": "user", "id": "bob", "properties": {"tenant": "demo"}},
    "action": {"name": "write"},
    "resource": {"type": "document", "id": "roadmap"},
}).encode()  # fmt: skip
JSON = {"Content-Type": "application/json"}


def gzip_bomb(megabytes: int) -> bytes:
    member = gzip.compress(b"\0" * (1 << 20), compresslevel=9)
    return member * max(1, (megabytes << 20) // len(member))


async def _database(admin_url: str) -> str:
    admin = await asyncpg.connect(admin_url)
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
            await admin.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await admin.close()
    url = with_database(admin_url, DATABASE)
    await migrate.upgrade(url)
    await seed.load(url, seed_data.demo(), replace=True)
    return url


def _checks(port: int, seconds: float) -> tuple[list[float], int]:
    """Latencies (ms) of back-to-back checks on one keep-alive connection, and how many
    were not answered allow (an error, or a deny such as `stale` from a frozen loop)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    latencies, wrong = [], 0
    end = time.perf_counter() + seconds
    while (started := time.perf_counter()) < end:
        conn.request("POST", "/access/v1/evaluation", CHECK, JSON)
        response = conn.getresponse()
        body = response.read()
        latencies.append((time.perf_counter() - started) * 1000)
        if response.status != 200 or json.loads(body)["decision"] is not True:
            wrong += 1
    conn.close()
    return latencies, wrong


def _attack(
    port: int, bombs: list[bytes], encoding: str | None, stop: threading.Event,
    answers: Counter[str],
) -> None:  # fmt: skip
    headers = JSON if encoding is None else {**JSON, "Content-Encoding": encoding}
    i = 0
    while not stop.is_set():
        bomb = bombs[i % len(bombs)]
        i += 1
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("POST", "/access/v1/evaluation", bomb, headers)
            answers[str(conn.getresponse().status)] += 1
        except (OSError, http.client.HTTPException) as exc:
            answers[type(exc).__name__] += 1
        finally:
            conn.close()


def _summary(run: tuple[list[float], int]) -> str:
    latencies, wrong = run
    cuts = statistics.quantiles(latencies, n=100)
    return (
        f"n={len(latencies):6d}  not allowed={wrong:4d}  p50={cuts[49]:7.2f} ms  "
        f"p99={cuts[98]:7.2f} ms  max={max(latencies):8.2f} ms"
    )


def run(args: argparse.Namespace) -> None:
    bombs = [gzip_bomb(size) for size in args.sizes]
    with server_url() as admin_url, tempfile.TemporaryDirectory() as work:
        url = asyncio.run(_database(admin_url))
        pdp = Pdp(url, Path(work), {"PDP_LOG_LEVEL": "WARNING"})
        try:
            _checks(pdp.port, 1.0)  # warm-up
            alone = _checks(pdp.port, args.duration)
            attacked, answers = _under_attack(pdp.port, bombs, "gzip", args.duration)
            # Control: bodies of the same sizes, uncompressed (413: over PDP_MAX_BODY_BYTES).
            plain = [b"x" * len(bomb) for bomb in bombs]
            control, control_answers = _under_attack(pdp.port, plain, None, args.duration)
        finally:
            pdp.stop()
    sizes = " and ".join(f"{len(b) / 1e6:.1f} MB" for b in bombs)
    print(f"checks alone:             {_summary(alone)}")
    print(f"checks with gzip bombs:   {_summary(attacked)}  {_ratios(attacked, alone)}")
    print(f"checks with plain bodies: {_summary(control)}  {_ratios(control, alone)}")
    print(f"bombs sent ({sizes}, ~1000x inflation): {dict(answers)}")
    print(f"plain bodies sent (same sizes): {dict(control_answers)}")


def _under_attack(
    port: int, bodies: list[bytes], encoding: str | None, seconds: float
) -> tuple[tuple[list[float], int], Counter[str]]:
    stop, answers = threading.Event(), Counter[str]()
    attacker = threading.Thread(target=_attack, args=(port, bodies, encoding, stop, answers))
    attacker.start()
    try:
        return _checks(port, seconds), answers
    finally:
        stop.set()
        attacker.join(60)


def _ratios(run: tuple[list[float], int], alone_run: tuple[list[float], int]) -> str:
    latencies, alone = run[0], alone_run[0]
    p99 = statistics.quantiles(latencies, n=100)[98] / statistics.quantiles(alone, n=100)[98]
    return f"(p99 x{p99:.1f}, max x{max(latencies) / max(alone):.1f} of alone)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 3], metavar="MB")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
