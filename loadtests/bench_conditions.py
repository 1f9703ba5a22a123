"""Engine cost of conditional grants, against the unconditional check in the same run.

    .venv/bin/python loadtests/bench_conditions.py [--users 100000] [--resources 1000000]

Reports, in one process: the median of an unconditional check (granted), of a check
decided by one condition (ownership, inventory attributes), of one with three
conditional candidates (the last one true), the memory per inventory resource
(RSS delta over `--resources` rows) and the time to load them and to apply one change.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

from loadtests.bench_engine import rss_mb
from pdp.conditions import Facts
from pdp.engine import Decision, Engine, Row, RowChange, Snapshot

NOW = 1_700_000_000.0
T = "acme"


def _median_us(fn: Callable[[], object], n: int = 20_000) -> float:
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(samples)


def _tables(users: int) -> dict[str, list[Row]]:
    perms = [
        ("reader", "document:read", None),
        ("owner", "document:edit", "resource.properties.ownerID == subject.attributes.email"),
        ("multi", "report:share", "resource.properties.a == 1"),
        ("multi", "report:*", "resource.properties.b == 1"),
        ("multi", "*:share", "context.c == 1"),
    ]
    return {
        "tenants": [(T,)],
        "users": [(T, f"u{i}", "active", f'{{"email": "u{i}@x"}}') for i in range(users)],
        "roles": [(T, "reader"), (T, "owner"), (T, "multi")],
        "role_permissions": [(T, *p) for p in perms],
        "user_roles": [
            (T, f"u{i}", r, "*", None) for i in range(users) for r in ("reader", "owner", "multi")
        ],
        "resources": [(T, "document", "d1", '{"ownerID": "u7@x"}')],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--resources", type=int, default=1_000_000)
    args = parser.parse_args()
    engine = Engine.build(_tables(args.users), Snapshot(1, 1))
    three = Facts(resource={"a": 0, "b": 0}, context={"c": 1})
    rows: dict[str, Callable[[], Decision]] = {
        "unconditional check (granted)": lambda: engine.check(
            T, "u7", "document", "d1", "read", NOW
        ),
        "one condition (ownership, inventory)": lambda: engine.check(
            T, "u7", "document", "d1", "edit", NOW
        ),
        "three conditional candidates": lambda: engine.check(
            T, "u7", "report", "r1", "share", NOW, three
        ),
    }
    assert all(fn().allowed for fn in rows.values())
    for name, fn in rows.items():
        print(f"{name:40} median {_median_us(fn):7.2f} us")

    gc.collect()
    before = rss_mb()
    start = time.perf_counter()
    inventory = [
        (T, "document", f"doc-{i}", f'{{"ownerID": "u{i % args.users}@x"}}')
        for i in range(args.resources)
    ]
    engine = Engine.build({"tenants": [(T,)], "resources": inventory}, Snapshot(1, 1))
    loaded = time.perf_counter() - start
    del inventory
    gc.collect()
    per = (rss_mb() - before) * 2**20 / args.resources
    start = time.perf_counter()
    engine.apply(
        [RowChange.upsert("resources", (T, "document", "doc-5", '{"ownerID": "u9@x"}'))],
        Snapshot(2, 2),
    )
    applied = (time.perf_counter() - start) * 1e6
    print(
        f"inventory: {args.resources} resources built in {loaded:.1f} s, "
        f"{per:.0f} bytes each (RSS), one change applied in {applied:.0f} us"
    )


if __name__ == "__main__":
    main()
