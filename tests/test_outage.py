"""Outage edges, end to end through a TcpProxy the test cuts: the whole sidecar app.

- After a refused-connection outage long enough for an unbounded backoff to grow
  (about 8 s), the first correct answer comes within about a second of the
  database answering again: the reconnect backoff is capped (sync/options.py).
- During an outage a request demanding a revision (`X-PDP-Min-Revision`) fails closed
  within PDP_CONSISTENCY_WAIT_MS plus the fallback's bound, whether the link refuses
  or silently swallows traffic.

The deadlines are generous for a loaded 2-core box but well below what the old
behaviour took (recovery 4.9-6.2 s, failing closed 4.2 s).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from pdp.config import Settings
from pdp.sidecar import sidecar_app
from sync.pg_fallback import FALLBACK_TIMEOUT
from tests.pg_url import proxied
from tests.tcp_proxy import TcpProxy

OUTAGE_SECONDS = 8.0  # an uncapped doubling backoff reaches 3.2-6.4 s delays by then
RECOVERY_DEADLINE = 3.0
WAIT_MS = 200
FAIL_CLOSED_DEADLINE = WAIT_MS / 1000 + FALLBACK_TIMEOUT + 1.0  # 1 s of scheduling slack
BODY = {
    "subject": {"type": "user", "id": "u", "properties": {"tenant": "t"}},
    "action": {"name": "write"},
    "resource": {"type": "doc", "id": "1"},
}


@pytest.fixture
async def sidecar(
    db_url: str, pg: asyncpg.Connection, aiohttp_client: AiohttpClient
) -> AsyncIterator[tuple[TcpProxy, TestClient[Any, Any]]]:
    await pg.execute(
        """INSERT INTO pdp.tenants (id) VALUES ('t');
           INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'u');
           INSERT INTO pdp.roles (tenant_id, id) VALUES ('t', 'writer');
           INSERT INTO pdp.role_permissions VALUES ('t', 'writer', 'doc:write');"""
    )
    settings = Settings(
        max_staleness_seconds=60.0, poll_interval_seconds=0.2, heartbeat_seconds=0.5,
        verify_interval_seconds=3600, consistency_wait_ms=WAIT_MS,
    )  # fmt: skip
    async with proxied(db_url) as (tcp, via):
        client = await aiohttp_client(sidecar_app(settings, via))
        await _until(lambda: _ready(client), 15)
        yield tcp, client


async def _ready(client: TestClient[Any, Any]) -> bool:
    return (await client.get("/readyz")).status == 200


async def _until(predicate: Callable[[], Awaitable[bool]], within: float) -> float:
    """Poll `predicate` (behind the HTTP API: no event) until true; seconds it took."""
    started = time.monotonic()
    async with asyncio.timeout(within):
        while not await predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return time.monotonic() - started


async def _decision(client: TestClient[Any, Any], headers: dict[str, str] | None = None) -> Any:
    resp = await client.post("/access/v1/evaluation", json=BODY, headers=headers or {})
    assert resp.status == 200
    return await resp.json()


async def _grant(pg: asyncpg.Connection) -> str:
    """Give u the writer role; the transaction id (an X-PDP-Min-Revision value)."""
    async with pg.transaction():
        await pg.execute("INSERT INTO pdp.user_roles (tenant_id, user_id, role_id) "
                         "VALUES ('t', 'u', 'writer')")  # fmt: skip
        return str(await pg.fetchval("SELECT pg_current_xact_id()::text"))


async def test_recovery_after_a_refused_outage_is_within_a_second_or_so(
    sidecar: tuple[TcpProxy, TestClient[Any, Any]], pg: asyncpg.Connection
) -> None:
    tcp, client = sidecar
    assert (await _decision(client))["decision"] is False
    await tcp.refuse()
    # The scenario is an outage of this length (the backoff grows with time down).
    await asyncio.sleep(OUTAGE_SECONDS)
    await _grant(pg)  # written while the sidecar cannot see it
    assert (await _decision(client))["decision"] is False
    await tcp.listen_again()
    took = await _until(
        lambda: _granted(client), RECOVERY_DEADLINE + 10
    )  # fail with the figure, not a bare timeout
    print(f"first correct answer {took:.3f} s after the database answered")
    assert took < RECOVERY_DEADLINE, f"first correct answer {took:.2f} s after the database"


async def _granted(client: TestClient[Any, Any]) -> bool:
    return bool((await _decision(client))["decision"])


async def test_reconnect_attempts_keep_coming_through_a_long_outage(
    sidecar: tuple[TcpProxy, TestClient[Any, Any]],
) -> None:
    """Every connection is closed at once (the proxy accepts, so it sees each attempt):
    late in the outage the listener and the catch-up loop still try about once a second
    each, where a doubling backoff would have slowed to one try every 3-6 s."""
    tcp, _client = sidecar
    tcp.cut()
    started = time.monotonic()
    await asyncio.sleep(OUTAGE_SECONDS)  # the scenario: this long without a database
    late = [t for t in tcp.accepted if t > started + OUTAGE_SECONDS / 2]
    # Two loops, each waiting at most 1 s (jittered down to 0.5 s) between attempts.
    assert len(late) >= OUTAGE_SECONDS / 2 * 2 * 0.75, f"{len(late)} attempts in the last 4 s"
    tcp.restore()


@pytest.mark.parametrize("outage", ["refuse", "blackhole"])
async def test_min_revision_during_an_outage_fails_closed_in_bounded_time(
    sidecar: tuple[TcpProxy, TestClient[Any, Any]], pg: asyncpg.Connection, outage: str
) -> None:
    tcp, client = sidecar
    if outage == "refuse":
        await tcp.refuse()
    else:
        tcp.blackhole()
    xid = await _grant(pg)
    for _ in range(3):  # the first (connecting) and the later ones alike
        started = time.monotonic()
        answer = await _decision(client, {"X-PDP-Min-Revision": xid})
        took = time.monotonic() - started
        assert answer["decision"] is False, answer
        assert answer["context"]["reason"] == "revision_unavailable", answer
        print(f"{outage}: failed closed after {took:.3f} s")
        assert took < FAIL_CLOSED_DEADLINE, f"failed closed after {took:.2f} s"
    if outage == "blackhole":
        tcp.cut()
        tcp.restore()
    else:
        await tcp.listen_again()
    # Once the database answers, the same request is granted (memory or the SQL check).
    await _until(lambda: _granted_at(client, xid), 15)


async def _granted_at(client: TestClient[Any, Any], xid: str) -> bool:
    return bool((await _decision(client, {"X-PDP-Min-Revision": xid}))["decision"])
