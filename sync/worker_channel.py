"""The owner -> worker channel of `pdp serve --workers N`: one batch stream, one order.

The owner process runs the only catch-up loop (`sync.service.SyncService`); its sink
(`Publisher.sink`) ships every batch, before the owner applies it, to every worker
over that worker's Unix socketpair, and each worker (`Follower`) applies the same
batches in the same order. The entries are the relay's (`sync.redis_stream`:
`entry_fields` / `decode_entry`), framed for a stream socket:

    frame  = length (4 bytes, big-endian) + field*
    field  = length (4 bytes, big-endian) + bytes      (name, value, name, value, ...)

Continuity is the relay follower's rule: an entry applies only if its epoch and
`from` snapshot are the worker's own; a worker is forked from the owner's state, so
the first entry it receives starts where it stands. A mismatch or an undecodable
frame means the chain is broken: the worker stops (`Broken`) and the owner forks a
fresh one from its current state (simpler than repairing, and exact). A full reload
is never shipped: the owner re-forks its workers from the new state instead (their
pages stay shared with it; see `pdp.sidecar_workers`).

Upstream, a worker writes single bytes: `READY` once it serves, `WAKE` when it wants
a catch-up now (a request waits for a revision token): the owner sets its wake
event, as the listener does. End of file either way means the other side is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
import zlib
from collections.abc import AsyncIterator, Callable

from pdp.engine import Snapshot, TenantState
from pdp.replica import Replica
from pdp.supervisor import Body
from sync import apply
from sync import redis_stream as rs
from sync.metrics import NullMetrics, SyncMetrics
from sync.pg_read import Batch

log = logging.getLogger(__name__)

READY = b"R"
WAKE = b"W"
_LEN = struct.Struct("!I")
MAX_FRAME = 1 << 30  # a frame longer than this is not ours
BIG_BATCH = 2000  # rows: encode (json + zlib) off the event loop above this
SEND_TIMEOUT = 10.0  # seconds a worker may take to read a frame before it is cut off
BIG_FRAME = 256 * 1024  # bytes: frames larger than this are decoded off the event loop


CLOSED = "the owner closed the channel"


class Broken(Exception):
    """The worker's chain of batches is broken (gap, bad frame, or the owner is gone)."""


def encode(fields: list[str | bytes]) -> bytes:
    """One frame holding `fields` (as `redis_stream.entry_fields` returns them)."""
    parts = [f.encode() if isinstance(f, str) else f for f in fields]
    body = b"".join(_LEN.pack(len(p)) + p for p in parts)
    return _LEN.pack(len(body)) + body


def decode(seq: int, body: bytes) -> rs.Entry:
    """The entry in a frame's body; ValueError when it is not one of ours."""
    values: list[bytes] = []
    at = 0
    while at < len(body):
        (size,) = _LEN.unpack_from(body, at)
        at += _LEN.size
        if at + size > len(body):
            raise ValueError("truncated field")
        values.append(body[at : at + size])
        at += size
    if len(values) % 2:
        raise ValueError("odd number of fields")
    return rs.decode_entry(str(seq), dict(zip(values[::2], values[1::2], strict=True)))


def _fields(batch: Batch, start: str, at: float) -> list[str | bytes]:
    kind = "changes" if batch.changes or batch.tenants else "heartbeat"
    return rs.entry_fields(
        kind, batch.epoch, start, str(batch.snapshot), at,
        batch.changes, batch.tenants, batch.committed_at,
    )  # fmt: skip


class Link:
    """The owner's end of one worker's socketpair."""

    def __init__(self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.name = name
        self.reader = reader
        self.writer = writer
        self.live = True  # False: no more frames (its chain ended, or it is being replaced)

    def close(self) -> None:
        self.live = False
        self.writer.close()


class Publisher:
    """The owner's sink: ships each non-full batch to every live link, in order.

    Never raises (a worker that cannot keep up is cut off and replaced, the owner's
    own loop goes on). A full batch is not shipped: `reloaded` is set and every link
    stops receiving, since their workers stand before the reload; the owner re-forks.
    """

    def __init__(
        self,
        replica: Replica,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._replica = replica
        self._clock = clock
        self._wall = wall
        self.links: list[Link] = []
        self.reloaded = asyncio.Event()  # a full batch passed: fork workers again
        self.shipped = 0
        self._frame: bytes | None = None  # the frame being shipped (before it is applied)

    def attach(self, link: Link) -> None:
        """Add a worker forked from the owner's current state. Never awaits.

        A frame being shipped has not been applied by the owner yet, so the new worker,
        a copy of the owner, needs it too.
        """
        self.links.append(link)
        if self._frame is not None:
            link.writer.write(self._frame)

    async def sink(self, batch: Batch) -> None:
        if batch.full is not None:
            for link in self.links:
                link.live = False
            self.reloaded.set()
            return
        if not any(link.live for link in self.links):
            return
        at = self._wall() - max(0.0, self._clock() - batch.synced_at)
        start = str(self._replica.revision)
        if len(batch.changes) + sum(map(len, batch.tenants.values())) > BIG_BATCH:
            frame = await asyncio.to_thread(lambda: encode(_fields(batch, start, at)))
        else:
            frame = encode(_fields(batch, start, at))
        links = [link for link in self.links if link.live]
        self._frame = frame
        try:
            for link in links:
                link.writer.write(frame)
            await asyncio.gather(*(self._drain(link) for link in links))
        finally:
            self._frame = None
        self.shipped += 1

    async def _drain(self, link: Link) -> None:
        try:
            async with asyncio.timeout(SEND_TIMEOUT):
                await link.writer.drain()
        except TimeoutError:
            if link.live:
                log.warning("worker %s has not read a batch in %gs: cut off", link.name,
                            SEND_TIMEOUT)  # fmt: skip
            link.close()
        except OSError as exc:  # it exited (its exit is the owner's to report)
            log.debug("worker %s: channel closed (%r)", link.name, exc)
            link.close()


class Follower:
    """A worker's end: applies every frame to `replica`; `Broken` ends the worker.

    A supervised worker (`pdp.supervisor`): `lifespan` opens the socket, its body reads
    frames until the chain breaks. The supervisor must not restart it (nothing could
    resume the chain): the worker process stops instead (`on_broken`).
    """

    def __init__(
        self,
        sock: socket.socket,
        replica: Replica,
        metrics: SyncMetrics | None = None,
        *,
        on_broken: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._sock = sock
        self._replica = replica
        self._metrics = metrics or NullMetrics()
        self._on_broken = on_broken
        self._clock = clock
        self._wall = wall
        self._writer: asyncio.StreamWriter | None = None
        self.entries = 0

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[Body]:
        reader, writer = await asyncio.open_unix_connection(sock=self._sock)
        self._writer = writer
        try:
            yield lambda: self._run(reader)
        finally:
            self._writer = None
            writer.close()

    def send(self, signal: bytes) -> None:
        """Tell the owner something (`READY`, `WAKE`); dropped when the channel is closed."""
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(signal)

    async def _run(self, reader: asyncio.StreamReader) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._wakes())
            try:
                await self._follow(reader)
            except Broken as exc:
                # Nothing can resume the chain: the process stops (and is not ready
                # from now on); the owner forks a fresh worker if it still wants one.
                self._on_broken(str(exc))
                await asyncio.Event().wait()

    async def _wakes(self) -> None:
        """Forward the replica's wake event (a revision wait) to the owner."""
        while True:
            await self._replica.wake.wait()
            self._replica.wake.clear()
            self.send(WAKE)

    async def _follow(self, reader: asyncio.StreamReader) -> None:
        seq = 0
        while True:
            try:
                (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
                if size > MAX_FRAME:
                    raise Broken(f"frame of {size} bytes")
                body = await reader.readexactly(size)
            except asyncio.IncompleteReadError as exc:
                raise Broken(CLOSED if not exc.partial else "truncated frame") from None
            except OSError as exc:
                raise Broken(f"the channel failed: {exc!r}") from None
            seq += 1
            try:
                if size > BIG_FRAME:
                    entry = await asyncio.to_thread(decode, seq, body)
                else:
                    entry = decode(seq, body)
            except (ValueError, KeyError, TypeError, struct.error, zlib.error) as exc:
                raise Broken(f"undecodable batch {seq}: {exc!r}") from None
            # Tenants replaced whole are built off the event loop (seconds for a big one).
            built = None
            if entry.tenants:
                built = await asyncio.to_thread(apply.build_tenants, entry.tenants)
            self._apply(entry, built)

    def _apply(self, entry: rs.Entry, built: dict[str, TenantState] | None = None) -> None:
        """Apply one entry that continues the replica's chain (`built`: the states of
        the tenants it replaces, `apply.build_tenants`). Never awaits."""
        replica = self._replica
        here = str(replica.revision)
        if entry.epoch != replica.epoch or entry.from_ != here:
            raise Broken(
                f"batch {entry.id} continues from {entry.epoch}|{entry.from_}, "
                f"the replica is at {replica.epoch}|{here}"
            )
        synced_at = self._clock() - max(0.0, self._wall() - entry.at)
        batch = Batch(
            Snapshot.parse(entry.to), entry.epoch, synced_at,
            tenants=entry.tenants, changes=entry.changes, committed_at=entry.committed_at,
        )  # fmt: skip
        apply.apply_changes(replica, batch, self._metrics, self._wall, built)
        self.entries += 1
