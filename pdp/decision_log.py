"""Decision logs: the hot path records an entry without waiting; a worker writes batches.

    handler ──record()──> bounded buffer ──worker (supervised)──> sink.write(batch)
                 │ full: dropped, counted in pdp_decision_log_dropped_total
                 └ returns the decision id, or None when not kept (not sampled, dropped)

`DecisionLog.record` never awaits, locks or does I/O: it samples (denies always, unless
PDP_DECISION_LOG_DENIES=sampled), appends a tuple to a list bounded by
PDP_DECISION_LOG_QUEUE_SIZE and sets an event. The worker (`DecisionLog.lifespan`, run by
`pdp.supervisor`) takes up to PDP_DECISION_LOG_BATCH_SIZE entries at a time (waiting
`LINGER_SECONDS` for more when fewer are there) and awaits the sink: `StdoutSink`
writes JSON lines from a worker thread (a slow or blocked stdout fills the buffer,
never the event loop); the PostgreSQL sink (`sync.pg_decision_log`)
COPYs into pdp.decision_log. A batch whose write fails is counted as dropped and the
worker crashes (the supervisor logs it and restarts it); entries still buffered wait.

A decision id is a per-process random prefix and a counter (as request ids): unique
without an urandom call per decision. The AuthZEN responses carry it in
`context.decision_id`, forward-auth in `X-PDP-Decision-Id`; it is the row's `id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import logging
import os
import random
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import IO, Protocol

from pdp.config import Settings
from pdp.protocol import dumps
from pdp.supervisor import Body, Lifespan

log = logging.getLogger(__name__)

LINGER_SECONDS = 0.1  # a write waits this long for more entries unless a batch is full

# One entry, in this order (the columns of pdp.decision_log, `time` a Unix time here):
# id, time, endpoint, tenant, subject_type, subject, action, resource_type, resource_id,
# decision, reason, revision (text or an object whose str() is the text), latency (s).
Entry = tuple[str, float, str, str, str, str, str, str, str, bool, str, object, float]
FIELDS = (
    "id", "time", "endpoint", "tenant_id", "subject_type", "subject_id", "action",
    "resource_type", "resource_id", "decision", "reason", "revision", "latency_ms",
)  # fmt: skip


class Sink(Protocol):
    async def write(self, batch: Sequence[Entry]) -> None: ...


class DroppedCounter(Protocol):
    def decision_log_dropped(self, n: int = 1) -> None: ...


SinkOpener = Callable[[], AbstractAsyncContextManager[Sink]]


class DecisionLog:
    """The bounded buffer between the handlers and the writer."""

    def __init__(
        self,
        metrics: DroppedCounter,
        *,
        sample: float = 1.0,
        always_denies: bool = True,
        queue_size: int = 10_000,
        batch_size: int = 1000,
        linger: float = LINGER_SECONDS,
    ) -> None:
        self._metrics = metrics
        self._sample = sample
        self._always_denies = always_denies
        self._max = queue_size
        self._batch = batch_size
        self._linger = linger
        self._entries: list[Entry] = []
        self._wake = asyncio.Event()
        self._prefix = "d" + uuid.uuid4().hex[:15]
        self._ids = itertools.count(1)

    @classmethod
    def from_settings(cls, settings: Settings, metrics: DroppedCounter) -> DecisionLog:
        return cls(
            metrics,
            sample=settings.decision_log_sample,
            always_denies=settings.decision_log_denies == "always",
            queue_size=settings.decision_log_queue_size,
            batch_size=settings.decision_log_batch_size,
        )

    def new_id(self) -> str:
        return f"{self._prefix}{next(self._ids):012x}"

    def __len__(self) -> int:
        return len(self._entries)

    # --- the hot path: never awaits -------------------------------------------------

    def record(  # noqa: PLR0917 -- one entry's columns, positional: the hot path
        self,
        decision_id: str | None,
        now: float,
        endpoint: str,
        tenant: str,
        subject_type: str,
        subject: str,
        action: str,
        resource_type: str,
        resource_id: str,
        allowed: bool,
        reason: str,
        revision: object,
        latency: float,
    ) -> str | None:
        """Keep one decision (sampled); its id, or None when it is not kept.

        `decision_id` None: a new id is drawn (only for a kept entry)."""
        if (allowed or not self._always_denies) and (
            self._sample < 1.0 and random.random() >= self._sample
        ):
            return None
        if len(self._entries) >= self._max:
            self._metrics.decision_log_dropped()
            return None
        if decision_id is None:
            decision_id = f"{self._prefix}{next(self._ids):012x}"
        self._entries.append(
            (
                decision_id, now, endpoint, tenant, subject_type, subject, action,
                resource_type, resource_id, allowed, reason, revision, latency,
            )
        )  # fmt: skip
        if not self._wake.is_set():
            self._wake.set()
        return decision_id

    # --- the worker -----------------------------------------------------------------

    def _take(self) -> list[Entry]:
        entries = self._entries
        if len(entries) <= self._batch:
            self._entries = []
            return entries
        batch = entries[: self._batch]
        del entries[: self._batch]
        return batch

    async def _drain(self, sink: Sink) -> None:
        while True:
            await self._wake.wait()
            if len(self._entries) < self._batch:
                # Gather a bigger batch: each write (a COPY, a commit) has a fixed cost
                # that thousands of one-row batches a second would pay over and over.
                await asyncio.sleep(self._linger)
            self._wake.clear()
            while self._entries:
                batch = self._take()
                try:
                    await sink.write(batch)
                except BaseException:
                    self._metrics.decision_log_dropped(len(batch))
                    raise

    def lifespan(self, open_sink: SinkOpener) -> Lifespan:
        """A supervised worker writing through the sink `open_sink` opens on each start."""

        @contextlib.asynccontextmanager
        async def running() -> AsyncIterator[Body]:
            async with open_sink() as sink:

                async def body() -> None:
                    await self._drain(sink)

                if self._entries:
                    self._wake.set()  # written before a restart: drain them now
                yield body

        return running


def utc(unix_time: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(unix_time, datetime.UTC)


def as_json(entry: Entry) -> dict[str, object]:
    """One entry as its JSON line's object (AuthZEN-shaped subject and resource)."""
    (
        decision_id, now, endpoint, tenant, subject_type, subject, action, resource_type,
        resource_id, allowed, reason, revision, latency,
    ) = entry  # fmt: skip
    return {
        "decision_id": decision_id,
        "time": utc(now).isoformat(timespec="microseconds"),
        "endpoint": endpoint,
        "tenant": tenant,
        "subject": {"type": subject_type, "id": subject},
        "action": {"name": action},
        "resource": {"type": resource_type, "id": resource_id},
        "decision": allowed,
        "reason": reason,
        "revision": None if revision is None else str(revision),
        "latency_ms": round(latency * 1000, 3),
    }


PIPE_BUF = 4096  # POSIX: a pipe write up to this size is never interleaved with another


class StdoutSink:
    """JSON lines on a binary stream (stdout), written from a worker thread.

    `shared`: other processes write the same stdout (`pdp serve --workers`): each
    write() holds whole lines, at most PIPE_BUF bytes unless one line is longer, so
    lines of different workers never interleave on a pipe (nor on a file: Linux
    serialises writes to one open file).
    """

    def __init__(self, stream: IO[bytes] | None = None, *, shared: bool = False) -> None:
        self._stream = stream
        self._shared = shared

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[Sink]:
        yield self

    async def write(self, batch: Sequence[Entry]) -> None:
        await asyncio.to_thread(self._write, batch)

    def _write(self, batch: Sequence[Entry]) -> None:
        stream = self._stream if self._stream is not None else sys.stdout.buffer
        if self._shared:
            _write_lines(stream, [dumps(as_json(e)) + b"\n" for e in batch])
            return
        stream.write(b"".join(dumps(as_json(e)) + b"\n" for e in batch))
        stream.flush()


def _write_lines(stream: IO[bytes], lines: list[bytes]) -> None:
    """Whole lines in writes of at most PIPE_BUF bytes (a longer line alone)."""
    stream.flush()
    fd = stream.fileno()
    chunk: list[bytes] = []
    size = 0
    for line in [*lines, b""]:
        if chunk and (not line or size + len(line) > PIPE_BUF):
            data = memoryview(b"".join(chunk))
            while data:
                data = data[os.write(fd, data) :]
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
