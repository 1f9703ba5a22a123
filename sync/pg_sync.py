"""Keep a Replica equal to PostgreSQL: bootstrap, snapshot-diff catch-up, reloads.

The algorithm of DESIGN.md section 3 (research/sync.md section 7):
- the cursor is the PostgreSQL snapshot the replica reflects, never an id;
- a catch-up runs in one REPEATABLE READ, READ ONLY transaction: read the new
  snapshot, select change-log rows visible now and not in the cursor's snapshot,
  re-read the current rows for their keys, commit, then apply everything in one
  synchronous call (no await), so order of commits never matters;
- a full reload replaces everything when the epoch changed, the change log was
  purged past the cursor, a TRUNCATE marker arrived, or a batch is too large;
  a bulk-load marker reloads just its tenant.

Catch-ups are single-flight (only `run` performs them) and coalesced (one wake
event). The listener (sync.pg_listener) and the poll tick set the event.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg

from pdp.engine import COLUMNS, KEY_WIDTH, Engine, Row, RowChange, Snapshot
from pdp.pg.errors import DRIVER_ERRORS
from pdp.replica import Replica
from sync import pg_queries as q

log = logging.getLogger(__name__)


class SyncMetrics(Protocol):
    """What the worker reports; pdp.metrics.Metrics implements it."""

    def observe_propagation(self, seconds: float) -> None: ...
    def changes_applied(self, n: int) -> None: ...
    def catchup(self, seconds: float) -> None: ...
    def full_reload(self, reason: str) -> None: ...
    def snapshot_loaded(self, seconds: float) -> None: ...
    def tenant_reloaded(self) -> None: ...


class NullMetrics:
    """Reports nowhere (tools and tests that do not look at metrics)."""

    def observe_propagation(self, seconds: float) -> None: ...
    def changes_applied(self, n: int) -> None: ...
    def catchup(self, seconds: float) -> None: ...
    def full_reload(self, reason: str) -> None: ...
    def snapshot_loaded(self, seconds: float) -> None: ...
    def tenant_reloaded(self) -> None: ...


@dataclass(frozen=True, slots=True)
class SyncOptions:
    poll_interval: float = 1.0
    min_interval: float = 0.005  # between catch-up starts: coalesces bursts of commits
    max_batch_keys: int = 50_000
    backoff_initial: float = 0.1
    backoff_max: float = 10.0
    connect_timeout: float = 5.0
    # Client-side bounds: a half-open link raises nothing, so a read must time out.
    read_timeout: float = 10.0
    full_read_timeout: float = 600.0
    statement_timeout_ms: int = 600_000


@dataclass(slots=True)
class Probe:
    """A verifier's request: share the next catch-up's snapshot, then report digests.

    `attach(snapshot_id)` runs while the catch-up transaction is still open, so the
    verifier can import the exported snapshot; `done` then receives the snapshot and
    the engine's digest of every tenant, taken right after that snapshot was applied.
    """

    attach: Callable[[str], Awaitable[None]]
    done: asyncio.Future[tuple[Snapshot, dict[str, str]]]


@dataclass(slots=True)
class Batch:
    """What one catch-up transaction read, ready to apply without awaiting."""

    snapshot: Snapshot
    epoch: str
    started: float
    full: dict[str, list[Row]] | None = None
    reload_reason: str = ""
    tenants: dict[str, dict[str, list[Row]]] = field(default_factory=dict)
    changes: list[RowChange] = field(default_factory=list)
    committed_at: list[float] = field(default_factory=list)  # one wall time per transaction


def key_tuple(entity: str, key: dict[str, Any]) -> tuple[str, ...]:
    """A change_log key (the primary key as a JSON object) as the engine's key tuple."""
    return tuple(str(key[col]) for col in COLUMNS[entity][: KEY_WIDTH[entity]])


class PgSync:
    """Owns the query connection and the catch-up loop for one Replica."""

    def __init__(
        self,
        url: str,
        replica: Replica,
        metrics: SyncMetrics | None = None,
        options: SyncOptions | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._url = url
        self._replica = replica
        self._metrics = metrics or NullMetrics()
        self._options = options or SyncOptions()
        self._clock = clock
        self._wall = wall
        self._conn: asyncpg.Connection | None = None
        self.catchups = 0  # completed catch-ups, for tests and logs
        self.fast_catchups = 0  # of which done by the one-statement path
        self.caught_up = asyncio.Event()  # set after every successful catch-up
        self._probes: list[Probe] = []
        self._reload_tenants: set[str] = set()

    def probe(
        self, attach: Callable[[str], Awaitable[None]]
    ) -> Awaitable[tuple[Snapshot, dict[str, str]]]:
        """Ask the next catch-up to export its snapshot to `attach` (see Probe)."""
        done: asyncio.Future[tuple[Snapshot, dict[str, str]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._probes.append(Probe(attach, done))
        self._replica.wake.set()
        return done

    def reload_tenant(self, tenant: str) -> None:
        """Re-read this tenant whole in the next catch-up (the verifier found it differs)."""
        self._reload_tenants.add(tenant)
        self._replica.wake.set()

    # -- connections ---------------------------------------------------------

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(
                self._url,
                timeout=self._options.connect_timeout,
                server_settings={
                    "application_name": "pdp-sync",
                    "statement_timeout": str(self._options.statement_timeout_ms),
                    "idle_in_transaction_session_timeout": "60000",
                },
            )
        return self._conn

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close(timeout=2)

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    # -- the loop ------------------------------------------------------------

    async def run(self) -> None:
        """Catch up whenever woken, and at least every poll interval, forever."""
        wake = self._replica.wake
        backoff = self._options.backoff_initial
        while True:
            started = self._clock()
            try:
                await self.catch_up()
                backoff = self._options.backoff_initial
            except Exception as exc:  # the loop must outlive any one failure
                if isinstance(exc, DRIVER_ERRORS):
                    log.warning("catch-up failed (%s: %s); retrying", type(exc).__name__, exc)
                else:
                    log.exception("catch-up failed unexpectedly; retrying")
                self._drop_connection()
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, self._options.backoff_max)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self._options.poll_interval)
            # Under a stream of commits, gather a few milliseconds of them per catch-up
            # instead of one transaction each: bounded extra latency, far less work.
            rest = started + self._options.min_interval - self._clock()
            if rest > 0:
                await asyncio.sleep(rest)

    async def catch_up(self) -> None:
        """One catch-up (or the first load): read in one snapshot, then apply at once.

        On failure the query connection is dropped; the next call reconnects and
        retries from the same cursor (idempotent).
        """
        # Clear before reading: a notification arriving during the read wakes us again.
        self._replica.wake.clear()
        probes, self._probes = self._probes, []
        try:
            batch = None if probes or self._reload_tenants else await self._read_fast()
            if batch is None:
                batch = await self._read(probes)
            else:
                self.fast_catchups += 1
            await self._apply(batch)
        except BaseException as exc:
            self._drop_connection()
            for probe in probes:
                if not probe.done.done():
                    probe.done.set_exception(exc if isinstance(exc, Exception) else RuntimeError())
            raise
        self._answer(probes, batch.snapshot)
        self.catchups += 1
        self._metrics.catchup(self._clock() - batch.started)
        self.caught_up.set()
        self.caught_up = asyncio.Event()

    def _answer(self, probes: list[Probe], snapshot: Snapshot) -> None:
        engine = self._replica.engine
        if not probes or engine is None:
            return
        digests = {tenant: engine.digest(tenant) for tenant in engine.tenants()}
        for probe in probes:
            if not probe.done.done():
                probe.done.set_result((snapshot, digests))

    async def _read_fast(self) -> Batch | None:
        """The common catch-up in one statement (one snapshot, one round trip).

        None when it does not apply (first load, reload reasons, reload markers,
        oversized): the caller then runs the transactional `_read`.
        """
        cursor = self._replica.revision
        if cursor is None:
            return None
        conn = await self._connection()
        started = self._clock()
        limit = self._options.max_batch_keys
        async with asyncio.timeout(self._options.read_timeout):
            row = await conn.fetchrow(q.FAST_CATCHUP, str(cursor), limit + 1)
        assert row is not None
        epoch, purged, snap_text, changes_json = row[0], row[1], row[2], row[3]
        batch = Batch(Snapshot.parse(snap_text), epoch, started)
        if self._reload_reason(batch, purged, cursor) is not None:
            return None
        changes = json.loads(changes_json) if changes_json else []
        if len(changes) > limit or any(
            op in ("truncate", "bulk_load") for _, _, _, op, _, _ in changes
        ):
            return None
        keys: dict[str, set[tuple[str, ...]]] = defaultdict(set)
        last_change: dict[int, float] = {}
        for txid, _tenant, entity, _op, key, at in changes:
            last_change[txid] = max(last_change.get(txid, 0.0), at)
            if entity in COLUMNS:
                keys[entity].add(key_tuple(entity, key))
        for index, entity in enumerate(COLUMNS, start=4):
            if entity in keys:
                rows = json.loads(row[index]) if row[index] else ()
                batch.changes.extend(_current(entity, keys[entity], rows))
        batch.committed_at = list(last_change.values())
        return batch

    async def _read(self, probes: Sequence[Probe] = ()) -> Batch:
        conn = await self._connection()
        started = self._clock()
        # No `async with transaction`: on failure the connection is terminated (which
        # aborts the transaction), never asked to roll back over a link that may be dead.
        tx = conn.transaction(isolation="repeatable_read", readonly=True)
        async with asyncio.timeout(self._options.read_timeout) as bound:
            await tx.start()
            epoch, purged, snap_text = await conn.fetchrow(q.SNAPSHOT)
            batch = Batch(Snapshot.parse(snap_text), epoch, started)
            if probes:
                exported = await conn.fetchval("SELECT pg_export_snapshot()")
                for probe in probes:
                    await probe.attach(exported)
            cursor = self._replica.revision
            reason = self._reload_reason(batch, purged, cursor)
            if reason is None and cursor is not None:
                reason = await self._read_changes(conn, batch, cursor)
            if reason is not None:
                batch.reload_reason = reason
                loop = asyncio.get_running_loop()
                bound.reschedule(loop.time() + self._options.full_read_timeout)
                batch.full = await _read_all(conn)
            await tx.commit()
        return batch

    def _reload_reason(
        self, batch: Batch, purged: int | None, cursor: Snapshot | None
    ) -> str | None:
        if cursor is None:
            return "bootstrap"
        if batch.epoch != self._replica.epoch:
            return "epoch"
        if purged is not None and purged >= cursor.xmin:
            return "purged"
        return None

    async def _read_changes(
        self, conn: asyncpg.Connection, batch: Batch, cursor: Snapshot
    ) -> str | None:
        limit = self._options.max_batch_keys
        rows = await conn.fetch(q.CHANGES, str(cursor), limit + 1)
        if len(rows) > limit:
            return "oversized"
        keys: dict[str, set[tuple[str, ...]]] = defaultdict(set)
        last_change: dict[int, float] = {}
        for row in rows:
            op, entity = row["op"], row["entity"]
            if op == "truncate":
                return "truncate"
            last_change[row["txid"]] = max(
                last_change.get(row["txid"], 0.0), row["changed_at"].timestamp()
            )
            if op == "bulk_load":
                batch.tenants[row["tenant_id"]] = {}
            elif entity in COLUMNS:
                keys[entity].add(key_tuple(entity, json.loads(row["key"])))
        for tenant in self._reload_tenants:
            batch.tenants[tenant] = {}
        self._reload_tenants = set()
        for tenant in batch.tenants:
            batch.tenants[tenant] = await _read_tenant(conn, tenant)
        for entity, entity_keys in keys.items():
            wanted = [k for k in entity_keys if k[0] not in batch.tenants]
            batch.changes.extend(await _read_keys(conn, entity, wanted))
        batch.committed_at = list(last_change.values())
        return None

    async def _apply(self, batch: Batch) -> None:
        if batch.full is not None:
            loaded = batch.full
            # Building a large engine takes a while: do it off the event loop; the
            # swap below is still a single synchronous step.
            engine = await asyncio.to_thread(Engine.build, loaded, batch.snapshot)
            self._replica.install(engine, batch.epoch, batch.started)
            # Millions of long-lived engine objects: keep the cyclic collector from
            # walking them on every full collection (a p99 spike each time). The old
            # engine is acyclic and still freed by reference counting.
            gc.collect()
            gc.freeze()
            seconds = self._clock() - batch.started
            self._metrics.full_reload(batch.reload_reason)
            self._metrics.snapshot_loaded(seconds)
            log.info(
                "loaded snapshot %s (%s) in %.0f ms: %s",
                batch.snapshot,
                batch.reload_reason,
                seconds * 1000,
                engine.counts(),
            )
            return
        current = self._replica.engine
        assert current is not None
        for tenant, tables in batch.tenants.items():
            current.replace_tenant(tenant, tables)
            self._metrics.tenant_reloaded()
        applied = self._replica.apply(batch.changes, batch.snapshot, batch.started)
        now = self._wall()
        for committed in batch.committed_at:
            self._metrics.observe_propagation(max(0.0, now - committed))
        if applied or batch.tenants:
            self._metrics.changes_applied(applied)
            log.debug(
                "caught up to %s: %d rows, %d tenants reloaded",
                batch.snapshot,
                applied,
                len(batch.tenants),
            )


def _current(
    entity: str, keys: Iterable[tuple[str, ...]], rows: Iterable[Sequence[Any]]
) -> list[RowChange]:
    """Each key's current state: its row among `rows`, or a delete when it is gone."""
    width = KEY_WIDTH[entity]
    found = {tuple(str(f) for f in row[:width]): tuple(row) for row in rows}
    return [
        RowChange(entity, key, found[key]) if key in found else RowChange.delete(entity, key)
        for key in keys
    ]


async def _read_all(conn: asyncpg.Connection) -> dict[str, list[Row]]:
    return {entity: list(await conn.fetch(sql)) for entity, sql in q.ALL_ROWS.items()}


async def _read_tenant(conn: asyncpg.Connection, tenant: str) -> dict[str, list[Row]]:
    return {entity: list(await conn.fetch(sql, tenant)) for entity, sql in q.TENANT_ROWS.items()}


async def _read_keys(
    conn: asyncpg.Connection, entity: str, keys: Sequence[tuple[str, ...]]
) -> list[RowChange]:
    """The current state of each key, read at the transaction's snapshot."""
    if not keys:
        return []
    columns: list[list[str]] = [list(col) for col in zip(*keys, strict=True)]
    return _current(entity, keys, await conn.fetch(q.ROWS_BY_KEYS[entity], *columns))
