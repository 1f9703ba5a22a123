"""Fully consistent checks in PostgreSQL (`pdp.check`), for read-your-writes fallbacks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from pdp.errors import DependencyError
from pdp.pg.errors import DRIVER_ERRORS

CHECK = "SELECT pdp.check($1, $2, $3, $4, $5)"
# The whole fallback (connect or acquire, then the query) within this: a request that
# demanded a revision fails closed within PDP_CONSISTENCY_WAIT_MS plus this.
FALLBACK_TIMEOUT = 1.0


class PgFallback:
    """Answers a check from the database itself through a small pool.

    Used only when a request demands a revision the replica has not reached in
    time; the hot path never comes here.
    """

    def __init__(self, url: str, max_size: int = 4, timeout: float = FALLBACK_TIMEOUT) -> None:
        self._url = url
        self._max_size = max_size
        self._timeout = timeout
        self._pool: asyncpg.Pool | None = None

    async def __call__(self, tenant: str, user: str, rtype: str, rid: str, action: str) -> bool:
        pool = self._pool
        if pool is None:
            raise DependencyError("the PostgreSQL fallback is not started")
        conn: asyncpg.pool.PoolConnectionProxy[Any] | None = None
        try:
            # One deadline for all of it: acquiring may mean connecting.
            async with asyncio.timeout(self._timeout):
                conn = await pool.acquire()
                result = await conn.fetchval(CHECK, tenant, user, rtype, rid, action)
        except DRIVER_ERRORS as exc:
            if conn is not None:
                # Released as is, a connection whose query timed out waits for the
                # server to confirm the cancel (as long again on a dead link).
                conn.terminate()
            raise DependencyError(f"consistent check in PostgreSQL failed: {exc!r}") from exc
        finally:
            if conn is not None:
                await pool.release(conn)
        return result is True

    async def start(self) -> None:
        self._pool = await asyncpg.create_pool(
            self._url,
            min_size=0,
            max_size=self._max_size,
            timeout=self._timeout,  # connect
            server_settings={"application_name": "pdp-fallback"},
        )

    async def stop(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[PgFallback]:
        """The pool open for the duration of the block."""
        await self.start()
        try:
            yield self
        finally:
            await self.stop()
