"""Operations endpoints: `/healthz`, `/readyz`, `/metrics`, `/openapi.yaml`.

`/healthz` depends on nothing (the process answers); `/readyz` is 503 until a
snapshot is loaded, while a critical worker is down and while the data is staler
than `max_staleness_seconds` (`pdp.readiness`), with a JSON body saying why, so an
orchestrator stops routing to a sidecar whose data is dead.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from pdp.config import Settings
from pdp.protocol import dumps
from pdp.readiness import Health

_JSON = {"Content-Type": "application/json"}
_HEALTHY = dumps({"status": "ok"})


# `required: [a, b]  # +name: required without PDP_DEFAULT_TENANT` in openapi.yaml
_TENANT_REQUIRED = re.compile(
    r"^( *)required: \[(.*)\]  # \+(\w+): required without PDP_DEFAULT_TENANT\n", re.MULTILINE
)


def openapi_document(max_batch: int, default_tenant: str | None = None) -> bytes:
    """The OpenAPI 3.1 description shipped inside the package (`pdp/web/openapi.yaml`),
    stating this server's batch limit and, with no default tenant configured, that
    every subject must name its tenant (`subject.properties.tenant`)."""
    text = Path(__file__).with_name("openapi.yaml").read_text(encoding="utf-8")
    text = text.replace("maxItems: 1000 # PDP_MAX_BATCH", f"maxItems: {max_batch}")

    def required(match: re.Match[str]) -> str:
        indent, listed, name = match.groups()
        names = [n for n in listed.split(", ") if n]
        if default_tenant is None:
            names.append(name)
        return f"{indent}required: [{', '.join(names)}]\n" if names else ""

    return _TENANT_REQUIRED.sub(required, text).encode()


class OpsApi:
    """Health, readiness, metrics and the API description; bound methods are handlers."""

    def __init__(
        self,
        settings: Settings,
        health: Health,
        registry: CollectorRegistry,
        scrape: Callable[[], Awaitable[bytes]] | None = None,
    ) -> None:
        self._health = health
        self._registry = registry
        self._scrape = scrape
        self._openapi = openapi_document(settings.max_batch, settings.default_tenant)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
            web.get("/metrics", self.metrics),
            web.get("/openapi.yaml", self.openapi),
        ]

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(body=_HEALTHY, headers=_JSON)

    async def readyz(self, request: web.Request) -> web.Response:
        state = self._health.readiness()
        body: dict[str, object] = {"status": "ready" if state.ready else "not_ready"}
        if not state.ready:
            body["reason"] = state.reason
        if state.workers_down:
            body["workers_down"] = list(state.workers_down)
        if state.reason != "not_loaded":
            body["staleness_seconds"] = round(state.staleness, 3)
            body["max_staleness_seconds"] = self._health.max_staleness
            body["revision"] = str(self._health.replica.revision)
        return web.Response(body=dumps(body), status=200 if state.ready else 503, headers=_JSON)

    async def metrics(self, request: web.Request) -> web.Response:
        if self._scrape is not None:
            body = await self._scrape()
        else:
            body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, headers={"Content-Type": "application/yaml"})
