"""A sidecar in relay mode: its replica follows the relay's Redis Stream, not PostgreSQL.

Load: the relay's stored snapshot (`sync.redis_stream`), or, when there is none or it
no longer joins the stream, PostgreSQL once (one short connection). Then `XREAD
BLOCK` from the snapshot's stream id, applying each entry in one synchronous step
(`sync.apply`, as in direct mode) after checking that it continues from the
replica's own snapshot and epoch. A gap (entries trimmed past this sidecar, another
relay's fork), an epoch change, a `reset` entry, or a Redis restart (a new run_id)
reloads. Each entry says when its data was proven current, so the relay's heartbeat
keeps the replica fresh when nothing changes: staleness, readiness and revision
tokens work as in direct mode.

Verification (the direct-mode verifier's counterpart, with no PostgreSQL session):
every `verify_interval` the relay attaches its replica's per-tenant digests at an
entry's `from`; the follower, standing at `from`, compares its own (O(1) each: the
engine keeps them running) before applying the entry, reports each tenant in
`pdp_cache_consistent{tenant}`, and reloads (`diverged`) when any differs: from the
stored snapshot (a fleet does not fall on PostgreSQL at once), not comparing that
entry again. The relay verifies its own replica against PostgreSQL at the same pace,
so when the relay is the one that drifted, its repair follows in the stream.

After a load from PostgreSQL at snapshot S, the replica stands at the stream's tip T
read before the load (T is older than S): entries that end before S are skipped
(the replica already has their effect), and the first that ends after S holds the
current rows of every key changed after T, so applying it makes the replica exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from pdp.backoff import Backoff
from pdp.engine import Engine, Snapshot, TenantState
from pdp.engine.digest import EMPTY
from pdp.errors import DependencyError
from pdp.pg.errors import DRIVER_ERRORS
from pdp.replica import Replica
from pdp.supervisor import Body
from sync import apply, pg_read
from sync import redis_stream as rs
from sync.metrics import ConsistencyReport, FollowerMetrics, NullMetrics
from sync.options import SyncOptions
from sync.pg_read import Batch, Cursor
from sync.tasks import raise_if_cancelling

log = logging.getLogger(__name__)

BLOCK_MS = 1000  # one XREAD waits at most this long
READ_COUNT = 1000  # entries per XREAD at most
BIG_ENTRY = 256 * 1024  # compressed bytes: larger entries are decoded off the event loop


class RedisFollower:
    """Keeps `replica` equal to the relay's stream while its lifespan runs."""

    def __init__(  # noqa: PLR0917 -- the follower's dependencies
        self,
        redis_url: str,
        url: str,
        replica: Replica,
        metrics: FollowerMetrics | None = None,
        options: SyncOptions | None = None,
        stream: str = "pdp:changes",
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._redis_url = redis_url
        self._url = url
        self._replica = replica
        self._metrics = metrics or NullMetrics()
        self._options = options or SyncOptions()
        self._stream = stream
        self._clock = clock
        self._wall = wall
        self._redis: aioredis.Redis | None = None
        self._run_id: str | None = None
        self._reload: str | None = "bootstrap"  # why the next step reloads (None: tail)
        self._from_store = False  # the replica came from the stored snapshot...
        self._applied = 0  # ...and this many entries followed it
        self._last_id = "0-0"
        self._epoch = ""
        self._snapshot = ""  # the stream snapshot the replica continues from
        self._floor: Snapshot | None = None  # after a PostgreSQL load: skip entries before it
        self._wait_reset = False  # PostgreSQL's epoch is not the stream's: wait for a reset
        self.entries = 0  # entries applied, for tests
        self.reloads: list[str] = []  # why each load happened, for tests and logs
        self.verified = 0  # relay digests compared, for tests
        self._checked = (0, 0)  # digests of entries up to this id were compared already
        self._consistency = ConsistencyReport(self._metrics)

    @property
    def replica(self) -> Replica:
        return self._replica

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[Body]:
        """Connect to Redis (raises when it does not answer), yield the body, close."""
        self._redis = aioredis.from_url(
            self._redis_url,
            socket_timeout=BLOCK_MS / 1000 + self._options.read_timeout,
            socket_connect_timeout=self._options.connect_timeout,
        )
        try:
            try:
                self._run_id = await self._server_run_id()
            except rs.REDIS_ERRORS as exc:
                raise DependencyError(f"cannot reach Redis (PDP_REDIS_URL): {exc}") from exc
            yield self.run
        finally:
            client, self._redis = self._redis, None
            await client.aclose()

    async def _server_run_id(self) -> str:
        assert self._redis is not None
        info: dict[str, Any] = await self._redis.info("server")
        return str(info["run_id"])

    async def run(self) -> None:
        """Load, then tail the stream; reconnect after Redis or PostgreSQL errors."""
        backoff = Backoff(self._options.backoff_initial, self._options.backoff_max)
        suspect = False  # an error happened: was Redis restarted meanwhile?
        while True:
            raise_if_cancelling()
            try:
                if suspect:
                    run_id = await self._server_run_id()
                    if run_id != self._run_id:
                        self._run_id = run_id
                        self._reload = "redis_restart"
                    suspect = False
                if self._reload is not None:
                    await self._load(self._reload)
                await self._tail()
                backoff.reset()
            except (*rs.REDIS_ERRORS, *DRIVER_ERRORS) as exc:
                raise_if_cancelling()
                log.warning("relay follower: %s: %s; retrying", type(exc).__name__, exc)
                self._metrics.reconnect()
                suspect = True
                await backoff.wait()

    # -- loading -----------------------------------------------------------------------

    async def _load(self, reason: str) -> None:
        started = self._clock()
        stored = None
        # A stored snapshot that was followed by nothing before a gap does not join
        # the stream any more (trimmed past it): then PostgreSQL.
        if not (reason == "gap" and self._from_store and self._applied == 0):
            assert self._redis is not None
            stored = await rs.read_snapshot(self._redis, self._stream)
        if stored is not None:
            tables = await asyncio.to_thread(rs.load_tables, stored)
            snapshot = Snapshot.parse(stored.snapshot)
            engine = await asyncio.to_thread(Engine.build, tables, snapshot)
            batch = Batch(snapshot, stored.epoch, self._synced_at(stored.at), reload_reason=reason)
            apply.install(self._replica, engine, batch, self._metrics, self._clock() - started)
            self._epoch, self._snapshot, self._last_id = stored.epoch, stored.snapshot, stored.id
            self._floor, self._wait_reset, self._from_store = None, False, True
        else:
            await self._load_from_postgres(reason, started)
        self._applied = 0
        self._reload = None
        self.reloads.append(reason)

    async def _load_from_postgres(self, reason: str, started: float) -> None:
        assert self._redis is not None
        tip = await rs.tip(self._redis, self._stream)  # before the load: see module doc
        conn = await asyncpg.connect(
            self._url,
            timeout=self._options.connect_timeout,
            server_settings={
                "application_name": "pdp-relay-bootstrap",
                "statement_timeout": str(self._options.statement_timeout_ms),
            },
        )
        try:
            batch = await pg_read.read(
                conn, Cursor(None, None), self._options, started, build=True
            )
        finally:
            conn.terminate()
        batch.reload_reason = reason
        engine = await asyncio.to_thread(apply.build, batch)
        apply.install(self._replica, engine, batch, self._metrics, self._clock() - started)
        self._from_store = False
        if tip is None:  # an empty stream: the relay's first entry will be a reset
            self._epoch, self._snapshot, self._last_id = batch.epoch, "", "0-0"
            self._floor, self._wait_reset = None, True
            return
        self._epoch, self._snapshot, self._last_id = tip.epoch, tip.snapshot, tip.id
        self._floor, self._wait_reset = batch.snapshot, tip.epoch != batch.epoch

    def _synced_at(self, at: float) -> float:
        """The monotonic time at which data proven current at wall time `at` was current."""
        return self._clock() - max(0.0, self._wall() - at)

    # -- tailing -----------------------------------------------------------------------

    async def _tail(self) -> None:
        """One XREAD BLOCK; apply what it returns (until a reload is due)."""
        assert self._redis is not None
        # Bounded: a half-open link to Redis raises nothing by itself.
        async with asyncio.timeout(BLOCK_MS / 1000 + self._options.read_timeout):
            found: Any = await self._redis.xread(
                {self._stream: self._last_id}, count=READ_COUNT, block=BLOCK_MS
            )
        for _stream, entries in found or ():
            for entry_id, fields in entries:
                try:
                    if len(fields.get(b"data", b"")) > BIG_ENTRY:  # a tenant reload, say
                        entry = await asyncio.to_thread(rs.decode_entry, entry_id, fields)
                    else:
                        entry = rs.decode_entry(entry_id, fields)
                except (ValueError, KeyError, TypeError, zlib.error) as exc:
                    # Not the relay's format (another writer, another version): the
                    # chain is broken here; reload rather than guess.
                    log.error("relay follower: undecodable stream entry %s: %r", entry_id, exc)
                    self._reload = "bad_entry"
                    return
                # Tenants replaced whole are built off the event loop (seconds for a big one).
                built = None
                if entry.tenants:
                    built = await asyncio.to_thread(apply.build_tenants, entry.tenants)
                self._follow(entry, built)
                if self._reload is not None:
                    return

    def _follow(self, entry: rs.Entry, built: dict[str, TenantState] | None = None) -> None:
        """Apply one entry, skip it, or ask for a reload (`built`: the states of the
        tenants it replaces, `apply.build_tenants`). Never awaits."""
        if entry.kind == "reset":
            self._reload = "reset"
            return
        if entry.epoch != self._epoch or entry.from_ != self._snapshot:
            if entry.epoch == self._epoch and entry.to == self._snapshot:
                self._last_id = entry.id  # already there (the stored snapshot's own entry)
                return
            if not self._wait_reset:
                self._reload = "epoch" if entry.epoch != self._epoch else "gap"
                log.info(
                    "relay follower reloads (%s): entry %s continues from %s|%s, the "
                    "replica is at %s|%s", self._reload, entry.id, entry.epoch,
                    entry.from_, self._epoch, self._snapshot,
                )  # fmt: skip
                return
        if (
            self._floor is None
            and not self._wait_reset
            and _stream_id(entry.id) > self._checked
            and not self._agrees(entry.digests)
        ):
            # Reloaded from the stored snapshot, which comes before this entry: the
            # entry is read again and must not fail again (the relay may be the one
            # that drifted: its own verifier repairs it, and the repair follows).
            self._checked = _stream_id(entry.id)
            self._reload = "diverged"
            return
        self._last_id, self._snapshot = entry.id, entry.to
        if self._wait_reset:
            return
        to = Snapshot.parse(entry.to)
        if self._floor is not None:
            if not rs.covers(to, self._floor):
                return  # the replica (loaded later) already holds this entry's effect
            self._floor = None
        batch = Batch(
            to, entry.epoch, self._synced_at(entry.at),
            tenants=entry.tenants, changes=entry.changes, committed_at=entry.committed_at,
        )  # fmt: skip
        apply.apply_changes(self._replica, batch, self._metrics, self._wall, built)
        self._applied += 1
        self.entries += 1

    def _agrees(self, relay: dict[str, str] | None) -> bool:
        """Compare the replica's digests with the relay's at the same point (`from`);
        True when the entry carries none."""
        if relay is None:
            return True
        mine = apply.digests(self._replica)
        result = {t: mine.get(t, EMPTY) == relay.get(t, EMPTY) for t in relay.keys() | mine}
        self._consistency.report(result)
        for tenant, ok in sorted(result.items()):
            if not ok:
                log.error(
                    "relay follower: tenant %s differs from the relay's replica at %s; "
                    "reloading", tenant, self._snapshot,
                )  # fmt: skip
        self.verified += 1
        return all(result.values())


def _stream_id(text: str) -> tuple[int, int]:
    """A Redis stream id ("ms-seq") as a pair that sorts as the stream does."""
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)
