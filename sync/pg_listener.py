"""The LISTEN connection: a doorbell for catch-ups, with heartbeat and reconnect.

A notification carries nothing: the change log is the truth and the catch-up reads
it. So the callback only sets the wake event, and after every (re)connect the
listener forces a catch-up, covering whatever committed while it was away.
Half-open TCP links raise nothing, hence the heartbeat query with a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable

import asyncpg

from pdp.backoff import Backoff
from pdp.errors import DependencyError
from pdp.pg.errors import DRIVER_ERRORS

log = logging.getLogger(__name__)

CHANNEL = "pdp_changes"


class PgListener:
    """Owns one dedicated (never pooled) connection LISTENing on `pdp_changes`."""

    def __init__(
        self,
        url: str,
        wake: asyncio.Event,
        *,
        heartbeat: float = 5.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 10.0,
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        self._url = url
        self._wake = wake
        self._heartbeat = heartbeat
        self._backoff = Backoff(backoff_initial, backoff_max)
        self._on_reconnect = on_reconnect
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self.connected = asyncio.Event()  # set while LISTEN is active
        self.disconnected = asyncio.Event()  # set once a connection is found dead
        self.connections = 0

    def _notified(self, conn: object, pid: int, channel: str, payload: str) -> None:
        # Synchronous on purpose: asyncpg runs it in order, with no task per message.
        self._wake.set()

    def _terminated(self, conn: object) -> None:
        self._lost.set()

    async def connect(self) -> None:
        """Connect, LISTEN (committed: autocommit), then force a catch-up."""
        conn = await asyncpg.connect(
            self._url,
            timeout=self._heartbeat,
            server_settings={"application_name": "pdp-listen"},
        )
        self._lost.clear()
        conn.add_termination_listener(self._terminated)
        try:
            await conn.add_listener(CHANNEL, self._notified)
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn
        self.connections += 1
        self.disconnected.clear()
        self.connected.set()
        # Anything committed before LISTEN took effect is found by this catch-up.
        self._wake.set()

    async def self_test(self, sender: asyncpg.Connection, timeout: float = 2.0) -> None:
        """Prove notifications reach this connection (a transaction-mode pooler loses them)."""
        assert self._conn is not None
        channel = f"pdp_selftest_{uuid.uuid4().hex[:12]}"
        received = asyncio.Event()

        def ping(*_: object) -> None:
            received.set()

        await self._conn.add_listener(channel, ping)
        try:
            await sender.execute("SELECT pg_notify($1, 'ping')", channel)
            await asyncio.wait_for(received.wait(), timeout)
        except TimeoutError:
            raise DependencyError(
                "the LISTEN connection does not receive notifications: it must reach "
                "PostgreSQL directly or through a session-mode pooler, never a "
                "transaction-mode one"
            ) from None
        finally:
            await self._conn.remove_listener(channel, ping)

    async def run(self) -> None:
        """Heartbeat the connection; on loss or timeout reconnect with jittered backoff.

        Runs until cancelled; only a failure that is not PostgreSQL's escapes.
        """
        while True:
            if self._conn is None:
                try:
                    await self.connect()
                except DRIVER_ERRORS as exc:
                    log.warning("listener cannot connect (%s); retrying", exc)
                    await self._backoff.wait()
                    continue
                log.info("listener reconnected")
                self._backoff.reset()
                if self._on_reconnect is not None:
                    self._on_reconnect()
            if not await self._alive():
                log.warning("listener connection lost")
                self._discard()

    async def _alive(self) -> bool:
        """Wait one heartbeat period; False when the link died or the probe failed."""
        try:
            await asyncio.wait_for(self._lost.wait(), self._heartbeat)
            return False
        except TimeoutError:
            pass
        assert self._conn is not None
        try:
            await self._conn.fetchval("SELECT 1", timeout=self._heartbeat)
        except DRIVER_ERRORS:
            return False
        return not self._lost.is_set()

    def _discard(self) -> None:
        self.connected.clear()
        self.disconnected.set()
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def close(self) -> None:
        self.connected.clear()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close(timeout=2)
