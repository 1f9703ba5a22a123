"""Micro-benchmark of the pure decision engine: build time, check latency, apply cost, RSS.

    .venv/bin/python loadtests/bench_engine.py --users 100000 [--checks 200000] [--seed 1]

Synthetic tenant: ~50 roles in levels (inheritance depth up to 4) with wildcard grants,
~100 groups with 1-3 group assignments each, users with 1-3 direct assignments
(scopes `*`, `type:*`, `type:id`, some expired) and 0-3 group memberships.
"""

from __future__ import annotations

import argparse
import gc
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pdp.engine import Engine, Row, RowChange, Snapshot

TYPES = ("document", "folder", "project", "report", "invoice")
ACTIONS = ("read", "write", "delete", "share", "approve", "export")
TENANT = "acme"
NOW = 1_700_000_000.0


def rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def _scope(rng: random.Random) -> str:
    r = rng.random()
    rtype = rng.choice(TYPES)
    if r < 0.4:
        return "*"
    if r < 0.7:
        return f"{rtype}:*"
    return f"{rtype}:{rng.randrange(1000)}"


def _expiry(rng: random.Random) -> float | None:
    r = rng.random()
    if r < 0.8:
        return None
    return NOW + 3600 if r < 0.9 else NOW - 3600


def roles_rows(rng: random.Random) -> dict[str, list[Row]]:
    """50 roles in 5 levels; a role at level k inherits 1-2 roles of level k-1."""
    levels = [[f"L{lv}r{i}" for i in range(10)] for lv in range(5)]
    perms = [f"{t}:{a}" for t in TYPES for a in ACTIONS]
    perms += [f"{t}:*" for t in TYPES] + [f"*:{a}" for a in ACTIONS]
    roles: list[Row] = []
    inherits: list[Row] = []
    grants: list[Row] = []
    for lv, names in enumerate(levels):
        for name in names:
            roles.append((TENANT, name))
            grants.extend((TENANT, name, perm) for perm in rng.sample(perms, 2))
            if lv:
                parents = rng.sample(levels[lv - 1], rng.randint(1, 2))
                inherits.extend((TENANT, name, parent) for parent in parents)
    grants.append((TENANT, "L4r9", "*:*"))
    return {"roles": roles, "role_inherits": inherits, "role_permissions": grants}


class Counted:
    """An iterable of rows that counts what it yielded (rows are generated lazily)."""

    def __init__(self, rows: Iterator[Row]) -> None:
        self.rows = rows
        self.n = 0

    def __iter__(self) -> Iterator[Row]:
        for row in self.rows:
            self.n += 1
            yield row


def _user_roles(users: int, rng: random.Random, role_ids: list[str]) -> Iterator[Row]:
    for i in range(users):
        assigned = {(rng.choice(role_ids), _scope(rng)) for _ in range(rng.randint(1, 3))}
        for role, scope in assigned:
            yield (TENANT, f"user-{i:07d}", role, scope, _expiry(rng))


def _members(users: int, rng: random.Random, group_ids: list[str]) -> Iterator[Row]:
    for i in range(users):
        for g in rng.sample(group_ids, rng.randint(0, 3)):
            yield (TENANT, g, f"user-{i:07d}")


def synthetic(users: int, seed: int) -> dict[str, Counted]:
    """All rows of one tenant with `users` users, generated while the engine reads them.

    Each table draws from its own random stream, so the input never sits in memory whole
    and the RSS after the build is the engine's.
    """
    rng = random.Random(seed)
    small = roles_rows(rng)
    role_ids = [str(r[1]) for r in small["roles"] if r[1] != "L4r9"]
    group_ids = [f"g{i}" for i in range(100)]
    small["tenants"] = [(TENANT,)]
    small["groups"] = [(TENANT, g) for g in group_ids]
    small["group_roles"] = list(
        {
            (TENANT, g, rng.choice(role_ids), _scope(rng), _expiry(rng))
            for g in group_ids
            for _ in range(rng.randint(1, 3))
        }
    )
    tables = {name: Counted(iter(rows)) for name, rows in small.items()}
    status = random.Random(seed + 1)
    tables["users"] = Counted(
        (TENANT, f"user-{i:07d}", "active" if status.random() < 0.97 else "disabled")
        for i in range(users)
    )
    tables["user_roles"] = Counted(_user_roles(users, random.Random(seed + 2), role_ids))
    tables["group_members"] = Counted(_members(users, random.Random(seed + 3), group_ids))
    return tables


def bench_checks(engine: Engine, users: int, n: int, seed: int) -> list[int]:
    """Per-call latency in ns of `n` random checks (timer overhead included)."""
    rng = random.Random(seed + 1)
    requests = [
        (
            f"user-{rng.randrange(users):07d}",
            rng.choice(TYPES),
            str(rng.randrange(1000)),
            rng.choice(ACTIONS),
        )
        for _ in range(n)
    ]
    check = engine.check
    clock = time.perf_counter_ns
    out = []
    for user, rtype, rid, action in requests:
        t0 = clock()
        check(TENANT, user, rtype, rid, action, NOW)
        out.append(clock() - t0)
    return out


def bench_apply(engine: Engine) -> dict[str, float]:
    """Microseconds to apply one small batch of each interesting kind."""
    snap = Snapshot(2, 2, frozenset())
    batches = {
        "role_permission (base role)": [
            RowChange.upsert("role_permissions", (TENANT, "L0r0", "report:archive"))
        ],
        "role_inherits edge": [RowChange.upsert("role_inherits", (TENANT, "L2r0", "L0r9"))],
        "group_roles": [RowChange.upsert("group_roles", (TENANT, "g1", "L1r1", "*", None))],
        "user_roles": [RowChange.upsert("user_roles", (TENANT, "user-0000001", "L1r1", "*", None))],
        "group_members delete": [RowChange.delete("group_members", (TENANT, "g2", "user-0000002"))],
    }
    out = {}
    for name, batch in batches.items():
        t0 = time.perf_counter_ns()
        engine.apply(batch, snap)
        out[name] = (time.perf_counter_ns() - t0) / 1000
    return out


def bench_reverse(engine: Engine, users: int, n: int, seed: int) -> dict[str, list[float]]:
    """Milliseconds per call of the reverse queries and the digest, over random requests."""
    rng = random.Random(seed + 2)
    clock = time.perf_counter
    out: dict[str, list[float]] = {"digest": [], "subjects": [], "actions": [], "resources": []}
    calls: dict[str, Callable[[], object]] = {
        "digest": lambda: engine.digest(TENANT),
        "subjects": lambda: engine.subjects(
            TENANT, rng.choice(TYPES), str(rng.randrange(1000)), rng.choice(ACTIONS), NOW
        ),
        "actions": lambda: engine.actions(
            TENANT, f"user-{rng.randrange(users):07d}", rng.choice(TYPES), "1", NOW
        ),
        "resources": lambda: engine.resources(
            TENANT, f"user-{rng.randrange(users):07d}", rng.choice(TYPES), rng.choice(ACTIONS), NOW
        ),
    }
    for name, call in calls.items():
        for _ in range(n):
            t0 = clock()
            call()
            out[name].append((clock() - t0) * 1000)
    return out


def bench_selective_subjects(engine: Engine, users: int, n: int) -> list[float]:
    """Milliseconds per subject search with a small answer in a big tenant.

    Adds a role granting `vault:open` assigned per vault (`vault:<i>` scopes, 1000 vaults),
    the shape of "owner of this resource" assignments; each answer is one or two users.
    """
    batch = [
        RowChange.upsert("roles", (TENANT, "vault-owner")),
        RowChange.upsert("role_permissions", (TENANT, "vault-owner", "vault:open")),
    ]
    batch += [
        RowChange.upsert(
            "user_roles",
            (TENANT, f"user-{(i * 7919) % users:07d}", "vault-owner", f"vault:{i}", None),
        )
        for i in range(1000)
    ]
    engine.apply(batch, Snapshot(3, 3, frozenset()))
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        engine.subjects(TENANT, "vault", str(i), "open", NOW)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--checks", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    for table in synthetic(args.users, args.seed).values():
        for _ in table:
            pass
    generate_s = time.perf_counter() - t0
    gc.collect()
    base = rss_mb()
    tables = synthetic(args.users, args.seed)
    t0 = time.perf_counter()
    engine = Engine.build(tables, Snapshot(1, 1, frozenset()))
    build_s = time.perf_counter() - t0
    rows = sum(t.n for t in tables.values())
    del tables
    gc.collect()
    engine_mb = rss_mb() - base
    gc.freeze()  # as a service would after loading: keep the collector off the long-lived heap
    lat = sorted(bench_checks(engine, args.users, args.checks, args.seed))
    p99 = lat[int(len(lat) * 0.99)]
    print(f"python {sys.version.split()[0]}  users={args.users}  rows={rows}")
    print(
        f"build: {build_s:.2f} s including lazy row generation ({generate_s:.2f} s alone): "
        f"engine {build_s - generate_s:.2f} s, {(build_s - generate_s) / rows * 1e6:.2f} us/row"
    )
    print(
        f"rss: engine {engine_mb:.0f} MiB ({engine_mb * 2**20 / args.users:.0f} B/user); "
        f"process now {rss_mb():.0f} MiB, peak "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )
    print(
        f"check: median {statistics.median(lat):.0f} ns  p99 {p99} ns  "
        f"mean {statistics.fmean(lat):.0f} ns  (n={len(lat)}, timer overhead included)"
    )
    print(f"counts: {engine.counts()}")
    for name, us in bench_apply(engine).items():
        print(f"apply {name}: {us:.1f} us")
    reverse = bench_reverse(engine, args.users, 20, args.seed)
    reverse["subjects, small answer"] = bench_selective_subjects(engine, args.users, 20)
    for name, ms in reverse.items():
        print(
            f"{name}: first {ms[0]:.3f} ms  median {statistics.median(ms):.3f} ms  "
            f"max {max(ms):.3f} ms  (n={len(ms)})"
        )


if __name__ == "__main__":
    main()
