"""Operations endpoints and the composition root."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import yaml
from aiohttp import web
from pytest_aiohttp import AiohttpClient

from pdp.replica import Replica
from pdp.web.app import METRICS, REPLICA, SETTINGS
from tests.test_web_support import Clock, loaded_replica, make_app, settings


async def test_healthz_always_ok(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(make_app(Replica(clock=Clock())))
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}
    assert response.headers["X-Request-ID"]


async def test_readyz_not_loaded(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(make_app(Replica(clock=Clock())))
    response = await client.get("/readyz")
    assert response.status == 503
    assert await response.json() == {"status": "not_ready", "reason": "not_loaded"}


async def test_readyz_ready_then_stale_then_ready(aiohttp_client: AiohttpClient) -> None:
    clock = Clock()
    replica = loaded_replica(clock)
    client = await aiohttp_client(make_app(replica, settings(max_staleness_seconds=2.0)))
    clock.advance(1.5)
    response = await client.get("/readyz")
    assert response.status == 200
    assert await response.json() == {
        "status": "ready",
        "staleness_seconds": 1.5,
        "max_staleness_seconds": 2.0,
        "revision": "100:105:102",
    }
    clock.advance(1.0)
    response = await client.get("/readyz")
    assert response.status == 503
    body = await response.json()
    assert (body["reason"], body["staleness_seconds"]) == ("stale", 2.5)
    replica.mark_synced(clock())
    assert (await client.get("/readyz")).status == 200


async def test_openapi_document_describes_every_route(aiohttp_client: AiohttpClient) -> None:
    app = make_app(loaded_replica(Clock()))
    client = await aiohttp_client(app)
    response = await client.get("/openapi.yaml")
    assert response.status == 200
    assert response.content_type == "application/yaml"
    document = yaml.safe_load(await response.text())
    assert document["openapi"].startswith("3.1")
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.method not in ("HEAD", "*") and route.resource is not None
    }
    documented = {(m, p) for p, ops in document["paths"].items() for m in ops}
    assert served == documented


async def test_state_under_app_keys_and_workers_in_cleanup_ctx(aiohttp_client: AiohttpClient) -> None:
    events: list[str] = []

    async def worker(app: web.Application) -> AsyncIterator[None]:
        events.append(f"start {app[SETTINGS].default_tenant} {app[REPLICA].ready}")
        yield
        events.append("stop")

    replica = loaded_replica(Clock())
    from prometheus_client import CollectorRegistry

    from pdp.web.app import build_app

    registry = CollectorRegistry()
    app = build_app(settings(), replica=replica, registry=registry, cleanup=[worker])
    assert app[REPLICA] is replica
    assert app[METRICS].registry is registry
    client = await aiohttp_client(app)
    assert events == ["start acme True"]
    await client.close()
    assert events == ["start acme True", "stop"]


@pytest.mark.parametrize("default_tenant", [None, "acme"])
async def test_openapi_document_requires_the_tenant_only_without_a_default(
    aiohttp_client: AiohttpClient, default_tenant: str | None
) -> None:
    app = make_app(loaded_replica(Clock()), settings(default_tenant=default_tenant))
    client = await aiohttp_client(app)
    document = yaml.safe_load(await (await client.get("/openapi.yaml")).text())
    schemas = document["components"]["schemas"]
    searched = schemas["SubjectSearchRequest"]["properties"]["subject"]
    token = schemas["PageRequest"]["properties"]["token"]
    assert token["type"] == "string"
    assert "answered 400" in token["description"]
    if default_tenant is None:
        assert schemas["SubjectProperties"]["required"] == ["tenant"]
        assert schemas["Subject"]["required"] == ["type", "id", "properties"]
        assert searched["required"] == ["type", "properties"]
    else:
        assert "required" not in schemas["SubjectProperties"]
        assert schemas["Subject"]["required"] == ["type", "id"]
        assert searched["required"] == ["type"]
