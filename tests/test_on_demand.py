"""On-demand mode (PDP_CACHE_MODE=on_demand), end to end: the whole sidecar app.

Users' rows are loaded on first use; a change to a cached user's rows reaches the
next check; an uncached user changed meanwhile is loaded fresh; subject search is
refused with 400; a load that cannot reach PostgreSQL denies (`user_unavailable`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from pdp.config import Settings
from pdp.errors import ConfigError
from pdp.protocol import MIN_REVISION
from pdp.sidecar import sidecar_app
from tests.pg_url import proxied
from tests.tcp_proxy import TcpProxy
from tests.waiting import until_true as _until


@pytest.fixture
async def proxy(db_url: str, pg: asyncpg.Connection) -> AsyncIterator[tuple[TcpProxy, str]]:
    await pg.execute(
        """INSERT INTO pdp.tenants (id) VALUES ('t');
           INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'u'), ('t', 'v'), ('t', 'w');
           INSERT INTO pdp.roles (tenant_id, id) VALUES ('t', 'reader');
           INSERT INTO pdp.role_permissions VALUES ('t', 'reader', 'doc:read');
           INSERT INTO pdp.user_roles (tenant_id, user_id, role_id) VALUES ('t', 'u', 'reader');"""
    )
    async with proxied(db_url) as (tcp, via):
        yield tcp, via


def _body(user: str) -> dict[str, Any]:
    return {
        "subject": {"type": "user", "id": user, "properties": {"tenant": "t"}},
        "action": {"name": "read"},
        "resource": {"type": "doc", "id": "1"},
    }


async def _commit(pg: asyncpg.Connection, sql: str) -> str:
    async with pg.transaction():
        xid = await pg.fetchval("SELECT pg_current_xact_id()::text")
        await pg.execute(sql)
    return str(xid)


async def _check(client: TestClient[Any, Any], user: str, xid: str | None = None) -> dict[str, Any]:
    headers = {} if xid is None else {MIN_REVISION: xid}
    resp = await client.post("/access/v1/evaluation", json=_body(user), headers=headers)
    assert resp.status == 200
    answer: dict[str, Any] = await resp.json()
    return answer


async def _metric(client: TestClient[Any, Any], name: str) -> float:
    text = await (await client.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_on_demand_mode_end_to_end(
    proxy: tuple[TcpProxy, str], pg: asyncpg.Connection, aiohttp_client: AiohttpClient
) -> None:
    tcp, url = proxy
    settings = Settings(
        cache_mode="on_demand", cache_users=10, max_staleness_seconds=60,
        poll_interval_seconds=0.2, heartbeat_seconds=0.3,
    )  # fmt: skip
    client = await aiohttp_client(sidecar_app(settings, url))

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200

    await _until(ready, 10)
    assert (await _check(client, "u"))["decision"] is True
    assert (await _check(client, "u"))["decision"] is True
    assert await _metric(client, "pdp_cache_misses_total") == 1
    assert await _metric(client, "pdp_cache_hits_total") == 1

    # A cached user's assignment removed: the next check (at that revision) sees it.
    xid = await _commit(pg, "DELETE FROM pdp.user_roles WHERE user_id = 'u'")
    assert (await _check(client, "u", xid))["decision"] is False
    # An uncached user granted meanwhile: the batch is dropped, the load reads it fresh.
    xid = await _commit(
        pg, "INSERT INTO pdp.user_roles (tenant_id, user_id, role_id) VALUES ('t', 'v', 'reader')"
    )
    assert (await _check(client, "v", xid))["decision"] is True
    batch = {
        "subject": {"type": "user", "id": "u", "properties": {"tenant": "t"}},
        "action": {"name": "read"},
        "resource": {"type": "doc", "id": "1"},
        "evaluations": [
            {},
            {"subject": {"type": "user", "id": "v", "properties": {"tenant": "t"}}},
        ],
    }
    resp = await client.post("/access/v1/evaluations", json=batch)
    assert resp.status == 200
    assert [e["decision"] for e in (await resp.json())["evaluations"]] == [False, True]

    search = {"action": {"name": "read"}, "resource": {"type": "doc", "id": "1"},
              "subject": {"type": "user", "properties": {"tenant": "t"}}}  # fmt: skip
    resp = await client.post("/access/v1/search/subject", json=search)
    assert resp.status == 400
    assert "on_demand" in (await resp.json())["message"]

    # A bulk load (capture off, one marker) replaces the tenant: its loaded users are
    # forgotten and read fresh, so u's new grant shows although no row change named it.
    async with pg.transaction():
        await pg.execute("SET LOCAL pdp.capture = 'off'")
        await pg.execute(
            "INSERT INTO pdp.user_roles (tenant_id, user_id, role_id) VALUES ('t', 'u', 'reader')"
        )
        await pg.execute("SELECT pdp.mark_bulk_load('t')")
        xid = str(await pg.fetchval("SELECT pg_current_xact_id()::text"))
    assert (await _check(client, "u", xid))["decision"] is True

    # PostgreSQL unreachable: an uncached user is denied with a reason, a cached one is not.
    tcp.cut()
    answer = await _check(client, "w")
    assert answer["decision"] is False
    assert answer["context"]["reason"] == "user_unavailable"
    assert (await _check(client, "u"))["decision"] is True  # loaded after the bulk load


def test_on_demand_needs_direct_sync_and_no_snapshot_file() -> None:
    with pytest.raises(ConfigError, match="PDP_CACHE_MODE=on_demand"):
        Settings(cache_mode="on_demand", sync_source="redis", redis_url="redis://127.0.0.1:1")
    with pytest.raises(ConfigError, match="PDP_CACHE_MODE=on_demand"):
        Settings(cache_mode="on_demand", snapshot_file=Path("pdp.snap"))


async def test_a_batch_naming_more_users_than_the_cache_denies_the_evicted(
    proxy: tuple[TcpProxy, str], pg: asyncpg.Connection, aiohttp_client: AiohttpClient
) -> None:
    _, url = proxy
    await pg.execute(
        "INSERT INTO pdp.user_roles (tenant_id, user_id, role_id) VALUES ('t', 'v', 'reader')"
    )
    settings = Settings(cache_mode="on_demand", cache_users=1, poll_interval_seconds=0.2)
    client = await aiohttp_client(sidecar_app(settings, url))

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200

    await _until(ready, 10)
    batch = {
        "action": {"name": "read"},
        "resource": {"type": "doc", "id": "1"},
        "evaluations": [
            {"subject": {"type": "user", "id": user, "properties": {"tenant": "t"}}}
            for user in ("u", "v")
        ],
        "options": {"include_reasons": True},
    }
    resp = await client.post("/access/v1/evaluations", json=batch)
    assert resp.status == 200
    entries = (await resp.json())["evaluations"]
    # One of the two was evicted by the other's load: it denies, never wrongly allows.
    assert sorted(e["decision"] for e in entries) == [False, True]
    assert [e["context"]["reason"] for e in entries if not e["decision"]] == ["user_unavailable"]
    assert (await _check(client, "u"))["decision"] is True  # alone it loads again
