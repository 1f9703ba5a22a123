"""The aiohttp application: `build_app` puts the check API and operations routes together.

It knows nothing of how the replica is fed: the composition root (`pdp.sidecar`)
passes the replica, metrics, health and the cleanup contexts that run the workers.

One guard around every route's handler maps every error to a JSON answer, stamps
each response with `X-Request-ID` (echoed, or a fresh process-unique id) and counts
it by route and status:

    RequestError      400 {"error": "bad_request", "message", "field"}
      UnsupportedEncoding  415 {"error": "unsupported_media_type", ...} (compressed body)
      RequestReadTimeout   408 {"error": "request_timeout", ...}, connection closed
    aiohttp's 413     413 {"error": "payload_too_large", ...} (body over the limit)
    HTTPNotFound      404 {"error": "not_found", ...}
    HTTPMethodNotAllowed  405 {"error": "method_not_allowed", ...} with Allow
    DependencyError   503 {"error": "unavailable", ...}
    ConnectionError   the client went away: counted as 499, not logged (nobody to answer)
    anything else     500 {"error": "internal", ...}, logged with its traceback

With API keys configured (`pdp.web.api_keys`) every route but the public ones
(health, readiness, metrics, the OpenAPI and AuthZEN metadata documents) answers 401
{"error": "unauthorized", ...} with `WWW-Authenticate: Bearer` to a request that
presents no valid key.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import istr
from prometheus_client import CollectorRegistry

from pdp.config import Settings
from pdp.decision_log import DecisionLog
from pdp.errors import DependencyError, RequestError, RequestReadTimeout
from pdp.http_edge import DIRECT, DIRECT_PREFIX
from pdp.metrics import Metrics
from pdp.protocol import error_body
from pdp.readiness import Health
from pdp.replica import Fallback, Replica
from pdp.web.api_keys import ApiKeys, presented_key
from pdp.web.authzen import JSON_TYPE, AuthzenApi
from pdp.web.forward_auth import PATH as FORWARD_AUTH_PATH
from pdp.web.forward_auth import ForwardAuthApi, Gateway
from pdp.web.ops import OpsApi

__all__ = [
    "FALLBACK",
    "GATEWAY",
    "HEALTH",
    "METRICS",
    "REGISTRY",
    "REPLICA",
    "SETTINGS",
    "CleanupContext",
    "build_app",
]

log = logging.getLogger(__name__)

CleanupContext = Callable[[web.Application], AsyncIterator[None]]

SETTINGS = web.AppKey("settings", Settings)
REPLICA = web.AppKey("replica", Replica)
REGISTRY = web.AppKey("registry", CollectorRegistry)
METRICS = web.AppKey("metrics", Metrics)
HEALTH = web.AppKey("health", Health)
FALLBACK: web.AppKey[Fallback | None] = web.AppKey("fallback")
GATEWAY: web.AppKey[Gateway | None] = web.AppKey("gateway")
# The hot routes, served by the edge without the router (`pdp.http_edge.DIRECT`).
DIRECT_PATHS = frozenset({"/access/v1/evaluation", "/access/v1/evaluations"})

REQUEST_ID = istr("X-Request-ID")  # case-folded once: every answer reads and sets it
UNMATCHED = "unmatched"  # the route label of requests no route matched (404/405)
CLIENT_GONE = 499  # nginx's "client closed request": counted, never sent
_HTTP_ERRORS = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
# Answered without an API key: probes, scrapes and the documents describing the API.
PUBLIC_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/openapi.yaml", "/.well-known/authzen-configuration"}
)


def build_app(
    settings: Settings,
    *,
    replica: Replica,
    registry: CollectorRegistry,
    metrics: Metrics | None = None,
    health: Health | None = None,
    fallback: Fallback | None = None,
    api_keys: ApiKeys | None = None,
    gateway: Gateway | None = None,
    decision_log: DecisionLog | None = None,
    cleanup: Sequence[CleanupContext] = (),
    scrape: Callable[[], Awaitable[bytes]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Application:
    """The pdp application: AuthZEN and operations routes over `replica`.

    `metrics` defaults to a new `Metrics` on `registry` and `health` to the replica's
    freshness alone; the metrics' scrape-time gauges read `health`. `fallback`
    answers consistent checks whose revision is not yet in memory (None: those are
    denied). `api_keys`, when given, guards every route but `PUBLIC_PATHS`. `gateway`
    holds forward-auth's route table and JWT keys (None: every /forward-auth request is
    denied, no table). `decision_log`, when given, is where every evaluation, batch entry
    and forward-auth decision is recorded (its worker is the caller's). Each `cleanup`
    context is appended to `app.cleanup_ctx` in order. `scrape`, when given, makes the
    /metrics page (default: `registry`'s metrics; `pdp serve --workers` gathers every
    process's). `headers` are set on every answer of a route, beside X-Request-ID (a
    `--workers` worker names itself). No `on_response_prepare` signal: the edge serves
    the hot routes without the router, and aiohttp runs those signals only for routed
    requests.
    """
    if metrics is None:
        metrics = Metrics(registry)
    if health is None:
        health = Health(replica, settings.max_staleness_seconds)
    metrics.watch(health)
    # No middleware: each route's handler is wrapped by `_guard` instead, which maps
    # errors, stamps X-Request-ID and counts the route. The same single mapping, but
    # it spares every request aiohttp's middleware chain (measured in the README).
    # No automatic decompression: inflating a body would run on the loop (a 1 MB gzip
    # bomb is 1 GiB); read_json refuses any Content-Encoding but identity with 415.
    app = web.Application(
        client_max_size=settings.max_body_bytes, handler_args={"auto_decompress": False}
    )
    app[SETTINGS] = settings
    app[REPLICA] = replica
    app[REGISTRY] = registry
    app[METRICS] = metrics
    app[HEALTH] = health
    app[FALLBACK] = fallback
    app[GATEWAY] = gateway
    direct: dict[str, Handler] = {}
    app[DIRECT] = direct
    stamp = tuple((headers or {}).items())
    at_path: Handler | None = None  # forward-auth's handler at its own path
    routes = [
        *AuthzenApi(settings, replica, metrics, fallback, decision_log).routes(),
        *ForwardAuthApi(settings, replica, metrics, gateway, decision_log).routes(),
        *OpsApi(settings, health, registry, scrape).routes(),
    ]
    for route in routes:
        assert isinstance(route, web.RouteDef)
        handler: Handler = route.handler
        if api_keys is not None and route.path not in PUBLIC_PATHS:
            handler = _authenticated(handler, api_keys)
        handler = _guard(handler, route.path, metrics, stamp)
        if route.method == "POST" and route.path in DIRECT_PATHS:
            direct[route.path] = handler
        elif route.path == FORWARD_AUTH_PATH:
            at_path = handler
        elif route.path == FORWARD_AUTH_PATH + "/{tail:.*}":
            assert at_path is not None  # ForwardAuthApi lists its own path first
            app[DIRECT_PREFIX] = (FORWARD_AUTH_PATH, at_path, handler)
        if route.method == "GET":  # with its HEAD, as web.get() would
            app.router.add_get(route.path, handler, **route.kwargs)
        else:
            app.router.add_route(route.method, route.path, handler, **route.kwargs)
    # Anything no route matches: a JSON 404, or a JSON 405 naming the allowed methods.
    unmatched: Handler = _unmatched if api_keys is None else _authenticated(_unmatched, api_keys)
    app.router.add_route("*", "/{tail:.*}", _guard(unmatched, UNMATCHED, metrics, stamp))
    if gateway is not None and gateway.keys is not None:
        app.cleanup_ctx.append(gateway.keys.running)
    app.cleanup_ctx.extend(cleanup)
    return app


def _guard(
    handler: Handler, route: str, metrics: Metrics, stamp: tuple[tuple[str, str], ...] = ()
) -> Handler:
    """`handler` with errors mapped to JSON, X-Request-ID (and `stamp`'s headers) set and
    the route counted."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            response = await handler(request)
        except RequestError as exc:
            response = _error(exc.status, exc.error, exc.message, exc.field)
            if isinstance(exc, RequestReadTimeout):
                response.force_close()
        except web.HTTPException as exc:
            response = _from_http_exception(request, exc)
        except ConnectionError:  # the client disconnected (mid-body, say): not our error
            response = _error(CLIENT_GONE, "client_closed_request", "the client went away")
        except DependencyError:
            log.warning("dependency failure on %s %s", request.method, request.path, exc_info=True)
            response = _error(503, "unavailable", "a dependency failed; retry")
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            response = _error(500, "internal", "internal error")
        response.headers[REQUEST_ID] = request.headers.get(REQUEST_ID) or _new_request_id()
        for name, value in stamp:
            response.headers[name] = value
        metrics.http_request(route, response.status)
        return response

    return guarded


def _authenticated(handler: Handler, keys: ApiKeys) -> Handler:
    """`handler` behind an API key (a 401 JSON answer without a valid one)."""

    async def authenticated(request: web.Request) -> web.StreamResponse:
        presented = presented_key(request.headers)
        if presented is None or keys.identify(presented) is None:
            message = "this endpoint needs an API key (X-PDP-API-Key or Authorization: Bearer)"
            if presented is not None:
                message = "the API key is not valid"
            response = _error(401, "unauthorized", message)
            response.headers["WWW-Authenticate"] = 'Bearer realm="pdp"'
            return response
        return await handler(request)

    return authenticated


# Generated ids: a random per-process prefix and a counter. Unique like uuid4 for
# correlating logs, at a fraction of the cost (no urandom call per request).
_ID_PREFIX = uuid.uuid4().hex[:20]
# From 16**11: hex() then gives 12 digits for the next 2.6e14 ids, so an id stays 32 hex
# digits without a format spec.
_ID_COUNTER = itertools.count(16**11)


def _new_request_id() -> str:
    return _ID_PREFIX + hex(next(_ID_COUNTER))[2:]  # hex(): half the cost of a format spec


def _error(status: int, error: str, message: str, field: str | None = None) -> web.Response:
    return web.Response(
        body=error_body(error, message, field), status=status, headers={"Content-Type": JSON_TYPE}
    )


async def _unmatched(request: web.Request) -> web.StreamResponse:
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        match, methods = await resource.resolve(request)
        if match is None and methods and "*" not in methods:
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, sorted(allowed))
    raise web.HTTPNotFound


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    status = exc.status
    if status < 400:  # a redirect or similar raised on purpose: pass it through
        return web.Response(status=status, headers=exc.headers)
    error = _HTTP_ERRORS.get(status, "http_error")
    if status == 404:
        message = f"no route for {request.method} {request.path}"
    elif status == 405:
        message = f"{request.method} is not allowed on {request.path}"
    else:
        message = exc.text or exc.reason
    response = _error(status, error, message)
    if "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response
