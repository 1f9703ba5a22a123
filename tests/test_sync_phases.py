"""Where propagation goes: each doorbell-woken catch-up reports its phases
(`pdp_sync_phase_seconds{phase}`: notify, wait, read, apply), against real PostgreSQL."""

from __future__ import annotations

import asyncio

import asyncpg
from prometheus_client import CollectorRegistry

from pdp.metrics import Metrics
from pdp.replica import Doorbell, Replica
from sync.options import SyncOptions
from sync.service import SyncService
from tests.sync_harness import current_xid, seed


def _count(metrics: Metrics, phase: str) -> float:
    value = metrics.registry.get_sample_value("pdp_sync_phase_seconds_count", {"phase": phase})
    return value or 0.0


async def test_a_notified_commit_reports_every_phase(db_url: str, pg: asyncpg.Connection) -> None:
    await seed(db_url, users=50)
    replica, metrics = Replica(), Metrics(CollectorRegistry())
    # Polls 60 s apart: the catch-ups below are the doorbell's (the NOTIFY's).
    service = SyncService(db_url, replica, metrics, SyncOptions(poll_interval=60.0))
    async with service.lifespan() as body:
        task = asyncio.create_task(body())
        try:
            await asyncio.wait_for(replica.wait_for_revision(await current_xid(pg), 30), 31)
            before = {p: _count(metrics, p) for p in ("notify", "wait", "read", "apply")}
            for i in range(5):
                await pg.execute(
                    "INSERT INTO pdp.users (tenant_id, id) VALUES ('tenant-1', $1)", f"new-{i}"
                )
                assert await replica.wait_for_revision(await current_xid(pg), 10)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    for phase in ("notify", "wait", "read", "apply"):
        assert _count(metrics, phase) > before[phase], phase
    notify = metrics.registry.get_sample_value("pdp_sync_phase_seconds_sum", {"phase": "notify"})
    assert notify is not None
    assert 0 <= notify < 10 * _count(metrics, "notify")  # seconds each at most, not hours


def test_the_doorbell_remembers_its_first_ring_until_cleared() -> None:
    bell = Doorbell()
    assert bell.rang is None
    bell.set()
    first = bell.rang
    assert first is not None
    bell.set()  # rung again before anyone answered: the first ring counts
    assert bell.rang == first
    bell.clear()
    assert bell.rang is None
    assert not bell.is_set()
