"""PDP_READ_DATABASE_URL against a real streaming replica the test starts.

A private primary cluster (initdb, unix socket only) and a `pg_basebackup -R` copy of
it as a hot standby; the primary is migrated with `pdp migrate`. The sidecar LISTENs
on the primary and reads the standby: it bootstraps, follows writes once the standby
replays them, and a revision token the standby has not replayed (replay paused) waits
for the replay instead of answering early; staleness grows while the standby lags.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pytest_aiohttp import AiohttpClient

from pdp.config import Settings
from pdp.engine import Snapshot
from pdp.errors import ConfigError
from pdp.replica import Replica
from pdp.sidecar import sidecar_app
from pdp.web.app import REPLICA
from sync.options import SyncOptions
from sync.pg_sync import covers
from sync.pg_verifier import PgVerifier
from sync.service import SyncService
from tests.sync_harness import assert_equal, current_xid, seed
from tests.waiting import until_true as _until

BIN = Path("/usr/lib/postgresql/15/bin")
pytestmark = pytest.mark.skipif(not (BIN / "initdb").exists(), reason="no PostgreSQL 15 binaries")
BODY = {
    "subject": {"type": "user", "id": "u", "properties": {"tenant": "t"}},
    "action": {"name": "write"},
    "resource": {"type": "doc", "id": "1"},
}


def _as_postgres(*args: str | Path) -> None:
    cmd = [str(a) for a in args]
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)


def _url(sockets: Path, port: int) -> str:
    return f"postgresql://postgres@/postgres?host={sockets}&port={port}"


@pytest.fixture
def cluster() -> Iterator[tuple[str, str]]:
    """(primary URL, standby URL): a streaming replica pair, the primary migrated."""
    # Not under pytest's basetemp (mode 0700, root's): the postgres user must reach it.
    root = Path(tempfile.mkdtemp(prefix="pdp-replica-"))
    sockets = root / "sock"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    primary, standby = root / "primary", root / "standby"
    # Unix sockets only (listen_addresses empty): the port only names the socket file.
    # No TCP port is bound, and the socket directory is private: no port can collide.
    ports = (5432, 5433)
    options = f"-c listen_addresses='' -k {sockets} -c wal_level=replica"
    _as_postgres(BIN / "initdb", "-D", primary, "-U", "postgres", "--auth=trust")
    started: list[Path] = []
    try:
        _as_postgres(
            BIN / "pg_ctl",
            "-D",
            primary,
            "-l",
            root / "primary.log",
            "-w",
            "-o",
            f"{options} -p {ports[0]}",
            "start",
        )
        started.append(primary)
        _as_postgres(
            BIN / "pg_basebackup", "-h", sockets, "-p", str(ports[0]), "-U", "postgres",
            "-D", standby, "-R", "-X", "stream",
        )  # fmt: skip
        _as_postgres(
            BIN / "pg_ctl",
            "-D",
            standby,
            "-l",
            root / "standby.log",
            "-w",
            "-o",
            f"{options} -p {ports[1]}",
            "start",
        )
        started.append(standby)
        primary_url = _url(sockets, ports[0])
        env = {**os.environ, "PDP_DATABASE_URL": primary_url}
        subprocess.run(
            [sys.executable, "-m", "pdp", "migrate"], check=True, env=env, timeout=120,
            capture_output=True,
        )  # fmt: skip
        yield primary_url, _url(sockets, ports[1])
    finally:
        for data in started:
            _as_postgres(BIN / "pg_ctl", "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


async def _committed_xid(pg: asyncpg.Connection, sql: str) -> int:
    async with pg.transaction():
        await pg.execute(sql)
        return int(await pg.fetchval("SELECT pg_current_xact_id()::text"))


@pytest.fixture
async def pair(cluster: tuple[str, str]) -> AsyncIterator[tuple[str, str, Any, Any]]:
    primary_url, standby_url = cluster
    primary = await asyncpg.connect(primary_url)
    standby = await asyncpg.connect(standby_url)
    try:
        yield primary_url, standby_url, primary, standby
    finally:
        await primary.close()
        await standby.close()


async def test_sidecar_reads_a_hot_standby(
    pair: tuple[str, str, Any, Any], aiohttp_client: AiohttpClient
) -> None:
    primary_url, standby_url, primary, standby = pair
    assert await standby.fetchval("SELECT pg_is_in_recovery()")
    await primary.execute(
        """INSERT INTO pdp.tenants (id) VALUES ('t');
           INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'u');
           INSERT INTO pdp.roles (tenant_id, id) VALUES ('t', 'writer');
           INSERT INTO pdp.role_permissions VALUES ('t', 'writer', 'doc:write');"""
    )
    settings = Settings(
        read_database_url=standby_url, max_staleness_seconds=60.0, poll_interval_seconds=0.2,
        heartbeat_seconds=0.5, verify_interval_seconds=0.5, consistency_wait_ms=20_000,
    )  # fmt: skip
    client = await aiohttp_client(sidecar_app(settings, primary_url))
    replica = client.app[REPLICA]

    async def decision(headers: dict[str, str] | None = None) -> Any:
        resp = await client.post("/access/v1/evaluation", json=BODY, headers=headers or {})
        assert resp.status == 200, await resp.text()
        return await resp.json()

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200

    await _until(ready, 30)  # bootstrapped from the standby
    sessions = "SELECT array_agg(application_name::text) FROM pg_stat_activity"
    assert "pdp-sync" in await standby.fetchval(sessions)
    on_primary = await primary.fetchval(sessions)
    assert "pdp-listen" in on_primary
    assert "pdp-sync" not in on_primary
    assert (await decision())["decision"] is False

    # A write on the primary shows once the standby replays it (the doorbell rings on
    # the primary, possibly before the replay: the catch-up retries until it is in).
    xid = await _committed_xid(
        primary,
        "INSERT INTO pdp.user_roles (tenant_id, user_id, role_id) VALUES ('t','u','writer')",
    )
    answer = await decision({"X-PDP-Min-Revision": str(xid)})
    assert answer["decision"] is True
    assert answer.get("context", {}).get("reason") != "consistent_fallback", answer

    # Replay paused: a token the standby has not replayed waits, memory is not asked.
    await standby.execute("SELECT pg_wal_replay_pause()")

    async def paused() -> bool:
        state = await standby.fetchval("SELECT pg_get_wal_replay_pause_state()")
        return bool(state == "paused")

    await _until(paused, 10)
    xid = await _committed_xid(primary, "DELETE FROM pdp.user_roles WHERE user_id = 'u'")
    waiting = asyncio.create_task(decision({"X-PDP-Min-Revision": str(xid)}))
    # Honest staleness: the standby's data is not proven current past the pause.
    started = time.monotonic()

    async def stale() -> bool:
        return replica.staleness() > 1.0

    await _until(stale, 10)
    # The lag SREs alert on: the oldest primary snapshot the standby has not replayed.
    await _until(lambda: _lag_above(client, 0.5), 10)
    assert not waiting.done(), "answered before the standby replayed the revision"
    assert not replica.has_revision(xid)
    assert (await decision())["decision"] is True  # without a token: the standby's state
    assert time.monotonic() - started < 15  # still well within the 20 s consistency wait
    await standby.execute("SELECT pg_wal_replay_resume()")
    answer = await asyncio.wait_for(waiting, 15)
    assert answer["decision"] is False
    assert answer.get("context", {}).get("reason") != "consistent_fallback", answer

    async def fresh() -> bool:
        return replica.staleness() < 1.0

    await _until(fresh, 10)
    await _until(lambda: _lag_above(client, 0.0, caught_up=True), 10)
    # The verifier (reading the standby too) found nothing to repair; and at the end the
    # sidecar equals the primary.
    await _until(lambda: _verified(client), 15)
    # A bulk-loaded tenant (a per-tenant reload, read from the standby too).
    await seed(primary_url, users=200)
    await assert_equal(primary, replica, checks=200)


async def _lag_above(client: Any, seconds: float, *, caught_up: bool = False) -> bool:
    """Whether pdp_read_replica_lag_seconds exceeds `seconds` (caught_up: equals 0)."""
    text = await (await client.get("/metrics")).text()
    lines = [ln for ln in text.splitlines() if ln.startswith("pdp_read_replica_lag_seconds ")]
    assert len(lines) == 1, lines
    lag = float(lines[0].split()[1])
    return lag == 0.0 if caught_up else lag > seconds


async def _verified(client: Any) -> bool:
    text = await (await client.get("/metrics")).text()
    return 'pdp_cache_consistent{tenant="t"} 1.0' in text


def test_covers() -> None:
    """A read covers a sample when everything the sample shows committed, it shows too."""
    sample = Snapshot.parse("10:14:11,13")  # 12 committed, 11 and 13 running
    assert covers(Snapshot.parse("10:14:11,13"), sample)
    assert covers(Snapshot.parse("14:14:"), sample)
    assert not covers(Snapshot.parse("10:12:11"), sample)  # 12 not yet replayed
    assert not covers(Snapshot.parse("10:14:12"), sample)  # 12 seen running
    assert covers(Snapshot.parse("10:12:11"), Snapshot.parse("10:14:11,12,13"))


async def test_a_notification_before_the_replay_is_not_lost(
    pair: tuple[str, str, Any, Any],
) -> None:
    """Polls 30 s apart: after the standby resumes, the change arrives with no poll or wake.

    The notification rang while the standby had not replayed the write; the catch-up
    then found nothing new and must retry until the standby's snapshot covers the
    primary's, not leave the change for the next poll.
    """
    primary_url, standby_url, primary, standby = pair
    replica = Replica()
    options = SyncOptions(poll_interval=30.0, heartbeat=0.5)
    service = SyncService(primary_url, replica, options=options, read_url=standby_url)
    async with service.lifespan() as body:
        running = asyncio.create_task(body())
        try:
            assert await replica.wait_for_revision(await current_xid(primary), 30)
            await standby.execute("SELECT pg_wal_replay_pause()")

            async def paused() -> bool:
                state = await standby.fetchval("SELECT pg_get_wal_replay_pause_state()")
                return bool(state == "paused")

            await _until(paused, 10)
            catchups = service.sync.catchups
            xid = await _committed_xid(primary, "INSERT INTO pdp.tenants (id) VALUES ('t2')")

            async def retried() -> bool:  # the doorbell rang and catch-ups keep coming
                return service.sync.catchups > catchups + 3

            await _until(retried, 10)
            assert not replica.has_revision(xid)
            await standby.execute("SELECT pg_wal_replay_resume()")
            assert await replica.wait_for_revision(xid, 8)
            # The verifier compares at the catch-up's exported snapshot: the standby's.
            verifier = PgVerifier(standby_url, service.sync, None, 3600)
            assert await verifier.verify_once() == {"t2": True}
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running


def test_read_url_needs_direct_mode() -> None:
    env = {
        "PDP_READ_DATABASE_URL": "postgresql://standby/pdp",
        "PDP_SYNC_SOURCE": "redis",
        "PDP_REDIS_URL": "redis://127.0.0.1:6379",
    }
    with pytest.raises(ConfigError, match="PDP_READ_DATABASE_URL"):
        Settings.from_env(env)
