"""Test harness for sync: a running sidecar replica, writers, a staleness monitor, equality.

"Equal" means, at quiescence: every tenant's engine digest equals the SQL digest,
and a sample of random checks answers exactly as `pdp.check` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg

from pdp.pg import seed as pg_seed
from pdp.pg.seed_data import ACTIONS, RESOURCE_TYPES, SeedSpec, synthetic
from pdp.replica import Replica
from pdp.supervisor import Supervisor
from sync import pg_queries as q
from sync.options import SyncOptions
from sync.service import SyncService

TENANT = "tenant-1"
MAX_STALENESS = 5.0  # the default PDP_MAX_STALENESS_SECONDS
RETRYABLE = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.UniqueViolationError,
    asyncpg.ForeignKeyViolationError,
    asyncpg.CheckViolationError,
)


async def seed(url: str, users: int = 300, seed_value: int = 7) -> None:
    await pg_seed.load(url, synthetic(SeedSpec(tenants=1, users=users, roles=20, seed=seed_value)))


@dataclass
class Sidecar:
    """A replica kept in sync by a supervised SyncService, with a staleness monitor."""

    url: str
    replica: Replica = field(default_factory=Replica)
    max_staleness: float = 0.0
    monitoring: bool = True
    service: SyncService | None = None
    supervisor: Supervisor | None = None
    _running: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    async def start(self, *, poll: float = 0.2, heartbeat: float = 1.0) -> None:
        options = SyncOptions(
            poll_interval=poll, heartbeat=heartbeat, backoff_initial=0.05, backoff_max=0.5
        )
        self.service = SyncService(self.url, self.replica, options=options)
        self.supervisor = Supervisor(backoff_initial=0.05, backoff_max=0.5)
        self.supervisor.add("sync", self.service.lifespan, critical=True)
        self._running = contextlib.AsyncExitStack()
        await self._running.enter_async_context(self.supervisor.running())

    async def stop(self) -> None:
        await self._running.aclose()

    async def monitor(self) -> None:
        """Record the worst staleness seen while `monitoring` (the database reachable)."""
        while True:
            if self.monitoring and self.replica.ready:
                self.max_staleness = max(self.max_staleness, self.replica.staleness())
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(url: str, **start: float) -> AsyncIterator[Sidecar]:
    sidecar = Sidecar(url)
    await sidecar.start(**start)
    monitor = asyncio.create_task(sidecar.monitor())
    try:
        yield sidecar
        # While the database was reachable the data never aged past the bound.
        assert sidecar.max_staleness < MAX_STALENESS, sidecar.max_staleness
    finally:
        monitor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await monitor
        await sidecar.stop()


async def current_xid(pg: asyncpg.Connection) -> int:
    """A fresh committed transaction's id: once visible, everything before it is too.

    It notifies like any write does, so the sidecar catches up without waiting for a poll.
    """
    async with pg.transaction():
        await pg.execute("SELECT pg_notify('pdp_changes', '')")
        return int(await pg.fetchval("SELECT pg_current_xact_id()::text::bigint"))


async def horizon_passed(pg: asyncpg.Connection, xid: int, within: float = 60.0) -> None:
    """Wait until every transaction up to `xid` has ended, in every database of the cluster.

    Retention never removes what a running transaction may precede, and any session on
    the server (another test run's, say) holds the cluster-wide xmin back. Other sessions'
    transactions emit no event: this polls the horizon, with a deadline.
    """
    async with asyncio.timeout(within):
        while await pg.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint") <= xid:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def settle(pg: asyncpg.Connection, replica: Replica, within: float = 10.0) -> None:
    xid = await current_xid(pg)
    assert await replica.wait_for_revision(xid, within), f"revision {xid} not reached"


async def assert_equal(
    pg: asyncpg.Connection, replica: Replica, checks: int = 10_000, within: float = 10.0
) -> None:
    """The replica equals the database: digests per tenant and `checks` random decisions.

    `within`: how long the replica may take to reach the database's current revision.
    """
    await assert_all_equal(pg, [replica], checks, within)


async def assert_all_equal(
    pg: asyncpg.Connection, replicas: list[Replica], checks: int = 10_000, within: float = 10.0
) -> None:
    """Each replica equals the database, as `assert_equal` says, all at one revision.

    They wait together for one fresh revision, then PostgreSQL computes the digests and
    the answers to the random checks once, and every replica is compared with them.
    """
    xid = await current_xid(pg)
    reached = await asyncio.gather(*(r.wait_for_revision(xid, within) for r in replicas))
    assert all(reached), f"revision {xid} not reached by {reached.count(False)} replicas"
    tenants = {r[0] for r in await pg.fetch("SELECT id FROM pdp.tenants")}
    digests = {}
    for tenant in tenants:
        total, lines = await pg.fetchrow(q.TENANT_DIGEST, tenant)
        digests[tenant] = f"{int(total):016x}:{lines}"
    grid: list[tuple[str, str, str, str, str]] = []
    answers: list[bool] = []
    now = 0.0
    if tenants:
        grid, answers, now = await _random_checks(pg, sorted(tenants), checks)
    for replica in replicas:
        engine = replica.engine
        assert engine is not None
        assert set(engine.tenants()) == tenants
        for tenant, digest in digests.items():
            assert engine.digest(tenant) == digest, tenant
        for request, expected in zip(grid, answers, strict=True):
            got = engine.check(*request, now).allowed
            assert got is expected, (request, got)


async def _random_checks(
    pg: asyncpg.Connection, tenants: list[str], n: int
) -> tuple[list[tuple[str, str, str, str, str]], list[bool], float]:
    """`n` random check requests, `pdp.check`'s answers to them, and the time they hold at."""
    rng = random.Random(n)
    users = [
        r[0]
        for r in await pg.fetch(
            "(SELECT DISTINCT user_id FROM pdp.user_roles ORDER BY 1 LIMIT 1000) "
            "UNION (SELECT id FROM pdp.users ORDER BY md5(id) LIMIT 1000) ORDER BY 1"
        )
    ]
    scoped = [
        r[0].split(":", 1)
        for r in await pg.fetch("SELECT DISTINCT scope FROM pdp.user_roles WHERE scope LIKE '%:%' LIMIT 500")
    ]
    grid = []
    for _ in range(n):
        rtype, rid = rng.choice(scoped) if scoped and rng.random() < 0.5 else (
            rng.choice([*RESOURCE_TYPES, "other"]), str(rng.randrange(50))
        )
        user = rng.choice(users) if users and rng.random() < 0.95 else "nobody"
        grid.append((rng.choice(tenants), user, rtype, rid, rng.choice([*ACTIONS, "other"])))
    now = time.time()
    answers = [
        bool(r[0])
        for r in await pg.fetch(
            "SELECT pdp.check(t, u, rt, ri, a, to_timestamp($1)) FROM "
            "unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[]) AS g(t, u, rt, ri, a)",
            now, *(list(c) for c in zip(*grid, strict=True)),
        )
    ]
    allowed = sum(answers)
    assert 0 < allowed < n, "the random checks must exercise both answers"
    return grid, answers, now


async def random_write(
    conn: asyncpg.Connection, rng: random.Random, user: str | None = None
) -> None:
    """One random, valid change to the seeded tenant, to `user`'s rows (else a random one
    of the first 300 users'); callers wrap it in a transaction."""
    user = user or f"user-{rng.randrange(300):06d}"
    op = rng.randrange(6)
    if op == 0:
        await conn.execute(
            "UPDATE pdp.users SET status = CASE status WHEN 'active' THEN 'disabled' ELSE 'active' END "
            "WHERE tenant_id = $1 AND id = $2", TENANT, user,
        )
    elif op == 1:
        await conn.execute(
            "INSERT INTO pdp.user_roles (tenant_id, user_id, role_id, scope) "
            "SELECT $1, $2, r.id, $3 FROM pdp.roles r WHERE r.tenant_id = $1 "
            "ORDER BY r.id OFFSET $4 LIMIT 1 ON CONFLICT DO NOTHING",
            TENANT, user, rng.choice(["*", "document:*", f"document:{rng.randrange(20)}"]), rng.randrange(20),
        )
    elif op == 2:
        await conn.execute(
            "DELETE FROM pdp.user_roles WHERE tenant_id = $1 AND user_id = $2", TENANT, user
        )
    elif op == 3:
        await conn.execute(
            "INSERT INTO pdp.group_members (tenant_id, group_id, user_id) "
            "SELECT $1, g.id, $2 FROM pdp.groups g WHERE g.tenant_id = $1 ORDER BY random() LIMIT 1 "
            "ON CONFLICT DO NOTHING", TENANT, user,
        )
    elif op == 4:
        await conn.execute(
            "DELETE FROM pdp.group_members WHERE tenant_id = $1 AND user_id = $2", TENANT, user
        )
    else:
        await conn.execute(
            "UPDATE pdp.user_roles SET expires_at = now() + make_interval(secs => $3) "
            "WHERE tenant_id = $1 AND user_id = $2", TENANT, user, rng.choice([-60.0, 3600.0]),
        )


async def writer(url: str, seed_value: int, stop: asyncio.Event, rollback_share: float = 0.3) -> int:
    """Commit random transactions until `stop`; roll back a share; returns commits."""
    rng = random.Random(seed_value)
    conn = await asyncpg.connect(url)
    commits = 0
    try:
        while not stop.is_set():
            tx = conn.transaction()
            await tx.start()
            try:
                for _ in range(rng.randint(1, 3)):
                    if rng.random() < 0.2:  # a savepoint that rolls back part of the work
                        sp = conn.transaction()
                        await sp.start()
                        await random_write(conn, rng)
                        await sp.rollback()
                    await random_write(conn, rng)
                    await asyncio.sleep(rng.random() * 0.01)
                if rng.random() < rollback_share:
                    await tx.rollback()
                else:
                    await tx.commit()
                    commits += 1
            except RETRYABLE:
                await tx.rollback()
    finally:
        await conn.close()
    return commits
