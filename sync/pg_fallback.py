"""Fully consistent checks in PostgreSQL (`pdp.check`), for read-your-writes fallbacks.

`pdp.check` is NULL when only conditional grants could allow: the candidates then come
from `pdp.check_candidates` (at the same time `p_at`) and are evaluated here with the
engine's evaluator (`pdp.conditions`), so SQL and memory decide alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg

from pdp import conditions
from pdp.errors import DependencyError
from pdp.pg.errors import DRIVER_ERRORS

CHECK = "SELECT pdp.check($1, $2, $3, $4, $5, $6)"
# The whole fallback (connect or acquire, then the queries) within this: a request that
# demanded a revision fails closed within PDP_CONSISTENCY_WAIT_MS plus this.
FALLBACK_TIMEOUT = 1.0
CANDIDATES = (
    "SELECT condition, user_attributes::text, resource_attributes::text "
    "FROM pdp.check_candidates($1, $2, $3, $4, $5, $6)"
)


def any_condition_true(  # noqa: PLR0917 -- the request's parts
    candidates: Iterable[Sequence[Any]],
    facts: conditions.Facts | None,
    user: str,
    rtype: str,
    rid: str,
    action: str,
    now: float,
) -> bool:
    """Whether one of `pdp.check_candidates`' rows (condition, user_attributes,
    resource_attributes) has a true condition for this request."""
    values = None
    for row in candidates:
        text, user_attrs, resource_attrs = row[0], row[1], row[2]
        if values is None:
            values = conditions.activation(
                facts, user, user_attrs, rtype, rid, resource_attrs, action, now
            )
        outcome, _ = conditions.evaluate(conditions.compile_condition(text), values)
        if outcome == conditions.TRUE:
            return True
    return False


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

    async def __call__(  # noqa: PLR0917 -- the request's parts
        self,
        tenant: str,
        user: str,
        rtype: str,
        rid: str,
        action: str,
        facts: conditions.Facts | None = None,
    ) -> bool:
        pool = self._pool
        if pool is None:
            raise DependencyError("the PostgreSQL fallback is not started")
        now = time.time()
        args = (tenant, user, rtype, rid, action, datetime.fromtimestamp(now, UTC))
        conn: asyncpg.pool.PoolConnectionProxy[Any] | None = None
        try:
            # One deadline for all of it: acquiring may mean connecting.
            async with asyncio.timeout(self._timeout):
                conn = await pool.acquire()
                result = await conn.fetchval(CHECK, *args)
                if result is None:  # only conditional grants could allow
                    rows = await conn.fetch(CANDIDATES, *args)
                    return any_condition_true(rows, facts, user, rtype, rid, action, now)
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
