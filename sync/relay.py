"""The relay: one catch-up loop against PostgreSQL, published to a Redis Stream.

Sidecars in relay mode (`sync.redis_follower`) tail the stream instead of each
LISTENing on PostgreSQL: the database sees one listener whatever the fleet size.

The relay runs exactly the sidecar's algorithm, the same `SyncService` (listener,
`PgSync` catch-up loop, `pg_read`), with a sink that publishes every batch before it
is applied (`sync.redis_stream` has the format):
- a batch of changes (or of nothing: a heartbeat proving freshness) is appended
  only if the stream ends where the batch begins (compare-and-append in Lua);
- a full reload is written as a new snapshot and a `reset` entry, atomically;
- every `snapshot_interval` the per-tenant snapshot is rewritten at the last entry;
- every `verify_interval` the next entry carries the relay replica's per-tenant
  digests at its `from`, for the followers to compare with theirs; at the same pace
  the leader's own replica is verified against PostgreSQL (`sync.pg_verifier`, as a
  direct-mode sidecar does: a tenant that differs is re-read and published whole).
  So a follower is proven equal to the relay, and the relay to the database.

Leader election: any number of relays run; the one holding a session-level
PostgreSQL advisory lock, on a dedicated connection, publishes. The others try the
lock every `election_interval`. The leader checks the lock connection every
`lock_heartbeat` and steps down when it fails; the compare-and-append fences a
leader that has not noticed yet. A new leader reads the stream's tip first, loads
everything from PostgreSQL, and then catches up *from the tip's snapshot*: re-reading
the current rows of every key changed since makes its first batch continue the chain
exactly (no gap, no reload for the followers), or, when the change log no longer
reaches back that far, publishes a reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from pdp.backoff import Backoff
from pdp.engine import KEY_WIDTH, Engine, Row, Snapshot
from pdp.errors import DependencyError
from pdp.pg.errors import DRIVER_ERRORS
from pdp.replica import Replica
from pdp.supervisor import Body
from sync import apply, pg_read
from sync import redis_stream as rs
from sync.metrics import NullRelayMetrics, RelayMetrics
from sync.options import RelayOptions, SyncOptions
from sync.pg_read import Batch, Cursor
from sync.pg_sync import PgSync
from sync.pg_verifier import PgVerifier
from sync.service import SyncService
from sync.tasks import raise_if_cancelling

log = logging.getLogger(__name__)


class LockLost(Exception):
    """The leader's lock connection failed: another relay may take over."""


# What ends a term (the lock is released, the relay competes again); anything else
# is a bug and escapes to the supervisor.
STEP_DOWN: tuple[type[Exception], ...] = (*DRIVER_ERRORS, *rs.REDIS_ERRORS, rs.Diverged, LockLost)

TenantRows = dict[str, dict[tuple[str, ...], Row]]


class RowStore:
    """The rows the relay holds, per tenant and table: what the stored snapshot writes."""

    def __init__(self) -> None:
        self.tenants: dict[str, TenantRows] = {}

    def load(self, tables: dict[str, list[Row]]) -> None:
        """Replace everything with these tables (CPU only; may run in a thread)."""
        tenants: dict[str, TenantRows] = {}
        for entity, rows in tables.items():
            width = KEY_WIDTH[entity]
            for row in rows:
                row_t = tuple(row)
                key = tuple(str(f) for f in row_t[:width])
                tenants.setdefault(key[0], {}).setdefault(entity, {})[key] = row_t
        self.tenants = tenants

    def apply(self, batch: Batch) -> None:
        """Replace the batch's tenants, then apply its row changes."""
        for tenant, tables in batch.tenants.items():
            self.tenants.pop(tenant, None)
            if tables.get("tenants"):
                store: TenantRows = self.tenants.setdefault(tenant, {})
                for entity, rows in tables.items():
                    width = KEY_WIDTH[entity]
                    store[entity] = {tuple(str(f) for f in r[:width]): tuple(r) for r in rows}
        for change in batch.changes:
            tenant = change.key[0]
            if change.row is None:
                if change.entity == "tenants":
                    self.tenants.pop(tenant, None)
                elif tenant in self.tenants:
                    self.tenants[tenant].get(change.entity, {}).pop(change.key, None)
            else:
                store = self.tenants.setdefault(tenant, {})
                store.setdefault(change.entity, {})[change.key] = tuple(change.row)

    def blobs(self) -> dict[str, bytes]:
        """Each tenant's rows, compressed (CPU only; run it in a thread)."""
        return {
            tenant: rs.pack({e: list(map(list, rows.values())) for e, rows in tables.items()})
            for tenant, tables in self.tenants.items()
            if tables.get("tenants")
        }


class Relay:
    """Elects itself leader (or waits), then publishes every batch of its catch-up loop."""

    def __init__(
        self,
        url: str,
        redis_url: str,
        metrics: RelayMetrics | None = None,
        options: SyncOptions | None = None,
        relay_options: RelayOptions | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._url = url
        self._redis_url = redis_url
        self._metrics = metrics or NullRelayMetrics()
        self._options = options or SyncOptions()
        self._relay = relay_options or RelayOptions()
        self._clock = clock
        self._wall = wall
        self.name = uuid.uuid4().hex[:12]
        self.leading = asyncio.Event()  # set while this relay holds the lock and publishes
        self.terms = 0  # times this relay became leader
        self.published = 0  # entries this relay appended
        self.lock_pid: int | None = None  # the lock connection's backend (tests end it)
        self._redis: aioredis.Redis | None = None
        self._rows = RowStore()
        self._tip = ""  # epoch|snapshot where the stream ends, as far as this relay knows
        self._last_id = ""
        self._snapshot_due = 0.0
        self._generation: tuple[str, list[str]] | None = None
        self._sync: PgSync | None = None  # the current term's catch-up loop
        self._past_catchups = 0
        self._replica: Replica | None = None  # the current term's replica
        # Whether the replica, once the batch being published is applied, is exactly
        # the stream's state at that batch's end (not so right after adopting a tip:
        # rows of the load, cursor of the tip, until the first catch-up).
        self._exact = False
        self._digests_due = 0.0
        self.verifier: PgVerifier | None = None  # the current term's (tests read it)

    @property
    def catchups(self) -> int:
        """Catch-ups against PostgreSQL, over every term (for benchmarks and tests)."""
        return self._past_catchups + (self._sync.catchups if self._sync is not None else 0)

    def reload_tenant(self, tenant: str) -> bool:
        """Have the leader re-read `tenant` whole and publish it (False: not leading)."""
        if self._sync is None:
            return False
        self._sync.reload_tenant(tenant)
        return True

    # -- the worker ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[Body]:
        """Connect to Redis (raises when it does not answer), yield the body, close."""
        self._redis = aioredis.from_url(
            self._redis_url,
            socket_timeout=self._options.read_timeout,
            socket_connect_timeout=self._options.connect_timeout,
        )
        try:
            try:
                await self._redis.ping()
            except rs.REDIS_ERRORS as exc:
                raise DependencyError(f"cannot reach Redis (PDP_REDIS_URL): {exc}") from exc
            yield self.run
        finally:
            client, self._redis = self._redis, None
            await client.aclose()

    async def run(self) -> None:
        """Take the lock when free and lead until it is lost; forever (until cancelled)."""
        backoff = Backoff(self._options.backoff_initial, self._options.backoff_max)
        while True:
            raise_if_cancelling()
            try:
                # Compete only while Redis answers: a term starts with a full read of
                # PostgreSQL, not something to repeat every second of a Redis outage.
                assert self._redis is not None
                await self._redis.ping()
            except rs.REDIS_ERRORS as exc:
                raise_if_cancelling()
                log.warning("relay cannot reach Redis (%s); retrying", exc)
                await backoff.wait()
                continue
            try:
                lock = await self._connect_lock()
            except DRIVER_ERRORS as exc:
                raise_if_cancelling()
                log.warning("relay cannot connect to PostgreSQL (%s); retrying", exc)
                await backoff.wait()
                continue
            try:
                await self._wait_for_lock(lock)
                backoff.reset()
                self.terms += 1
                self.leading.set()
                self._metrics.relay_leader(True)
                log.info("relay %s leads (advisory lock taken)", self.name)
                await self._lead(lock)
            except STEP_DOWN as exc:
                raise_if_cancelling()
                if isinstance(exc, rs.Diverged):
                    self._metrics.relay_diverged()
                log.warning("relay %s steps down (%s: %s)", self.name, type(exc).__name__, exc)
            finally:
                if self.leading.is_set():
                    self.leading.clear()
                    self._metrics.relay_leader(False)
                lock.terminate()  # ends the session: the lock is released
                self.lock_pid = None
            await backoff.wait()

    async def _connect_lock(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(
            self._url,
            timeout=self._options.connect_timeout,
            server_settings={"application_name": "pdp-relay-lock"},
        )
        self.lock_pid = conn.get_server_pid()
        return conn

    async def _wait_for_lock(self, lock: asyncpg.Connection) -> None:
        timeout = self._relay.lock_heartbeat * 5
        while not await lock.fetchval(  # noqa: ASYNC110
            "SELECT pg_try_advisory_lock($1)", self._relay.lock_key, timeout=timeout
        ):
            # A lock has no doorbell: polling it is how a standby learns it is free.
            await asyncio.sleep(self._relay.election_interval)

    async def _lead(self, lock: asyncpg.Connection) -> None:
        """One term: adopt the stream's tip, then catch up and publish until a failure."""
        assert self._redis is not None
        replica = Replica(self._clock)
        service = SyncService(self._url, replica, self._metrics, self._options, sink=self._publish)
        self._sync, self._replica, self._exact = service.sync, replica, False
        self.verifier = PgVerifier(
            self._url, service.sync, self._metrics, self._relay.verify_interval
        )
        self._digests_due = self._clock() + self._relay.verify_interval
        try:
            await self._run_term(service, replica, lock)
        finally:
            self._past_catchups += service.sync.catchups
            self._sync = self._replica = self.verifier = None

    async def _run_term(
        self, service: SyncService, replica: Replica, lock: asyncpg.Connection
    ) -> None:
        async with service.lifespan() as body:
            await self._adopt(service, replica)
            assert self.verifier is not None
            try:
                await _first_failure(self._hold(lock), body(), self.verifier.run())
            except ExceptionGroup as group:  # the sync body's TaskGroup wraps the sink's error
                leaves = _leaves(group)
                if all(isinstance(e, STEP_DOWN) for e in leaves):
                    raise leaves[0] from group
                raise

    async def _adopt(self, service: SyncService, replica: Replica) -> None:
        """Load everything and stand at the stream's tip (or publish a reset at none)."""
        assert self._redis is not None
        tip = await rs.tip(self._redis, self._relay.stream)  # before the load: see module doc
        conn = await service.sync.connection()
        batch = await pg_read.read(conn, Cursor(None, None), self._options, self._clock())
        assert batch.full is not None
        self._generation = await self._current_generation()
        if tip is None or not _usable(tip):
            # An empty stream, or one that ends in something not ours: start it over.
            self._tip, self._last_id = ("", "") if tip is None else (tip.text, tip.id)
            await self._publish(batch)  # a reset: the snapshot and its entry
            engine = await asyncio.to_thread(Engine.build, batch.full, batch.snapshot)
            replica.install(engine, batch.epoch, batch.started)
            self._exact = True
            return
        log.info("relay %s continues the stream from %s (%s)", self.name, tip.snapshot, tip.id)
        full = batch.full
        await asyncio.to_thread(self._rows.load, full)
        engine = await asyncio.to_thread(Engine.build, full, Snapshot.parse(tip.snapshot))
        # The rows are as of the load, the cursor the tip's (older) snapshot: the first
        # catch-up re-reads every key changed since the tip, which makes both exact.
        replica.install(engine, tip.epoch, batch.started)
        self._tip, self._last_id = tip.text, tip.id
        # No stored snapshot (expired, deleted): followers would all load from
        # PostgreSQL until the next one, so write it with the first batch.
        wait = self._relay.snapshot_interval if self._generation is not None else 0.0
        self._snapshot_due = self._clock() + wait

    async def _hold(self, lock: asyncpg.Connection) -> None:
        """Prove the lock connection alive every `lock_heartbeat`; raise LockLost when not."""
        lost = asyncio.Event()
        lock.add_termination_listener(lambda _conn: lost.set())
        period = self._relay.lock_heartbeat
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), period)
            if lost.is_set():
                raise LockLost("the lock connection was closed")
            try:
                await lock.fetchval("SELECT 1", timeout=period * 2)
            except DRIVER_ERRORS as exc:
                raise LockLost(f"the lock connection failed ({type(exc).__name__})") from exc

    # -- publishing --------------------------------------------------------------------

    def _proven_at(self, batch: Batch) -> float:
        """Wall time at which the batch's read began (when its data was current)."""
        return self._wall() - max(0.0, self._clock() - batch.started)

    async def _publish(self, batch: Batch) -> None:
        """The sink: append this batch to the stream, before the loop applies it."""
        if batch.full is not None:
            await self._reset(batch)
            self._exact = True
            return
        self._rows.apply(batch)
        epoch, to = batch.epoch, str(batch.snapshot)
        changed = bool(batch.changes or batch.tenants)
        kind = "changes" if changed else "heartbeat"
        fields = rs.entry_fields(
            kind, epoch, self._tip.partition("|")[2], to, self._proven_at(batch),
            batch.changes, batch.tenants, batch.committed_at, self._due_digests(),
        )  # fmt: skip
        await self._append(fields, rs.tip_text(epoch, to), kind)
        self._exact = True
        if self._clock() >= self._snapshot_due:
            await self._write_snapshot(epoch, to, self._proven_at(batch))

    def _due_digests(self) -> dict[str, str] | None:
        """The replica's digests at the stream's tip, when due and exact (else None).

        The sink runs before the loop applies the batch, so the replica stands where
        the batch begins: at the tip, once the term's first batch was applied."""
        if not self._exact or self._replica is None or self._clock() < self._digests_due:
            return None
        self._digests_due = self._clock() + self._relay.verify_interval
        return apply.digests(self._replica)

    async def _append(
        self, fields: list[str | bytes], new_tip: str, kind: str, meta: str = ""
    ) -> None:
        assert self._redis is not None
        result: Any = await self._redis.eval(
            rs.APPEND, 2, self._relay.stream, rs.snapshot_key(self._relay.stream),
            self._tip, self._relay.maxlen, meta, *fields,
        )  # fmt: skip
        ok, value = int(result[0]), rs.as_text(result[1])
        if not ok:
            raise rs.Diverged(f"the stream ends at {value or 'nothing'}, not at {self._tip}")
        self._tip, self._last_id = new_tip, value
        self.published += 1
        self._metrics.relay_published(kind)

    async def _reset(self, batch: Batch) -> None:
        """A full reload: write the snapshot, then the reset entry naming it (atomically)."""
        assert batch.full is not None
        started = self._clock()
        await asyncio.to_thread(self._rows.load, batch.full)
        epoch, to, at = batch.epoch, str(batch.snapshot), self._proven_at(batch)
        generation, size = await self._write_blobs()
        meta = rs.snapshot_meta(epoch, to, at, generation[0], generation[1])
        fields = rs.entry_fields("reset", epoch, self._tip.partition("|")[2], to, at)
        await self._append(fields, rs.tip_text(epoch, to), "reset", meta)
        await self._retire(generation)
        self._metrics.relay_snapshot_written(self._clock() - started, size)
        self._snapshot_due = self._clock() + self._relay.snapshot_interval
        log.info("relay %s published a reset at %s (%s)", self.name, to, batch.reload_reason)

    async def _write_snapshot(self, epoch: str, to: str, at: float) -> None:
        """Rewrite the stored snapshot at the last entry (skipped if another relay wrote)."""
        assert self._redis is not None
        started = self._clock()
        generation, size = await self._write_blobs()
        meta = rs.snapshot_meta(epoch, to, at, generation[0], generation[1])
        stream = self._relay.stream
        named = await self._redis.eval(
            rs.SET_SNAPSHOT, 2, stream, rs.snapshot_key(stream), self._last_id, meta
        )
        if int(named):
            await self._retire(generation)
            self._metrics.relay_snapshot_written(self._clock() - started, size)
        else:
            await self._drop(generation)
        self._snapshot_due = self._clock() + self._relay.snapshot_interval

    async def _write_blobs(self) -> tuple[tuple[str, list[str]], int]:
        """Write every tenant's blob under a new generation; returns it and the bytes."""
        assert self._redis is not None
        blobs = await asyncio.to_thread(self._rows.blobs)
        generation = uuid.uuid4().hex[:12]
        stream = self._relay.stream
        async with self._redis.pipeline(transaction=False) as pipe:
            for tenant, blob in blobs.items():
                pipe.set(rs.tenant_key(stream, generation, tenant), blob)
            await pipe.execute()
        return (generation, sorted(blobs)), sum(map(len, blobs.values()))

    async def _current_generation(self) -> tuple[str, list[str]] | None:
        assert self._redis is not None
        meta = await self._redis.hget(rs.snapshot_key(self._relay.stream), "meta")
        if meta is None:
            return None
        parsed = json.loads(meta)
        return parsed["generation"], list(parsed["tenants"])

    async def _retire(self, generation: tuple[str, list[str]]) -> None:
        """The new generation is named: let the previous one expire (readers may be on it)."""
        assert self._redis is not None
        old, self._generation = self._generation, generation
        if old is None or old[0] == generation[0]:
            return
        stream = self._relay.stream
        async with self._redis.pipeline(transaction=False) as pipe:
            for tenant in old[1]:
                pipe.expire(rs.tenant_key(stream, old[0], tenant), rs.OLD_GENERATION_TTL)
            await pipe.execute()

    async def _drop(self, generation: tuple[str, list[str]]) -> None:
        assert self._redis is not None
        keys = [rs.tenant_key(self._relay.stream, generation[0], t) for t in generation[1]]
        if keys:
            await self._redis.delete(*keys)


def _usable(tip: rs.Tip) -> bool:
    """Whether the stream's last entry is one this relay can continue from."""
    try:
        Snapshot.parse(tip.snapshot)
    except ValueError:
        return False
    return bool(tip.epoch)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


async def _first_failure(*coros: Coroutine[Any, Any, None]) -> None:
    """Run the coroutines until one ends; cancel the others; raise what it raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        task.result()
    raise LockLost("a relay task ended on its own")
