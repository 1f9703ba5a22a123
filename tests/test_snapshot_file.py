"""PDP_SNAPSHOT_FILE against a real PostgreSQL: restart from the file, then catch up.

Each test runs a supervised sidecar with a snapshot file, stops it (a clean shutdown
writes the file: the `saved` fixture), changes the database while it is down, starts
a new sidecar on the same file and checks that it equals the database, and how it
got there (caught up from the file, or reloaded whole and why).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from pdp.engine import Engine
from pdp.metrics import Metrics
from pdp.readiness import Health
from pdp.replica import Replica
from pdp.supervisor import Supervisor
from sync import pg_retention
from sync.file_snapshot import SnapshotFile
from sync.options import SyncOptions
from sync.pg_sync import PgSync
from sync.service import SyncService
from tests.sync_harness import assert_equal, current_xid, horizon_passed, random_write, seed, settle

HOUR = 3600.0


@dataclass
class Run:
    replica: Replica
    metrics: Metrics
    file: SnapshotFile

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def sidecar(
    url: str, path: Path, *, interval: float = HOUR, max_age: float = HOUR
) -> AsyncIterator[Run]:
    """A sidecar with a snapshot file at `path`; leaving it is a clean shutdown."""
    metrics = Metrics(CollectorRegistry())
    replica = Replica()
    file = SnapshotFile(path, interval, max_age, metrics)
    options = SyncOptions(poll_interval=0.2, heartbeat=1.0, backoff_initial=0.05, backoff_max=0.5)
    service = SyncService(url, replica, metrics, options, snapshot_file=file)
    supervisor = Supervisor(backoff_initial=0.05, backoff_max=0.5)
    supervisor.add("sync", service.lifespan, critical=True)
    async with supervisor.running():
        yield Run(replica, metrics, file)


@pytest.fixture
async def saved(db_url: str, pg: asyncpg.Connection, tmp_path: Path) -> Path:
    """The path of a snapshot file a first sidecar wrote at its clean shutdown."""
    await seed(db_url)
    path = tmp_path / "replica.pdpsnap"
    async with sidecar(db_url, path) as run:
        await settle(pg, run.replica)
        assert _size(path) == 0  # the interval is an hour: only the shutdown writes
    assert run.file.writes == 1
    assert _size(path) > 0
    return path


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


async def _write_while_down(pg: asyncpg.Connection, n: int = 40) -> int:
    rng = random.Random(n)
    xid = 0
    for _ in range(n):
        async with pg.transaction():
            await random_write(pg, rng)
            xid = int(await pg.fetchval("SELECT pg_current_xact_id()::text::bigint"))
    return xid


async def test_restart_from_the_file_catches_up_with_writes_made_while_down(
    db_url: str, pg: asyncpg.Connection, saved: Path
) -> None:
    written = await _write_while_down(pg)
    async with sidecar(db_url, saved) as run:
        assert await run.replica.wait_for_revision(written, 10)
        await assert_equal(pg, run.replica)
        assert run.sample("pdp_snapshot_file_loads_total", result="loaded") == 1
        # Caught up from the file's snapshot: no full load from PostgreSQL at all.
        assert run.sample("pdp_sync_full_reloads_total", reason="bootstrap") == 0
        engine = run.replica.engine
        assert engine is not None
        copy = Engine.build(engine.tables(), engine.revision)
        assert {t: copy.digest(t) for t in copy.tenants()} == {
            t: engine.digest(t) for t in engine.tenants()
        }
    assert run.file.writes == 1  # the shutdown wrote the caught-up state


async def test_a_restored_file_is_not_ready_until_a_catch_up_proves_it(
    db_url: str, pg: asyncpg.Connection, saved: Path
) -> None:
    replica = Replica()
    frozen = gc.get_freeze_count()
    assert await SnapshotFile(saved, HOUR, HOUR).restore(replica)
    assert gc.get_freeze_count() > frozen  # the restored engine is out of the collector's way
    health = Health(replica, max_staleness=5.0)
    assert replica.engine is not None
    assert health.readiness().reason == "stale"
    assert replica.staleness() == float("inf")
    sync = PgSync(db_url, replica)
    try:
        await sync.catch_up()  # from the file's snapshot
    finally:
        await sync.close()
    assert health.readiness().ready
    assert sync.fast_catchups == 1  # a catch-up, not a reload


async def test_a_file_from_another_epoch_is_not_trusted(
    db_url: str, pg: asyncpg.Connection, saved: Path
) -> None:
    await _write_while_down(pg)
    await pg.execute("UPDATE pdp.sync_meta SET epoch = gen_random_uuid()")
    async with sidecar(db_url, saved) as run:
        await assert_equal(pg, run.replica)
        assert run.sample("pdp_snapshot_file_loads_total", result="loaded") == 1
        assert run.sample("pdp_sync_full_reloads_total", reason="epoch") == 1
        assert run.replica.epoch == await pg.fetchval("SELECT epoch::text FROM pdp.sync_meta")


async def test_a_file_older_than_the_purge_horizon_reloads(
    db_url: str, pg: asyncpg.Connection, saved: Path
) -> None:
    written = await _write_while_down(pg)
    await horizon_passed(pg, written)
    result = await pg_retention.prune(pg, retention_seconds=0)
    assert result.horizon is not None
    async with sidecar(db_url, saved) as run:
        await assert_equal(pg, run.replica)
        assert run.sample("pdp_sync_full_reloads_total", reason="purged") == 1


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def _version_1(path: Path) -> None:
    """A file as the previous format wrote it (rows, not an image): valid, but refused."""
    data = bytearray(path.read_bytes()[:-32])
    data[8:12] = (1).to_bytes(4, "big")
    path.write_bytes(bytes(data) + hashlib.sha256(data).digest())


def _foreign(path: Path) -> None:
    path.write_text("tenant,user\nt,alice\n")


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [_flip_a_byte, _truncate, _version_1, _foreign, _empty])
async def test_a_corrupt_or_foreign_file_warns_once_then_loads_normally(
    db_url: str,
    pg: asyncpg.Connection,
    saved: Path,
    caplog: pytest.LogCaptureFixture,
    damage: object,
) -> None:
    await _write_while_down(pg)
    assert callable(damage)
    damage(saved)
    caplog.set_level(logging.INFO, logger="sync.file_snapshot")
    async with sidecar(db_url, saved) as run:
        await assert_equal(pg, run.replica)
        assert run.sample("pdp_snapshot_file_loads_total", result="corrupt") == 1
        assert run.sample("pdp_sync_full_reloads_total", reason="bootstrap") == 1
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "ignored" in warnings[0].getMessage()
    if damage is _version_1:
        assert "format version is 1, this pdp reads 2" in warnings[0].getMessage()
    assert _size(saved) > 100  # the shutdown wrote a good file again


async def test_a_file_older_than_the_max_age_is_not_used(
    db_url: str, pg: asyncpg.Connection, saved: Path
) -> None:
    async with sidecar(db_url, saved, max_age=0.001) as run:
        await assert_equal(pg, run.replica)
        assert run.sample("pdp_snapshot_file_loads_total", result="expired") == 1
        assert run.sample("pdp_sync_full_reloads_total", reason="bootstrap") == 1


async def test_periodic_writes_do_not_block_the_event_loop(
    db_url: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """While files are written (every 0.1 s here), the loop keeps turning: its longest
    pause stays well under one write's duration."""
    await seed(db_url, users=60_000)
    path = tmp_path / "replica.pdpsnap"
    async with sidecar(db_url, path, interval=0.1) as run:
        await settle(pg, run.replica, within=60)
        longest = 0.0
        writes = run.file.writes
        stop = asyncio.Event()
        writer = asyncio.create_task(_commit_every(pg, 0.05, stop))  # new revisions to write
        try:
            async with asyncio.timeout(60):
                while run.file.writes < writes + 3:
                    before = time.perf_counter()
                    await asyncio.sleep(0.005)
                    longest = max(longest, time.perf_counter() - before - 0.005)
        finally:
            # Not cancelled: a cancel landing between BEGIN and its reply would leave the
            # shared connection inside a transaction that never commits.
            stop.set()
            await writer
        write_seconds = run.sample("pdp_snapshot_file_write_seconds")
        await assert_equal(pg, run.replica)
    assert write_seconds > 0
    # A write on the loop would pause it for at least the whole write.
    assert longest < write_seconds * 0.75, (longest, write_seconds)


async def _commit_every(pg: asyncpg.Connection, seconds: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await current_xid(pg)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)


async def test_a_write_that_fails_is_logged_and_the_sidecar_goes_on(
    db_url: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    await seed(db_url, users=50)
    gone = tmp_path / "gone"
    gone.mkdir()
    async with sidecar(db_url, gone / "replica.pdpsnap", interval=0.05) as run:
        await settle(pg, run.replica)
        gone.rename(tmp_path / "moved")  # atomic, unlike removing it while files come and go
        async with asyncio.timeout(10):
            while run.sample("pdp_snapshot_file_writes_total", result="error") == 0:
                attempted = run.file.attempted
                await current_xid(pg)  # a new revision: the next save writes
                await attempted.wait()
        await assert_equal(pg, run.replica)
        assert run.replica.staleness() < 5.0
