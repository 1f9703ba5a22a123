"""Route matching cost: the compiled table (`pdp.gateway.routes`) against a linear scan.

    .venv/bin/python loadtests/bench_routes.py [--sizes 10,100,500,2000] [--n 200000]

Tables from `loadtests/route_tables.py` (the entries requests hit come last: a linear
scan's worst case, nothing special for the trie); paths normalized once up front, so
the numbers are the match alone, then normalize + match of the raw path together.
The linear scan is one precompiled regex per entry tried in order (what a naive
first-match implementation does), the baseline the trie is measured against.
"""

from __future__ import annotations

import argparse
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


if __name__ == "__main__":
    main()
