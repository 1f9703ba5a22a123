"""Verification in relay mode: a follower proven equal to the relay, the relay to the database.

Every `verify_interval` the leader attaches its replica's per-tenant digests to an
entry (at the entry's `from`); a follower compares its own before applying it and
reloads when they differ. The leader verifies its own replica against PostgreSQL at
the same pace and publishes a tenant that differs whole. Real PostgreSQL, a private
redis-server, real relay and follower workers.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import asyncpg
from prometheus_client import CollectorRegistry

from pdp.engine import RowChange
from pdp.metrics import Metrics, RelayMetrics
from pdp.replica import Replica
from pdp.supervisor import Lifespan, Supervisor
from sync import redis_stream as rs
from sync.options import RelayOptions, SyncOptions
from sync.redis_follower import RedisFollower
from sync.relay import Relay
from tests.redis_server import RedisServer
from tests.sync_harness import assert_equal, seed
from tests.waiting import until

STREAM = "pdp:verify"
OPTIONS = SyncOptions(poll_interval=0.1, heartbeat=1.0, backoff_initial=0.05, backoff_max=0.5)
VERIFY = 0.3  # the relay's verify and digest interval in these tests


@contextlib.asynccontextmanager
async def supervised(name: str, lifespan: Lifespan) -> AsyncIterator[None]:
    supervisor = Supervisor(backoff_initial=0.05, backoff_max=0.5)
    supervisor.add(name, lifespan, critical=True)
    async with supervisor.running():
        yield


@contextlib.asynccontextmanager
async def fleet(url: str, redis_url: str) -> AsyncIterator[tuple[Relay, RedisFollower, Metrics]]:
    """A verifying relay and one follower (with its own metrics), both running."""
    await seed(url, users=200)
    options = RelayOptions(
        stream=STREAM, election_interval=0.2, lock_heartbeat=0.5, verify_interval=VERIFY
    )
    relay = Relay(url, redis_url, RelayMetrics(CollectorRegistry()), OPTIONS, options)
    metrics = Metrics(CollectorRegistry())
    side = RedisFollower(redis_url, url, Replica(), metrics, OPTIONS, stream=STREAM)
    async with supervised("relay", relay.lifespan), supervised("follower", side.lifespan):
        await until(lambda: side.replica.ready and side.verified > 0, 15, "never verified")
        yield relay, side, metrics


def consistent(metrics: Metrics, tenant: str) -> float | None:
    return metrics.registry.get_sample_value("pdp_cache_consistent", {"tenant": tenant})


def _intruder(replica: Replica) -> str:
    """Put a user PostgreSQL does not have into `replica` (a drifted replica); its tenant."""
    engine, revision = replica.engine, replica.revision
    assert engine is not None
    assert revision is not None
    tenant = sorted(engine.tenants())[0]
    replica.apply([RowChange.upsert("users", (tenant, "intruder", "active"))], revision, 0.0)
    return tenant


async def test_a_follower_proves_it_equals_the_relay(
    db_url: str, pg: asyncpg.Connection, redis_server: RedisServer
) -> None:
    async with fleet(db_url, redis_server.url) as (_relay, side, metrics):
        tenants = side.replica.engine.tenants() if side.replica.engine else []
        assert tenants
        for tenant in tenants:
            assert consistent(metrics, tenant) == 1.0
        # Again and again (every VERIFY), never reloading: the chain holds.
        seen = side.verified
        await until(lambda: side.verified >= seen + 3, 10, "the digests stopped coming")
        assert "diverged" not in side.reloads, side.reloads
        await assert_equal(pg, side.replica)


async def test_a_follower_that_drifted_from_the_relay_reloads(
    db_url: str, pg: asyncpg.Connection, redis_server: RedisServer
) -> None:
    async with fleet(db_url, redis_server.url) as (_relay, side, metrics):
        tenant = _intruder(side.replica)
        await until(lambda: "diverged" in side.reloads, 10, "the drift was not noticed")
        # Flagged, then proven equal again after the reload.
        await until(lambda: consistent(metrics, tenant) == 1.0, 10, "not consistent again")
        await assert_equal(pg, side.replica)  # the intruder is gone


async def test_a_relay_that_drifted_from_the_database_repairs_itself_and_the_followers(
    db_url: str, pg: asyncpg.Connection, redis_server: RedisServer
) -> None:
    async with fleet(db_url, redis_server.url) as (relay, side, _metrics):
        relay_replica = relay._replica  # the leader's own, to make it drift
        assert relay_replica is not None
        relay_metrics = relay._metrics
        assert isinstance(relay_metrics, RelayMetrics)

        def repaired() -> float:
            return relay_metrics.registry.get_sample_value("pdp_cache_tenant_reloads_total") or 0

        tenant = _intruder(relay_replica)
        started = time.monotonic()
        # The relay's verifier finds it (PostgreSQL has no such user) and re-reads the
        # tenant whole; the reload reaches the follower through the stream.
        await until(lambda: repaired() >= 1, 15, "the relay did not repair its replica")
        assert time.monotonic() - started < 10
        await until(lambda: consistent(relay_metrics, tenant) == 1.0, 10, "relay not consistent")
        await assert_equal(pg, side.replica, within=15)


def test_digests_travel_in_changes_and_heartbeats_never_in_resets() -> None:
    digests = {"t1": "00000000000000ff:3", "t2": "0000000000000000:0"}
    for kind in ("changes", "heartbeat"):
        fields = rs.entry_fields(kind, "e", "1:1:", "2:2:", 5.0, digests=digests)
        entry = rs.decode_entry("1-0", dict(zip(fields[::2], fields[1::2], strict=True)))
        assert entry.digests == digests
    fields = rs.entry_fields("reset", "e", "1:1:", "2:2:", 5.0, digests=digests)
    assert "digests" not in fields
    plain = rs.entry_fields("heartbeat", "e", "1:1:", "2:2:", 5.0)
    assert rs.decode_entry("1-0", dict(zip(plain[::2], plain[1::2], strict=True))).digests is None
