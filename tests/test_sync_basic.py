"""The sync worker against a real PostgreSQL: bootstrap, catch-up, reload triggers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from pdp.metrics import Metrics
from pdp.replica import Replica
from pdp.supervisor import Supervisor
from sync.options import SyncOptions
from sync.service import SyncService
from tests.conftest import DatabaseFactory

BASE = """
INSERT INTO pdp.tenants (id) VALUES ('t');
INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'alice'), ('t', 'bob');
INSERT INTO pdp.roles (tenant_id, id) VALUES ('t', 'viewer'), ('t', 'editor');
INSERT INTO pdp.role_inherits VALUES ('t', 'editor', 'viewer');
INSERT INTO pdp.role_permissions VALUES ('t', 'viewer', 'doc:read'), ('t', 'editor', 'doc:write');
INSERT INTO pdp.user_roles (tenant_id, user_id, role_id) VALUES ('t', 'alice', 'editor');
"""


@pytest.fixture
async def service(db_url: str, pg: asyncpg.Connection) -> AsyncIterator[SyncService]:
    await pg.execute(BASE)
    replica = Replica()
    svc = SyncService(db_url, replica, options=SyncOptions(poll_interval=0.5, heartbeat=1.0))
    supervisor = Supervisor()
    supervisor.add("sync", svc.lifespan, critical=True)
    async with supervisor.running():
        yield svc


async def _commit(pg: asyncpg.Connection, sql: str, *args: object) -> int:
    """Run `sql` in its own transaction; return that transaction's id (the revision token)."""
    async with pg.transaction():
        xid = int(await pg.fetchval("SELECT pg_current_xact_id()::text::bigint"))
        await pg.execute(sql, *args)
    return xid


def _allowed(svc: SyncService, user: str, action: str, rid: str = "d1") -> bool:
    engine = svc.sync.replica.engine
    assert engine is not None
    return engine.check("t", user, "doc", rid, action, time.time()).allowed


def _reason(svc: SyncService, user: str) -> str:
    engine = svc.sync.replica.engine
    assert engine is not None
    return engine.check("t", user, "doc", "d1", "read", time.time()).reason


async def test_bootstrap_then_changes_arrive(service: SyncService, pg: asyncpg.Connection) -> None:
    replica = service.sync.replica
    xid = await _commit(pg, "SELECT 1")
    assert await replica.wait_for_revision(xid, 10)
    assert _allowed(service, "alice", "read")
    assert not _allowed(service, "bob", "read")

    xid = await _commit(
        pg, "INSERT INTO pdp.user_roles (tenant_id, user_id, role_id) VALUES ('t', 'bob', 'viewer')"
    )
    assert await replica.wait_for_revision(xid, 5)
    assert _allowed(service, "bob", "read")

    xid = await _commit(pg, "DELETE FROM pdp.role_inherits")
    assert await replica.wait_for_revision(xid, 5)
    assert not _allowed(service, "alice", "read")
    assert _allowed(service, "alice", "write")
    # Plain changes take the one-statement path; only the first load was transactional.
    assert service.sync.fast_catchups >= 2
    assert service.sync.fast_catchups < service.sync.catchups


async def test_bulk_load_marker_reloads_the_tenant(
    service: SyncService, pg: asyncpg.Connection, tenant_builds: list[bool]
) -> None:
    replica = service.sync.replica
    async with pg.transaction():
        await pg.execute("SET LOCAL pdp.capture = 'off'")
        await pg.execute("INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'carol')")
        await pg.execute(
            "INSERT INTO pdp.user_roles (tenant_id, user_id, role_id) VALUES ('t', 'carol', 'viewer')"
        )
        await pg.execute("SELECT pdp.mark_bulk_load('t')")
        xid = int(await pg.fetchval("SELECT pg_current_xact_id()::text::bigint"))
    assert await replica.wait_for_revision(xid, 5)
    assert _allowed(service, "carol", "read")
    assert tenant_builds == [False]  # built in a worker thread, not on the event loop


async def test_truncate_and_epoch_force_full_reloads(service: SyncService, pg: asyncpg.Connection) -> None:
    replica = service.sync.replica
    xid = await _commit(pg, "TRUNCATE pdp.user_roles")
    assert await replica.wait_for_revision(xid, 5)
    assert not _allowed(service, "alice", "read")

    old_epoch = replica.epoch
    await pg.execute("INSERT INTO pdp.user_roles (tenant_id, user_id, role_id) VALUES ('t', 'alice', 'viewer')")
    xid = await _commit(pg, "UPDATE pdp.sync_meta SET epoch = gen_random_uuid()")
    assert await replica.wait_for_revision(xid, 5)
    assert replica.epoch != old_epoch
    assert _allowed(service, "alice", "read")


async def test_verifier_finds_and_repairs_a_divergent_tenant(
    service: SyncService, pg: asyncpg.Connection, db_url: str
) -> None:
    from pdp.engine import RowChange
    from sync.pg_verifier import PgVerifier

    replica = service.sync.replica
    assert await replica.wait_for_revision(await _commit(pg, "SELECT 1"), 10)
    registry = CollectorRegistry()
    verifier = PgVerifier(db_url, service.sync, Metrics(registry), interval=3600)
    await pg.execute("UPDATE pdp.change_log SET changed_at = now() - interval '9 days'"
                     " WHERE id = (SELECT min(id) FROM pdp.change_log)")  # fmt: skip
    assert await verifier.verify_once() == {"t": True}
    age = registry.get_sample_value("pdp_change_log_oldest_age_seconds")
    assert age is not None
    assert 9 * 86400 <= age < 9 * 86400 + 60

    # A write the triggers never saw (capture paused, no bulk-load marker).
    async with pg.transaction():
        await pg.execute("SET LOCAL pdp.capture = 'off'")
        await pg.execute("UPDATE pdp.users SET status = 'disabled' WHERE id = 'alice'")
    # And a corruption of the replica itself.
    engine = replica.engine
    assert engine is not None
    engine.apply([RowChange.upsert("users", ("t", "mallory", "active"))], engine.revision)
    # Both divergences are in memory: alice still active, mallory a known user.
    assert _allowed(service, "alice", "read")
    assert _reason(service, "mallory") == "no_grant"

    assert await verifier.verify_once() == {"t": False}
    # The divergent tenant was queued for a whole reload; after it, all agree again.
    assert await verifier.verify_once() == {"t": True}
    assert _reason(service, "alice") == "user_disabled"
    assert _reason(service, "mallory") == "unknown_user"


async def test_self_test_fails_loudly_when_notifications_do_not_arrive(
    db_url: str, make_db: DatabaseFactory
) -> None:
    """A listener that cannot hear the sender (as behind a transaction-mode pooler; here:
    notifications are per database, and the sender is in another one) is refused."""
    import asyncio

    from pdp.errors import DependencyError
    from sync.pg_listener import PgListener

    other = await asyncpg.connect(await make_db.create(migrated=False))
    listener = PgListener(db_url, asyncio.Event())
    await listener.connect()
    try:
        with pytest.raises(DependencyError, match="does not receive notifications"):
            await listener.self_test(other, timeout=0.5)
        # And the same listener passes when the sender shares its database.
        same = await asyncpg.connect(db_url)
        try:
            await listener.self_test(same, timeout=5)
        finally:
            await same.close()
    finally:
        await listener.close()
        await other.close()
