"""Bounded staleness, end to end: the whole sidecar app behind a TCP proxy we can cut.

With the database unreachable the data ages; past PDP_MAX_STALENESS_SECONDS checks
answer deny with reason `stale` (or, in `serve` mode, keep answering with an
X-PDP-Stale header) and /readyz fails; once the database is back the sidecar
recovers by itself. Waits are deadline-bounded polls of the public API.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from multidict import CIMultiDictProxy
from pytest_aiohttp import AiohttpClient

from pdp.config import Settings
from pdp.sidecar import sidecar_app
from tests.pg_url import proxied
from tests.tcp_proxy import TcpProxy

MAX_STALENESS = 1.0
BODY = {
    "subject": {"type": "user", "id": "u", "properties": {"tenant": "t"}},
    "action": {"name": "read"},
    "resource": {"type": "doc", "id": "1"},
}


@pytest.fixture
async def proxy(db_url: str, pg: asyncpg.Connection) -> AsyncIterator[tuple[TcpProxy, str]]:
    await pg.execute(
        """INSERT INTO pdp.tenants (id) VALUES ('t');
           INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'u');
           INSERT INTO pdp.roles (tenant_id, id) VALUES ('t', 'reader');
           INSERT INTO pdp.role_permissions VALUES ('t', 'reader', 'doc:read');
           INSERT INTO pdp.user_roles (tenant_id, user_id, role_id) VALUES ('t', 'u', 'reader');"""
    )
    async with proxied(db_url) as (tcp, via):
        yield tcp, via


async def _until(predicate: Callable[[], Awaitable[bool]], within: float) -> float:
    """Poll `predicate` until true; the seconds it took (fails past `within`)."""
    started = time.monotonic()
    async with asyncio.timeout(within):
        # The condition lives behind the HTTP API: no event to wait on, so poll it.
        while not await predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    return time.monotonic() - started


async def _evaluate(client: TestClient[Any, Any]) -> tuple[dict[str, Any], CIMultiDictProxy[str]]:
    resp = await client.post("/access/v1/evaluation", json=BODY)
    assert resp.status == 200
    answer: dict[str, Any] = await resp.json()
    return answer, resp.headers


@pytest.mark.parametrize("mode", ["deny", "serve"])
async def test_database_outage_turns_to_deny_then_recovers(
    proxy: tuple[TcpProxy, str], aiohttp_client: AiohttpClient, mode: str
) -> None:
    tcp, url = proxy
    settings = Settings(
        max_staleness_seconds=MAX_STALENESS, stale_mode=mode, poll_interval_seconds=0.2,
        heartbeat_seconds=0.3, verify_interval_seconds=3600,
    )
    client = await aiohttp_client(sidecar_app(settings, url))

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200

    await _until(ready, 10)
    answer, _ = await _evaluate(client)
    assert answer["decision"] is True

    tcp.cut()

    async def stale_answer() -> bool:
        answer, headers = await _evaluate(client)
        if mode == "deny":
            return answer["decision"] is False and answer["context"]["reason"] == "stale"
        return answer["decision"] is True and "X-PDP-Stale" in headers

    await _until(stale_answer, MAX_STALENESS + 3)
    assert (await client.get("/readyz")).status == 503

    tcp.restore()

    async def fresh_allow() -> bool:
        answer, headers = await _evaluate(client)
        return answer["decision"] is True and "X-PDP-Stale" not in headers

    await _until(fresh_allow, 15)
    assert await ready()
