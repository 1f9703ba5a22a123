"""The sync worker as one supervised unit: the listener and the catch-up loop together.

`SyncService.lifespan` is a worker for `pdp.supervisor.Supervisor`: entering it
connects the listener and proves notifications arrive (failing loudly, e.g. behind
a transaction-mode pooler); its body runs the listener's heartbeat and the catch-up
loop until cancelled. If either fails in a way that is not PostgreSQL's, both stop
and the supervisor restarts the whole worker from the replica's cursor. The first
snapshot loads in the body: readiness says when it is in. With a snapshot file
(`sync.file_snapshot`) the body restores it first and leaving writes it. With a
`read_url` (a hot standby) the catch-ups read the standby while the listener stays on
the primary (a standby delivers no notifications, and NOTIFY fails there).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from pdp.replica import Replica
from pdp.supervisor import Body
from sync.file_snapshot import SnapshotFile
from sync.metrics import NullMetrics, SyncMetrics
from sync.options import SyncOptions
from sync.pg_listener import PgListener
from sync.pg_sync import PgSync, Sink


class SyncService:
    """Keeps `replica` in step with the database at `url` while its lifespan runs."""

    def __init__(
        self,
        url: str,
        replica: Replica,
        metrics: SyncMetrics | None = None,
        options: SyncOptions | None = None,
        *,
        sink: Sink | None = None,
        snapshot_file: SnapshotFile | None = None,
        read_url: str | None = None,
    ) -> None:
        self.options = options or SyncOptions()
        metrics = metrics or NullMetrics()
        self.sync = PgSync(
            url, replica, metrics, self.options,
            sink=sink, snapshot_file=snapshot_file, read_url=read_url,
        )  # fmt: skip
        self.listener = PgListener(
            url,
            replica.wake,
            heartbeat=self.options.heartbeat,
            backoff_initial=self.options.backoff_initial,
            backoff_max=self.options.backoff_max,
            on_reconnect=metrics.reconnect,
        )

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[Body]:
        """Connect and self-test (raises on failure), yield the body, then disconnect."""
        try:
            await self.listener.connect()
            await self.listener.self_test(await self.sync.primary_connection())
            yield self._run
        finally:
            # The body has stopped (nothing applies now): write the snapshot file.
            await self.sync.save_snapshot_file()
            await self.listener.close()
            await self.sync.close()

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self.listener.run(), name="pdp-listener")
            group.create_task(self.sync.run(), name="pdp-sync")
