"""Supervised workers crashing for real inside the whole sidecar (real PostgreSQL, HTTP).

Each worker is made to fail in a way the driver does not classify (a change-log row
the sync worker cannot read, a digest query that returns nothing): the crash is
logged with its traceback, counted in `pdp_worker_restarts_total{worker}`, the worker
restarted with backoff, and readiness tells the truth meanwhile.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient

from pdp.config import Settings
from pdp.sidecar import sidecar_app
from sync import pg_queries
from tests.waiting import until_true as _until

BASE = """
INSERT INTO pdp.tenants (id) VALUES ('t');
INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'alice'), ('t', 'bob');
INSERT INTO pdp.roles (tenant_id, id) VALUES ('t', 'viewer');
INSERT INTO pdp.role_permissions VALUES ('t', 'viewer', 'doc:read');
INSERT INTO pdp.user_roles (tenant_id, user_id, role_id) VALUES ('t', 'alice', 'viewer');
"""
SETTINGS = Settings(poll_interval_seconds=0.2, heartbeat_seconds=1.0, verify_interval_seconds=3600)


async def _metric(client: TestClient[Any, Any], name: str, **labels: str) -> float | None:
    text = await (await client.get("/metrics")).text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


async def _decision(client: TestClient[Any, Any], user: str) -> dict[str, Any]:
    body = {
        "subject": {"type": "user", "id": user, "properties": {"tenant": "t"}},
        "action": {"name": "read"},
        "resource": {"type": "doc", "id": "1"},
    }
    answer: dict[str, Any] = await (await client.post("/access/v1/evaluation", json=body)).json()
    return answer


async def _readyz(client: TestClient[Any, Any]) -> tuple[int, dict[str, Any]]:
    response = await client.get("/readyz")
    return response.status, await response.json()


async def test_sync_worker_crash_is_restarted_and_readiness_tells(
    db_url: str, pg: asyncpg.Connection, aiohttp_client: AiohttpClient, caplog: pytest.LogCaptureFixture
) -> None:
    await pg.execute(BASE)
    client = await aiohttp_client(sidecar_app(SETTINGS, db_url, restart_backoff=(0.2, 0.4)))

    async def ready() -> bool:
        return (await _readyz(client))[0] == 200

    await _until(ready)
    assert (await _decision(client, "alice"))["decision"] is True

    # A change-log row no trigger would write: its key lacks the key columns, so reading
    # it fails in Python (KeyError), not in the driver. Every catch-up crashes on it.
    await pg.execute(
        "INSERT INTO pdp.change_log (tenant_id, entity, op, key) VALUES ('t', 'users', 'update', '{}');"
        "SELECT pg_notify('pdp_changes', '')"
    )

    async def worker_down() -> bool:
        status, body = await _readyz(client)
        return status == 503 and body["reason"] == "worker_down" and body["workers_down"] == ["sync"]

    await _until(worker_down)
    restarts = await _metric(client, "pdp_worker_restarts_total", worker="sync")
    assert restarts is not None
    assert restarts >= 1
    crashes = [r for r in caplog.records if r.getMessage() == "worker sync crashed; restarting it"]
    assert crashes
    assert all(r.levelno == logging.ERROR and r.exc_info is not None for r in crashes)
    assert any("KeyError" in r.getMessage() or "KeyError" in repr(r.exc_info) for r in crashes)

    # Remove the poison: the restarted worker catches up from its cursor and is ready.
    await pg.execute("DELETE FROM pdp.change_log WHERE key = '{}'::jsonb")
    await pg.execute("INSERT INTO pdp.user_roles (tenant_id, user_id, role_id) VALUES ('t', 'bob', 'viewer')")

    async def bob_allowed() -> bool:
        return (await ready()) and (await _decision(client, "bob"))["decision"] is True

    await _until(bob_allowed)
    assert await _metric(client, "pdp_worker_up", worker="sync") == 1


async def test_verifier_crash_is_restarted_and_does_not_block_readiness(
    db_url: str,
    pg: asyncpg.Connection,
    aiohttp_client: AiohttpClient,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await pg.execute(BASE)
    # The digest query answers with nothing usable: turning it into a digest raises
    # TypeError, a failure the driver does not classify.
    monkeypatch.setattr(
        pg_queries, "TENANT_DIGEST", "SELECT NULL::numeric, count(*) FROM pdp.tenants WHERE id = $1"
    )
    settings = Settings(poll_interval_seconds=0.2, heartbeat_seconds=1.0, verify_interval_seconds=0.1)
    client = await aiohttp_client(sidecar_app(settings, db_url, restart_backoff=(0.1, 0.2)))

    async def restarted_twice() -> bool:
        return (await _metric(client, "pdp_worker_restarts_total", worker="verifier") or 0) >= 2

    await _until(restarted_twice)
    assert "worker verifier crashed; restarting it" in caplog.text
    assert "TypeError" in caplog.text
    # Not a critical worker: the sidecar stays ready and answers.
    status, body = await _readyz(client)
    assert (status, body["status"]) == (200, "ready")

    monkeypatch.undo()

    async def verified() -> bool:
        return await _metric(client, "pdp_cache_consistent", tenant="t") == 1

    await _until(verified)
