"""The catch-up loop: keep a Replica equal to PostgreSQL (DESIGN.md section 3).

Catch-ups are single-flight (only `run` performs them) and coalesced (one wake
event, set by the listener, a consistency wait, a probe or a tenant repair; and a
poll tick). Each catch-up reads one batch (`sync.pg_read`) and applies it in one
synchronous step (`sync.apply`).

Failures talking to PostgreSQL are expected: the query connection is dropped and
the same cursor retried after a capped, jittered backoff (reads are idempotent).
Anything else is a bug and escapes `run`, so the supervisor restarts the worker.

With a `read_url` (a hot standby of the primary at `url`) every read goes to the
standby, and currency is proven against the primary: before each read the primary's
snapshot is sampled (`pg_current_snapshot()`, one round trip). A read is current as
of the latest sample its own snapshot covers (every transaction visible in the sample
is visible in the read: the standby had replayed it), so staleness counts from that
sample, not from the read. While the standby is behind a sample (a notification
arrived before it replayed the change) the loop retries every `REPLAY_RETRY` seconds
instead of waiting for the next poll, while the oldest sample not yet replayed is less
than `options.read_timeout` old (a standby lagging longer is caught up at the poll
interval, not hammered).

A `sink` (the relay's publisher) sees each batch after it is read and before it is
applied; if it raises, nothing is applied and the same cursor is read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

import asyncpg

from pdp.backoff import Backoff
from pdp.engine import Snapshot
from pdp.pg.errors import DRIVER_ERRORS
from pdp.replica import Replica
from sync import apply, pg_read
from sync.file_snapshot import SnapshotFile
from sync.metrics import NullMetrics, SyncMetrics
from sync.options import SyncOptions
from sync.pg_read import Batch, Cursor, Probe
from sync.tasks import raise_if_cancelling

log = logging.getLogger(__name__)

Sink = Callable[[Batch], Awaitable[None]]

# Between catch-ups while a standby has not replayed what the primary had committed.
REPLAY_RETRY = 0.02
PRIMARY_SNAPSHOT = "SELECT pg_current_snapshot()::text"
_SAMPLES = 1000  # primary snapshots awaiting the standby's replay, at most


def covers(read: Snapshot, sample: Snapshot) -> bool:
    """Whether every transaction visible in `sample` is visible in `read`."""
    newest = sample.xmax - 1  # the newest transaction `sample` shows
    while newest >= sample.xmin and newest in sample.xip:
        newest -= 1
    return newest < read.xmax and not any(sample.visible(x) for x in read.xip)


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
        sink: Sink | None = None,
        snapshot_file: SnapshotFile | None = None,
        read_url: str | None = None,
    ) -> None:
        self._url = url
        self._read_url = read_url
        self._primary: asyncpg.Connection | None = None
        # (monotonic time, primary snapshot) sampled before reads, not yet replayed.
        self._samples: deque[tuple[float, Snapshot]] = deque(maxlen=_SAMPLES)
        self._sink = sink
        self._file = snapshot_file
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

    @property
    def replica(self) -> Replica:
        return self._replica

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

    # -- the query connection ------------------------------------------------------

    async def connection(self) -> asyncpg.Connection:
        """The dedicated query connection (to the read server), (re)connected on demand."""
        if self._conn is None or self._conn.is_closed():
            self._conn = await self._connect(self._read_url or self._url, "pdp-sync")
        return self._conn

    async def primary_connection(self) -> asyncpg.Connection:
        """A connection to the primary: the query connection unless reads go to a standby."""
        if self._read_url is None:
            return await self.connection()
        if self._primary is None or self._primary.is_closed():
            self._primary = await self._connect(self._url, "pdp-sync-primary")
        return self._primary

    async def _connect(self, url: str, name: str) -> asyncpg.Connection:
        return await asyncpg.connect(
            url,
            timeout=self._options.connect_timeout,
            server_settings={
                "application_name": name,
                "statement_timeout": str(self._options.statement_timeout_ms),
                "idle_in_transaction_session_timeout": "60000",
            },
        )

    async def close(self) -> None:
        for conn in (self._conn, self._primary):
            if conn is not None:
                await conn.close(timeout=2)
        self._conn = self._primary = None

    def _drop_connection(self) -> None:
        for conn in (self._conn, self._primary):
            if conn is not None:
                conn.terminate()
        self._conn = self._primary = None

    # -- the loop ------------------------------------------------------------------

    async def run(self) -> None:
        """Catch up whenever woken, and at least every poll interval, until cancelled."""
        wake = self._replica.wake
        options = self._options
        backoff = Backoff(options.backoff_initial, options.backoff_max)
        if self._file is not None and self._replica.engine is None:
            await self._file.restore(self._replica)
        while True:
            raise_if_cancelling()  # a sink's Redis call may have swallowed a stop
            started = self._clock()
            try:
                await self.catch_up()
            except DRIVER_ERRORS as exc:
                log.warning("catch-up failed (%s: %s); retrying", type(exc).__name__, exc)
                await backoff.wait()
                continue
            backoff.reset()
            if self._file is not None and self._file.due():
                # Between catch-ups: nothing applies while the rows are captured.
                await self._file.save(self._replica)
            if not wake.is_set():  # else it rang during the catch-up: go on at once
                with contextlib.suppress(TimeoutError):
                    # Not wait_for: its extra task costs event-loop turns per ring, each
                    # a few milliseconds when requests keep the loop busy.
                    async with asyncio.timeout(self._next_wait()):
                        await wake.wait()
            # Under a stream of commits, gather at least min_interval of them per
            # catch-up instead of one transaction each: bounded extra latency, far less
            # work. A catch-up that took that long already gathered them: no sleep.
            rest = started + options.min_interval - self._clock()
            if rest > 0:
                await asyncio.sleep(rest)

    def _next_wait(self) -> float:
        """How long to wait for a wake: shorter while the standby replays a sample."""
        if self._samples and self._clock() - self._samples[0][0] < self._options.read_timeout:
            return min(REPLAY_RETRY, self._options.poll_interval)
        return self._options.poll_interval

    async def save_snapshot_file(self) -> None:
        """Write the snapshot file now and wait for it (at shutdown, the loop stopped)."""
        if self._file is not None:
            await self._file.flush()
            if self._replica.staleness() != float("inf"):
                await self._file.save(self._replica)
            await self._file.flush()

    async def catch_up(self) -> None:
        """One catch-up (or the first load): read in one snapshot, then apply at once.

        On failure the query connection is dropped; the next call reconnects and
        retries from the same cursor (idempotent).
        """
        # Clear before reading: a notification arriving during the read wakes us again.
        rang = self._replica.wake.rang
        self._replica.wake.clear()
        probes, self._probes = self._probes, []
        tenants, self._reload_tenants = self._reload_tenants, set()
        try:
            batch = await self._read(probes, tenants)
            read = self._clock()
            if self._sink is not None:
                await self._sink(batch)
            applying = self._clock()
            await self._apply(batch)
        except BaseException as exc:
            self._drop_connection()
            self._reload_tenants |= tenants
            for probe in probes:
                if not probe.done.done():
                    probe.done.set_exception(exc if isinstance(exc, Exception) else RuntimeError())
            raise
        if probes:
            found = (batch.snapshot, apply.digests(self._replica))
            for probe in probes:
                if not probe.done.done():
                    probe.done.set_result(found)
        self.catchups += 1
        self._metrics.catchup(self._clock() - batch.started)
        if not batch.is_full:
            self._phases(batch, rang, read, applying)
        self.caught_up.set()
        self.caught_up = asyncio.Event()

    def _phases(
        self, batch: Batch, rang: tuple[float, float] | None, read: float, applying: float
    ) -> None:
        """Report where this catch-up's propagation went (`SyncMetrics.sync_phase`)."""
        metrics = self._metrics
        metrics.sync_phase("read", read - batch.started)
        metrics.sync_phase("apply", self._clock() - applying)
        if rang is None:  # the poll interval, not a doorbell, started it
            return
        metrics.sync_phase("wait", max(0.0, batch.started - rang[0]))
        for committed in batch.committed_at:
            if committed <= rang[1]:  # others committed after the ring, during the wait
                metrics.sync_phase("notify", rang[1] - committed)

    async def _read(self, probes: list[Probe], tenants: set[str]) -> Batch:
        conn = await self.connection()
        if self._read_url is not None:
            primary = await self.primary_connection()
            sampled = self._clock()
            async with asyncio.timeout(self._options.read_timeout):
                text = await primary.fetchval(PRIMARY_SNAPSHOT)
            self._samples.append((sampled, Snapshot.parse(text)))
        batch = await self._read_batch(conn, probes, tenants)
        if self._read_url is not None:
            proven = self._proven(batch.snapshot)
            batch.proven_at = float("-inf") if proven is None else proven
            behind = self._clock() - self._samples[0][0] if self._samples else 0.0
            self._metrics.set_read_replica_lag(behind)
        return batch

    def _proven(self, read: Snapshot) -> float | None:
        """The time of the latest sample `read` covers (dropping it and older ones)."""
        proven = None
        while self._samples and covers(read, self._samples[0][1]):
            proven = self._samples.popleft()[0]
        return proven

    async def _read_batch(
        self, conn: asyncpg.Connection, probes: list[Probe], tenants: set[str]
    ) -> Batch:
        replica = self._replica
        cursor = Cursor(replica.revision, replica.epoch)
        options = self._options
        if not probes and not tenants:
            batch = await pg_read.read_fast(conn, cursor, options, self._clock())
            if batch is not None:
                self.fast_catchups += 1
                return batch
        return await pg_read.read(
            conn, cursor, options, self._clock(), probes=probes, reload_tenants=tenants,
            build=self._sink is None,  # a sink (the relay) publishes the rows themselves
            url=self._read_url or self._url,  # for the processes of a parallel load
        )  # fmt: skip

    async def _apply(self, batch: Batch) -> None:
        if not batch.is_full:
            # Tenants replaced whole are built first, off the event loop (seconds for
            # a big tenant); the swap and the changes are then one synchronous step.
            built = dict(batch.built)  # the read built them as their rows arrived
            unbuilt = {t: rows for t, rows in batch.tenants.items() if t not in built}
            if unbuilt:
                built.update(await asyncio.to_thread(apply.build_tenants, unbuilt))
            apply.apply_changes(self._replica, batch, self._metrics, self._wall, built)
            return
        # Building a large engine takes a while: off the event loop; the swap is still
        # a single synchronous step.
        engine = batch.engine
        if engine is None:
            engine = await asyncio.to_thread(apply.build, batch)
        apply.install(self._replica, engine, batch, self._metrics, self._clock() - batch.started)
