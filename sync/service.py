"""The sync worker as one unit: listener + catch-up loop, started and stopped together.

`SyncService.lifespan` has the shape of an aiohttp cleanup context (an async
generator taking the app) without importing aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Protocol

from pdp.replica import Replica
from sync.pg_listener import PgListener
from sync.pg_sync import PgSync, SyncMetrics, SyncOptions

log = logging.getLogger(__name__)


class ReconnectMetrics(SyncMetrics, Protocol):
    def reconnect(self) -> None: ...


class SyncService:
    """Keeps `replica` in step with the database at `url` until stopped."""

    def __init__(
        self,
        url: str,
        replica: Replica,
        metrics: ReconnectMetrics | None = None,
        options: SyncOptions | None = None,
        *,
        heartbeat: float = 5.0,
    ) -> None:
        self.options = options or SyncOptions()
        self.sync = PgSync(url, replica, metrics, self.options)
        self.listener = PgListener(
            url,
            replica.wake,
            heartbeat=heartbeat,
            backoff_initial=self.options.backoff_initial,
            backoff_max=self.options.backoff_max,
            on_reconnect=metrics.reconnect if metrics is not None else None,
        )
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Connect and prove notifications arrive (fails loudly), then run in the background.

        The first snapshot loads in the background: readiness says when it is in.
        """
        await self.listener.connect()
        await self.listener.self_test(await self.sync._connection())
        for name, coro in (("pdp-listener", self.listener.run()), ("pdp-sync", self.sync.run())):
            task = asyncio.create_task(coro, name=name)
            task.add_done_callback(_report_crash)
            self._tasks.append(task)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.listener.close()
        await self.sync.close()

    async def lifespan(self, _app: object) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("%s stopped: %r", task.get_name(), task.exception())
