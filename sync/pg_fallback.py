"""Fully consistent checks in PostgreSQL (`pdp.check`), for read-your-writes fallbacks."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg

from pdp.errors import DependencyError
from pdp.pg.errors import DRIVER_ERRORS

CHECK = "SELECT pdp.check($1, $2, $3, $4, $5)"


class PgFallback:
    """Answers a check from the database itself through a small pool.

    Used only when a request demands a revision the replica has not reached in
    time; the hot path never comes here.
    """

    def __init__(self, url: str, max_size: int = 4, timeout: float = 2.0) -> None:
        self._url = url
        self._max_size = max_size
        self._timeout = timeout
        self._pool: asyncpg.Pool | None = None

    async def __call__(self, tenant: str, user: str, rtype: str, rid: str, action: str) -> bool:
        if self._pool is None:
            raise DependencyError("the PostgreSQL fallback is not started")
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                result = await conn.fetchval(
                    CHECK, tenant, user, rtype, rid, action, timeout=self._timeout
                )
        except DRIVER_ERRORS as exc:
            raise DependencyError(f"consistent check in PostgreSQL failed: {exc}") from exc
        return result is True

    async def start(self) -> None:
        self._pool = await asyncpg.create_pool(
            self._url,
            min_size=0,
            max_size=self._max_size,
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
