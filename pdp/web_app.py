"""The composition root: `build_app` wires settings, replica, metrics and routes.

One middleware maps every error to a JSON answer and stamps each response with
`X-Request-ID` (echoed, or a fresh uuid4 hex) and counts it by route and status:

    RequestError      400 {"error": "bad_request", "message", "field"}
    PayloadTooLarge   413 {"error": "payload_too_large", ...} (also aiohttp's own 413)
    HTTPNotFound      404 {"error": "not_found", ...}
    HTTPMethodNotAllowed  405 {"error": "method_not_allowed", ...} with Allow
    NotReady, DependencyError  503
    anything else     500 {"error": "internal", ...}, logged with its traceback

Workers (the sync layer's async context managers) run inside `app.cleanup_ctx`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry

from pdp.authzen import Fallback, error_body
from pdp.config import Settings
from pdp.errors import DependencyError, NotReady, PayloadTooLarge, RequestError
from pdp.metrics import Metrics
from pdp.web_authzen import JSON_TYPE, AuthzenApi
from pdp.web_ops import OpsApi
from sync.replica import Replica

__all__ = [
    "FALLBACK",
    "METRICS",
    "REGISTRY",
    "REPLICA",
    "SETTINGS",
    "Fallback",
    "Worker",
    "build_app",
]

log = logging.getLogger(__name__)

Worker = Callable[[web.Application], AsyncIterator[None]]

SETTINGS = web.AppKey("settings", Settings)
REPLICA = web.AppKey("replica", Replica)
REGISTRY = web.AppKey("registry", CollectorRegistry)
METRICS = web.AppKey("metrics", Metrics)
FALLBACK: web.AppKey[Fallback | None] = web.AppKey("fallback")

REQUEST_ID = "X-Request-ID"
UNMATCHED = "unmatched"  # the route label of requests no route matched (404/405)
_HTTP_ERRORS = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def build_app(
    settings: Settings,
    *,
    replica: Replica,
    registry: CollectorRegistry,
    metrics: Metrics | None = None,
    fallback: Fallback | None = None,
    workers: Sequence[Worker] = (),
) -> web.Application:
    """The pdp application: AuthZEN and operations routes over `replica`.

    `metrics` defaults to a new `Metrics` on `registry`; either way it is pointed at
    `replica` for the scrape-time gauges. `fallback` answers consistent checks whose
    revision is not yet in memory (None: those are denied). Each worker is appended
    to `app.cleanup_ctx` in order.
    """
    if metrics is None:
        metrics = Metrics(registry)
    metrics.watch(replica, settings.max_staleness_seconds)
    app = web.Application(
        client_max_size=settings.max_body_bytes, middlewares=[_error_middleware(metrics)]
    )
    app[SETTINGS] = settings
    app[REPLICA] = replica
    app[REGISTRY] = registry
    app[METRICS] = metrics
    app[FALLBACK] = fallback
    app.add_routes(AuthzenApi(settings, replica, metrics, fallback).routes())
    app.add_routes(OpsApi(settings, replica, registry).routes())
    app.cleanup_ctx.extend(workers)
    return app


def _error_middleware(metrics: Metrics) -> Middleware:
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except RequestError as exc:
            error = "payload_too_large" if isinstance(exc, PayloadTooLarge) else "bad_request"
            response = _error(exc.status, error, exc.message, exc.field)
        except web.HTTPException as exc:
            response = _from_http_exception(request, exc)
        except NotReady as exc:
            response = _error(503, "not_ready", str(exc) or "not ready")
        except DependencyError:
            log.warning("dependency failure on %s %s", request.method, request.path, exc_info=True)
            response = _error(503, "unavailable", "a dependency failed; retry")
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            response = _error(500, "internal", "internal error")
        response.headers[REQUEST_ID] = request.headers.get(REQUEST_ID) or uuid.uuid4().hex
        resource = request.match_info.route.resource
        metrics.http_request(UNMATCHED if resource is None else resource.canonical, response.status)
        return response

    return errors


def _error(status: int, error: str, message: str, field: str | None = None) -> web.Response:
    return web.Response(
        body=error_body(error, message, field), status=status, headers={"Content-Type": JSON_TYPE}
    )


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
