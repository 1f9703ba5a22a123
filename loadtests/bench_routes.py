"""Route matching cost: the compiled table (`pdp.gateway.routes`) against a linear scan.

    .venv/bin/python loadtests/bench_routes.py [--sizes 10,100,500,2000] [--n 200000]

Tables from `loadtests/route_tables.py` (the entries requests hit come last: a linear
scan's worst case, nothing special for the trie); paths normalized once up front, so
the numbers are the match alone, then normalize + match of the raw path together.
The linear scan is one precompiled regex per entry tried in order (what a naive
first-match implementation does), the baseline the trie is measured against.

Then the whole handler in-process (no sockets, best of 7 interleaved runs): the
`/forward-auth` handler over the 500-entry table against the
`/access/v1/evaluation` handler, both on aiohttp mocked requests for the same
decision (an allow and a deny), so HTTP parsing is not in either number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests.route_tables import ACTIONS, RESOURCE_TYPES, request_path, routes_yaml
from pdp.gateway import RouteTable, normalize, parse_routes


def _paths(count: int) -> list[str]:
    rng = random.Random(3)
    paths = [
        request_path(rng.choice(RESOURCE_TYPES), str(rng.randint(1, 10**6)), rng.choice(ACTIONS))
        for _ in range(count)
    ]
    paths += [f"/nowhere/{i}" for i in range(count // 10)]  # misses cost the most to scan
    return paths


Scan = list[tuple[re.Pattern[str], frozenset[str] | None]]


def _linear(table: RouteTable) -> Scan:
    compiled = []
    for route in table.routes:
        pattern = re.sub(r"\\\{[A-Za-z_0-9]+\\\*\\\}", ".+", re.escape(route.template))
        pattern = re.sub(r"\\\{[A-Za-z_0-9]+\\\}", "[^/]+", pattern)
        compiled.append((re.compile(pattern), route.methods))
    return compiled


def _per_call_us(fn: object, items: list[object], n: int, repeat: int = 3) -> float:
    """Microseconds per call, the best of `repeat` runs (the machine is shared)."""
    call = fn
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for i in range(n):
            call(items[i % len(items)])  # type: ignore[operator]
        best = min(best, time.perf_counter() - started)
    return best / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default="10,100,500,2000")
    parser.add_argument("--n", type=int, default=200_000)
    args = parser.parse_args()
    raw = _paths(5000)
    segmented = [normalize(p) for p in raw]
    print(f"{'routes':>7} {'compile ms':>11} {'trie match':>11} {'normalize+match':>16} "
          f"{'linear scan':>12}")  # fmt: skip
    for size in map(int, args.sizes.split(",")):
        text = routes_yaml(size)
        started = time.perf_counter()
        table = parse_routes(text)
        compile_ms = (time.perf_counter() - started) * 1000
        scan = _linear(table)

        def trie(segments: tuple[str, ...], table: RouteTable = table) -> object:
            return table.match("GET", segments)

        def both(path: str, table: RouteTable = table) -> object:
            return table.match("GET", normalize(path))

        def linear(path: str, scan: Scan = scan) -> object:
            for pattern, methods in scan:
                if (methods is None or "GET" in methods) and pattern.fullmatch(path):
                    return pattern
            return None

        n_linear = max(2000, args.n // max(1, size // 10))
        print(f"{size:>7} {compile_ms:>11.1f} {_per_call_us(trie, segmented, args.n):>9.2f}us "  # type: ignore[arg-type]
              f"{_per_call_us(both, raw, args.n):>14.2f}us "  # type: ignore[arg-type]
              f"{_per_call_us(linear, raw, n_linear):>10.2f}us")  # type: ignore[arg-type]  # fmt: skip
    asyncio.run(_handlers())


HANDLER_ROWS: dict[str, list[tuple[str | float | None, ...]]] = {
    "tenants": [("t",)],
    "users": [("t", "alice", "active"), ("t", "bob", "active")],
    "roles": [("t", "reader")],
    "role_permissions": [("t", "reader", "document:read")],
    "user_roles": [("t", "alice", "reader", "*", None)],
}


async def _handlers(rounds: int = 7, n: int = 5000) -> None:
    from aiohttp.test_utils import make_mocked_request  # noqa: PLC0415
    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    from pdp.config import Settings  # noqa: PLC0415
    from pdp.engine import Engine, Snapshot  # noqa: PLC0415
    from pdp.metrics import Metrics  # noqa: PLC0415
    from pdp.replica import Replica  # noqa: PLC0415
    from pdp.web.authzen import AuthzenApi  # noqa: PLC0415
    from pdp.web.forward_auth import ForwardAuthApi, Gateway, RouteBox  # noqa: PLC0415

    replica = Replica()
    replica.install(Engine.build(HANDLER_ROWS, Snapshot(1, 1)), "e", time.monotonic())
    config = Settings(default_tenant="t", forward_auth_mode="envoy", max_staleness_seconds=1e9)
    metrics = Metrics(CollectorRegistry())
    forward = ForwardAuthApi(
        config, replica, metrics, Gateway(RouteBox(parse_routes(routes_yaml(500))))
    )
    evaluation = AuthzenApi(config, replica, metrics, None)
    best: dict[str, float] = {}
    for _ in range(rounds):
        for user in ("alice", "bob"):
            fa = make_mocked_request(
                "GET", "/forward-auth/api/document/d1/read", headers={"X-User-Id": user}
            )
            ev = make_mocked_request(
                "POST", "/access/v1/evaluation", headers={"Content-Type": "application/json"}
            )
            body = json.dumps({"subject": {"type": "user", "id": user}, "action": {"name": "read"},
                               "resource": {"type": "document", "id": "d1"}}).encode()  # fmt: skip

            async def read(body: bytes = body) -> bytes:
                return body

            ev.read = read  # type: ignore[method-assign]
            for name, handler, request in (
                ("forward-auth", forward.check, fa),
                ("evaluation", evaluation.evaluation, ev),
            ):
                started = time.perf_counter()
                for _ in range(n):
                    await handler(request)
                key = f"{name} ({'allow' if user == 'alice' else 'deny'})"
                best[key] = min(
                    best.get(key, float("inf")), (time.perf_counter() - started) / n * 1e6
                )
    for key, us in best.items():
        print(f"handler {key:<22} {us:6.1f} us")


if __name__ == "__main__":
    main()
