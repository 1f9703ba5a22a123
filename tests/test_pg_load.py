"""A full load split over processes (`sync.pg_load`) against PostgreSQL and real children.

The parts' engines must add up to exactly the engine of a load in one process (rows,
digests, reverse indexes, decisions); the children must read the parent's snapshot,
not a later one; a child that fails in any way must cost only time (the parent reads
its part); a cancelled load must leave no child behind.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import random
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pdp.config import Settings
from pdp.engine import Engine, Snapshot
from pdp.engine.holders import Holders, Ids
from pdp.replica import Replica
from pdp.sidecar import default_load_processes, sync_options
from sync import pg_load, pg_read
from sync import pg_queries as q
from sync.options import SyncOptions
from sync.pg_sync import PgSync
from tests.waiting import until

UTC = dt.UTC
# Children that run the real program, each first leaving a file named by its pid in
# the directory given as their argument (so a test can tell they ran).
MARKED = (
    "import os, pathlib, runpy, sys; "
    "pathlib.Path(sys.argv[1], str(os.getpid())).touch(); "
    "sys.argv[1:] = []; runpy.run_module('sync.pg_load', run_name='__main__')"
)


async def _seed(pg: asyncpg.Connection, users: int = 400) -> None:
    """Two tenants of users with every shape a record takes: no grant or group, many
    grants (a scope index), attributes, statuses, expiries (infinity included)."""
    rand = random.Random(16)
    await pg.execute(
        "INSERT INTO pdp.tenants (id) VALUES ('t'), ('u');"
        "INSERT INTO pdp.roles (tenant_id, id) SELECT t, 'r' || i FROM "
        "unnest(ARRAY['t', 'u']) t, generate_series(0, 5) i;"
        "INSERT INTO pdp.role_permissions VALUES ('t', 'r0', 'doc:read'), ('t', 'r1', 'doc:write'),"
        " ('u', 'r0', 'doc:read');"
        "INSERT INTO pdp.role_inherits VALUES ('t', 'r1', 'r0');"
        "INSERT INTO pdp.groups (tenant_id, id) SELECT t, 'g' || i FROM "
        "unnest(ARRAY['t', 'u']) t, generate_series(0, 9) i;"
        "INSERT INTO pdp.group_roles (tenant_id, group_id, role_id, scope) VALUES "
        "('t', 'g0', 'r1', 'doc:*'), ('u', 'g1', 'r0', '*');"
    )
    expiries = [None, dt.datetime(2031, 1, 1, tzinfo=UTC), dt.datetime(2001, 1, 1, tzinfo=UTC),
                dt.datetime.max.replace(tzinfo=UTC)]  # fmt: skip
    user_rows: list[tuple[str, ...]] = []
    members: list[tuple[str, str, str]] = []
    grants: list[tuple[str, str, str, str, dt.datetime | None]] = []
    for tenant in ("t", "u"):
        for i in range(users):
            uid = f"user-{i}"
            attributes = f'{{"n": {i}}}' if i % 3 == 0 else "{}"
            user_rows.append((tenant, uid, "disabled" if i % 11 == 0 else "active", attributes))
            groups = rand.sample(range(10), rand.choice((0, 1, 1, 2, 3)))
            members.extend((tenant, f"g{g}", uid) for g in groups)
            many = 12 if i % 50 == 0 else rand.choice((0, 1, 1, 2))  # 12: past grants.SMALL
            for k in range(many):
                scope = rand.choice(("*", "doc:*", f"doc:{i % 7}", f"doc:{i}-{k}"))
                grants.append((tenant, uid, f"r{k % 6}", scope, rand.choice(expiries)))
    await pg.copy_records_to_table(
        "users", schema_name="pdp", records=user_rows,
        columns=["tenant_id", "id", "status", "attributes"],
    )  # fmt: skip
    await pg.copy_records_to_table("group_members", schema_name="pdp", records=members)
    await pg.executemany(
        "INSERT INTO pdp.user_roles VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING", grants
    )


@asynccontextmanager
async def _reading(url: str) -> AsyncIterator[tuple[asyncpg.Connection, Snapshot]]:
    """A connection in a REPEATABLE READ transaction, as `pg_read.read` has it."""
    conn = await asyncpg.connect(url)
    try:
        tx = conn.transaction(isolation="repeatable_read", readonly=True)
        await tx.start()
        snapshot = Snapshot.parse(await conn.fetchval("SELECT pg_current_snapshot()::text"))
        yield conn, snapshot
        await tx.rollback()
    finally:
        await conn.close()


async def _load(url: str, parts: int, **options: Any) -> Engine:
    async with _reading(url) as (conn, snapshot):
        chosen = SyncOptions(load_processes=parts, parallel_min_rows=0, **options)
        return await pg_load.build_all(conn, chosen, snapshot, url)


def _marked(monkeypatch: pytest.MonkeyPatch, marks: Path) -> None:
    monkeypatch.setattr(pg_load, "COMMAND", (sys.executable, "-c", MARKED, str(marks)))


def _marks(directory: Path, name: str | None = None) -> list[Path]:
    """The files in `directory` (named `name`)."""
    return [path for path in directory.iterdir() if name in (None, path.name)]


def _ids(ids: Ids) -> dict[str, set[str]]:
    return {key: {held} if isinstance(held, str) else set(held) for key, held in ids.items()}


def _holders(index: Holders) -> dict[str, dict[str, set[str]]]:
    return {role: _ids(by_scope) for role, by_scope in index.items()}


def assert_same(engine: Engine, expected: Engine) -> None:
    """Every row, digest, count, user record and reverse index equal (ignoring order)."""
    assert engine.tenants() == expected.tenants()
    held, wanted = engine.tables(), expected.tables()
    for entity, rows in wanted.items():
        assert sorted(held[entity], key=repr) == sorted(rows, key=repr), entity
    assert engine.counts() == expected.counts()
    mine = {state.tenant_id: state for state in engine.states()}
    for state in expected.states():
        other = mine[state.tenant_id]
        assert other.digest() == state.digest()
        assert other.users == state.users
        assert other.user_attributes == state.user_attributes
        assert _ids(other.members) == _ids(state.members)
        assert _holders(other.user_holders) == _holders(state.user_holders)


@pytest.mark.parametrize("parts", [2, 3])
async def test_a_load_in_parts_holds_what_a_load_in_one_holds(
    db_url: str, pg: asyncpg.Connection, parts: int, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    await _seed(pg)
    alone = await _load(db_url, 1)
    _marked(monkeypatch, tmp_path)
    with caplog.at_level(logging.WARNING, logger="sync.pg_load"):
        split = await _load(db_url, parts)
    assert len(_marks(tmp_path)) == parts - 1  # a child per part but the first
    assert not caplog.records  # none failed: each part came from its child
    assert_same(split, alone)
    # The digests are the database's, and the decisions those of the one-process load.
    for tenant in split.tenants():
        total, lines = await pg.fetchrow(q.TENANT_DIGEST, tenant)
        assert split.digest(tenant) == f"{int(total):016x}:{lines}"
    now = time.time()
    for tenant in ("t", "u"):
        for i in range(0, 400, 7):
            for resource in ("1", f"{i}-0", "3"):
                for action in ("read", "write"):
                    query = (tenant, f"user-{i}", "doc", resource, action, now)
                    assert split.check(*query) == alone.check(*query), query


async def test_every_part_reads_the_snapshot_of_the_load(
    db_url: str, pg: asyncpg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The child waits on a FIFO until rows were committed after the parent's snapshot:
    # it must not see them (it would without SET TRANSACTION SNAPSHOT).
    await _seed(pg, users=50)
    before = await _load(db_url, 1)
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    waits = f"open({str(gate)!r}).read(); " + MARKED
    monkeypatch.setattr(pg_load, "COMMAND", (sys.executable, "-c", waits, str(tmp_path)))
    async with _reading(db_url) as (conn, snapshot):
        options = SyncOptions(load_processes=2, parallel_min_rows=0)
        load = asyncio.create_task(pg_load.build_all(conn, options, snapshot, db_url))
        late = [("t", f"late-{i}", "active") for i in range(40)]
        await pg.executemany(
            "INSERT INTO pdp.users (tenant_id, id, status) VALUES ($1, $2, $3)", late
        )
        in_child = await pg.fetchval(
            "SELECT count(*) FROM pdp.users WHERE id LIKE 'late-%' "
            "AND (hashtext(id) & 2147483647) % 2 = 1"
        )
        assert in_child > 0  # some of them fall in the child's part
        await asyncio.to_thread(gate.write_text, "go")
        engine = await load
    assert len(_marks(tmp_path)) == 2  # the FIFO and the child's mark
    users = {str(row[1]) for row in engine.tables()["users"]}
    assert users
    assert not any(user.startswith("late-") for user in users)
    assert_same(engine, before)


FAILING = {
    "exits": "import sys; sys.exit(3)",
    "writes no image": "import sys; sys.stdout.write('not an image'); sys.exit(0)",
    "writes half an image": (
        "import asyncio, json, sys, io; from sync import pg_load; from pdp.engine import image; "
        "asked = json.loads(sys.stdin.readline()); out = io.BytesIO(); "
        "image.dump(asyncio.run(pg_load.build(asked)), out); "
        "sys.stdout.buffer.write(out.getvalue()[: len(out.getvalue()) // 2])"
    ),
    "reads another snapshot": (
        "import asyncio, json, sys; from sync import pg_load; "
        "asked = json.loads(sys.stdin.readline()); asked['snapshot'] = '00000009-00000009-9'; "
        "asyncio.run(pg_load.build(asked))"
    ),
}


@pytest.mark.parametrize("failure", list(FAILING))
async def test_a_part_whose_child_fails_is_read_by_the_parent(
    db_url: str, pg: asyncpg.Connection, failure: str,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    await _seed(pg, users=120)
    alone = await _load(db_url, 1)
    monkeypatch.setattr(pg_load, "COMMAND", (sys.executable, "-c", FAILING[failure]))
    with caplog.at_level(logging.WARNING, logger="sync.pg_load"):
        split = await _load(db_url, 2)
    assert_same(split, alone)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1
    assert "part 2 of 2" in said[0]
    assert "reading that part here" in said[0]
    if failure == "reads another snapshot":
        assert "snapshot" in said[0]  # the child's own line, passed on


async def test_a_child_that_cannot_start_is_read_by_the_parent(
    db_url: str, pg: asyncpg.Connection, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    await _seed(pg, users=60)
    monkeypatch.setattr(pg_load, "COMMAND", (str(tmp_path / "no-such-program"),))
    with caplog.at_level(logging.WARNING, logger="sync.pg_load"):
        split = await _load(db_url, 2)
    assert_same(split, await _load(db_url, 1))
    assert any("did not start" in r.getMessage() for r in caplog.records)


async def test_a_cancelled_load_leaves_no_child(
    db_url: str, pg: asyncpg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _seed(pg, users=60)
    hangs = (
        "import os, pathlib, signal, sys; "
        "pathlib.Path(sys.argv[1], str(os.getpid())).touch(); signal.pause()"
    )
    monkeypatch.setattr(pg_load, "COMMAND", (sys.executable, "-c", hangs, str(tmp_path)))
    async with _reading(db_url) as (conn, snapshot):
        options = SyncOptions(load_processes=3, parallel_min_rows=0)
        load = asyncio.create_task(pg_load.build_all(conn, options, snapshot, db_url))
        await until(lambda: len(_marks(tmp_path)) == 2 or load.done(), 30)
        assert not load.done()  # both children started, and the load waits on them
        load.cancel()
        with pytest.raises(asyncio.CancelledError):
            await load
    pids = [int(mark.name) for mark in _marks(tmp_path)]
    assert len(pids) == 2
    for pid in pids:  # killed and reaped before the load's cancellation completed
        assert not _marks(Path("/proc"), str(pid)), pid


async def test_small_or_on_demand_loads_start_no_child(
    db_url: str, pg: asyncpg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _seed(pg, users=60)
    _marked(monkeypatch, tmp_path)
    alone = await _load(db_url, 1)
    async with _reading(db_url) as (conn, snapshot):
        small = SyncOptions(load_processes=4, parallel_min_rows=10**9)
        assert_same(await pg_load.build_all(conn, small, snapshot, db_url), alone)
        lean = SyncOptions(load_processes=4, parallel_min_rows=0, on_demand=True)
        built = await pg_load.build_all(conn, lean, snapshot, db_url)
    assert built.counts()["users"] == 0
    assert not _marks(tmp_path)


async def test_the_sync_worker_loads_in_parts_from_its_url(
    db_url: str, pg: asyncpg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _seed(pg, users=150)
    _marked(monkeypatch, tmp_path)
    replica = Replica()
    sync = PgSync(db_url, replica, options=SyncOptions(load_processes=2, parallel_min_rows=0))
    try:
        await sync.catch_up()
    finally:
        await sync.close()
    assert len(_marks(tmp_path)) == 1
    assert replica.engine is not None
    assert_same(replica.engine, await _load(db_url, 1))


def test_load_processes_setting() -> None:
    assert Settings.from_env({"PDP_LOAD_PROCESSES": "3"}).load_processes == 3
    assert sync_options(Settings.from_env({"PDP_LOAD_PROCESSES": "1"})).load_processes == 1
    assert sync_options(Settings()).load_processes == default_load_processes()
    assert 1 <= default_load_processes() <= min(4, len(os.sched_getaffinity(0)))
    with pytest.raises(Exception, match="PDP_LOAD_PROCESSES"):
        Settings.from_env({"PDP_LOAD_PROCESSES": "0"})


async def test_a_tenant_reload_is_built_as_its_rows_arrive(
    db_url: str, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _seed(pg, users=80)
    monkeypatch.setattr(pg_load, "CHUNK_ROWS", 7)  # every table in several pieces
    async with _reading(db_url) as (conn, _):
        state = await pg_load.build_tenant(conn, "t", on_demand=False)
        rows = {
            e: [tuple(r) for r in await conn.fetch(sql, "t")] for e, sql in q.TENANT_ROWS.items()
        }
    expected = Engine.tenant_state("t", rows)
    assert state.digest() == expected.digest()
    assert state.count == expected.count
    assert state.users == expected.users
    assert _ids(state.members) == _ids(expected.members)
    assert _holders(state.user_holders) == _holders(expected.user_holders)
    # Read as a catch-up: built when the read builds, as rows for a sink otherwise.
    epoch = await pg.fetchval("SELECT epoch::text FROM pdp.sync_meta")
    now = Snapshot.parse(await pg.fetchval("SELECT pg_current_snapshot()::text"))
    cursor = pg_read.Cursor(now, epoch)
    for build in (True, False):
        batch = await pg_read.read(
            pg, cursor, SyncOptions(), time.monotonic(), reload_tenants={"t"}, build=build
        )
        assert set(batch.tenants) == {"t"}
        if build:
            assert batch.built["t"].digest() == expected.digest()
            assert batch.tenants["t"] == {}  # no rows held beside the state
        else:
            assert not batch.built
            assert sum(map(len, batch.tenants["t"].values())) == sum(map(len, rows.values()))


async def test_a_big_tenant_reload_gets_the_full_read_timeout(
    db_url: str, pg: asyncpg.Connection
) -> None:
    # A tenant read whole takes as long as a full load of it: the catch-up's short read
    # bound must not cut it off (it did, and every retry timed out the same way).
    await pg.execute(
        "INSERT INTO pdp.tenants (id) VALUES ('t');"
        "INSERT INTO pdp.roles (tenant_id, id) VALUES ('t', 'viewer');"
    )
    users = [("t", f"user-{i}", "active") for i in range(60_000)]
    await pg.copy_records_to_table(
        "users", schema_name="pdp", records=users, columns=["tenant_id", "id", "status"]
    )
    grants = [("t", f"user-{i}", "viewer", f"doc:{i}") for i in range(60_000)]
    await pg.copy_records_to_table(
        "user_roles", schema_name="pdp", records=grants,
        columns=["tenant_id", "user_id", "role_id", "scope"],
    )  # fmt: skip
    bound = 0.2
    replica = Replica()
    sync = PgSync(db_url, replica, options=SyncOptions(read_timeout=bound))
    try:
        await sync.catch_up()  # the first load (a full read: its own timeout)
        sync.reload_tenant("t")
        started = time.monotonic()
        await sync.catch_up()
        took = time.monotonic() - started
    finally:
        await sync.close()
    assert took > bound  # so the reload did outlast the read bound
    assert replica.engine is not None
    total, lines = await pg.fetchrow(q.TENANT_DIGEST, "t")
    assert replica.engine.digest("t") == f"{int(total):016x}:{lines}"
    assert lines == 120_002
