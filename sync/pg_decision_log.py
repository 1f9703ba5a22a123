"""The decision log's PostgreSQL sink: COPY batches into pdp.decision_log, keep its partitions.

One dedicated connection (the sidecar's own PDP_DATABASE_URL: the `pdp_sidecar` role may
INSERT into the table and run `pdp.decision_log_maintain`). Opening it calls the
maintenance function (partitions of yesterday to `ahead_days` ahead created, those past
the retention dropped) and so does a write once `maintain_every` seconds have passed
since the last call. A write is one `COPY ... FROM STDIN (FORMAT binary)`: one round
trip per batch. Errors propagate (the worker crashes, the supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import timedelta

import asyncpg

from pdp.decision_log import FIELDS, Entry, Sink, utc

log = logging.getLogger(__name__)

MAINTAIN = "SELECT created, dropped FROM pdp.decision_log_maintain($1, $2)"
AHEAD_DAYS = 2
MAINTAIN_EVERY = 3600.0
LOCK_TIMEOUT_MS = 2000  # how long maintenance may wait for the table's lock
_SLICE = 100
CONNECT_TIMEOUT = 10.0
APP_NAME = "pdp decision log"  # pg_stat_activity.application_name of the writer
# A commit does not wait for its WAL flush: a PostgreSQL crash may lose the last
# fraction of a second of decisions (never corrupt them), as a sidecar crash loses its
# queue; in exchange the writer does not stall on every batch's fsync.
SERVER_SETTINGS = {"application_name": APP_NAME, "synchronous_commit": "off"}


def _row(entry: Entry) -> tuple[object, ...]:
    revision = entry[11]
    return (
        *entry[:1], utc(entry[1]), *entry[2:11], None if revision is None else str(revision),
        entry[12] * 1000.0,
    )  # fmt: skip


class PgDecisionLog:
    """Opens the connection a decision-log worker writes through (`opened`)."""

    def __init__(
        self,
        url: str,
        retention_seconds: float,
        *,
        ahead_days: int = AHEAD_DAYS,
        maintain_every: float = MAINTAIN_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self._retention = timedelta(seconds=retention_seconds)
        self._ahead = ahead_days
        self._every = maintain_every
        self._clock = clock

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[Sink]:
        conn = await asyncpg.connect(
            self._url, timeout=CONNECT_TIMEOUT, server_settings=SERVER_SETTINGS
        )
        try:
            sink = _PgSink(conn, self)
            await sink.maintain()
            yield sink
        finally:
            await conn.close(timeout=CONNECT_TIMEOUT)

    async def maintain(self, conn: asyncpg.Connection) -> tuple[list[str], list[str]]:
        """Create the partitions ahead and drop those past retention; (created, dropped).

        Adding or dropping a partition locks the whole table: behind a long reader of
        pdp.decision_log it would wait, and every write queued behind it. So it waits
        at most `LOCK_TIMEOUT_MS`, then gives up until the next turn (partitions exist
        `ahead_days` ahead: a missed turn costs nothing)."""
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
                row = await conn.fetchrow(MAINTAIN, self._ahead, self._retention)
        except asyncpg.LockNotAvailableError:
            log.warning(
                "decision log partitions not maintained: a reader of pdp.decision_log held"
                " its lock for over %d ms; trying again in %.0f s",
                LOCK_TIMEOUT_MS, self._every,
            )  # fmt: skip
            return [], []
        assert row is not None
        created, dropped = list(row["created"]), list(row["dropped"])
        if created or dropped:
            log.info(
                "decision log partitions: created %s, dropped %s",
                ", ".join(created) or "none", ", ".join(dropped) or "none",
            )  # fmt: skip
        return created, dropped


class _PgSink:
    def __init__(self, conn: asyncpg.Connection, owner: PgDecisionLog) -> None:
        self._conn = conn
        self._owner = owner
        self._maintained = 0.0

    async def maintain(self) -> None:
        await self._owner.maintain(self._conn)
        self._maintained = self._owner._clock()

    async def write(self, batch: Sequence[Entry]) -> None:
        if self._owner._clock() - self._maintained >= self._owner._every:
            await self.maintain()
        await self._conn.copy_records_to_table(
            "decision_log", schema_name="pdp", columns=FIELDS, records=_rows(batch)
        )


async def _rows(batch: Sequence[Entry]) -> AsyncIterator[tuple[object, ...]]:
    """The batch's rows, with a turn for the requests every `_SLICE` rows: converting
    and encoding a whole batch at once would hold the event loop for milliseconds."""
    for start in range(0, len(batch), _SLICE):
        for entry in batch[start : start + _SLICE]:
            yield _row(entry)
        await asyncio.sleep(0)
