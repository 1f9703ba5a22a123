"""The composition root: the one place that wires sync, the replica, workers and the web app.

`sidecar_app` builds the whole sidecar for one database; `serve` runs it as the
`pdp serve` process, the only code that owns the event loop and the signals.
Besides the CLI this is the only pdp module that imports `sync` (import-linter
holds it). Workers run under one `Supervisor` inside the app's cleanup context:
they start before the first request is served and stop, in reverse order, after
the last.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry

from pdp.config import Settings
from pdp.errors import ConfigError
from pdp.metrics import Metrics
from pdp.pg.embedded import database_url
from pdp.readiness import Health
from pdp.replica import Replica
from pdp.supervisor import Supervisor
from pdp.web.api_keys import ApiKeys
from pdp.web.app import GATEWAY, CleanupContext, build_app
from pdp.web.forward_auth import RouteBox, gateway_from_settings, load_routes
from pdp.web.tls import server_context
from sync.options import SyncOptions
from sync.pg_fallback import PgFallback
from sync.pg_verifier import PgVerifier
from sync.service import SyncService

log = logging.getLogger(__name__)

SYNC_WORKER = "sync"
VERIFIER_WORKER = "verifier"


def sync_options(settings: Settings) -> SyncOptions:
    return SyncOptions(
        poll_interval=settings.poll_interval_seconds, heartbeat=settings.heartbeat_seconds
    )


def sidecar_app(
    settings: Settings, url: str, *, restart_backoff: tuple[float, float] = (1.0, 30.0)
) -> web.Application:
    """The whole sidecar for the database at `url`: sync, verifier, fallback, API.

    `restart_backoff`: (first, longest) delay before a crashed worker restarts.
    Raises ConfigError for a bad route table or JWKS file (read here, at start).
    """
    gateway = gateway_from_settings(settings)
    replica = Replica()
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    supervisor = Supervisor(
        metrics, backoff_initial=restart_backoff[0], backoff_max=restart_backoff[1]
    )
    service = SyncService(url, replica, metrics, sync_options(settings))
    supervisor.add(SYNC_WORKER, service.lifespan, critical=True)
    verifier = PgVerifier(url, service.sync, metrics, settings.verify_interval_seconds)
    supervisor.add(VERIFIER_WORKER, verifier.lifespan)
    fallback = PgFallback(url)
    api_keys = None if settings.api_keys_file is None else ApiKeys.load(settings.api_keys_file)
    return build_app(
        settings,
        replica=replica,
        registry=registry,
        metrics=metrics,
        health=Health(replica, settings.max_staleness_seconds, lambda: supervisor.down),
        fallback=fallback,
        api_keys=api_keys,
        gateway=gateway,
        cleanup=[_workers(fallback, supervisor)],
    )


def _workers(fallback: PgFallback, supervisor: Supervisor) -> CleanupContext:
    async def cleanup(_app: web.Application) -> AsyncIterator[None]:
        async with fallback.running(), supervisor.running():
            yield

    return cleanup


def _warn_if_open(settings: Settings) -> None:
    loopback = settings.host in ("127.0.0.1", "::1", "localhost")
    if not loopback and settings.api_keys_file is None and settings.tls_client_ca_file is None:
        log.warning(
            "the check API listens on %s with no client authentication: anyone who reaches "
            "the port can ask; set PDP_API_KEYS_FILE or PDP_TLS_CLIENT_CA_FILE",
            settings.host,
        )


def reload_routes_on_sighup(app: web.Application) -> None:
    """On SIGHUP, read PDP_ROUTES again and swap the table in (the old one stays if bad).

    The file is read and compiled in a worker thread; the swap is one assignment, so
    requests in flight finish with the table they started with and none is dropped.
    """
    gateway = app[GATEWAY]
    if gateway is None or gateway.routes.path is None:
        return
    box = gateway.routes

    async def install(_app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task[None]] = set()

        def on_signal() -> None:
            task = loop.create_task(_reload_routes(box))
            pending.add(task)
            task.add_done_callback(pending.discard)

        loop.add_signal_handler(signal.SIGHUP, on_signal)
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGHUP)

    app.cleanup_ctx.append(install)


async def _reload_routes(box: RouteBox) -> None:
    assert box.path is not None
    try:
        table = await asyncio.to_thread(load_routes, box.path)
    except ConfigError as exc:
        log.error("route table not reloaded, the old one stays in force: %s", exc)
        return
    box.table = table  # on the loop: a request sees the old table or the new one
    log.info("route table reloaded from %s: %d entries", box.path, len(table))


def _event_loop_policy() -> None:
    try:
        import uvloop  # noqa: PLC0415  (optional: the `fast` extra)
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def serve(settings: Settings) -> int:
    """Run the sidecar until SIGINT/SIGTERM."""
    _event_loop_policy()
    ssl_context = server_context(settings)  # bad files fail here, before anything starts
    _warn_if_open(settings)
    with database_url(settings) as url:
        app = sidecar_app(settings, url)
        reload_routes_on_sighup(app)
        scheme = "https" if ssl_context is not None else "http"
        log.info("serving the check API on %s://%s:%d", scheme, settings.host, settings.port)
        web.run_app(
            app,
            host=settings.host,
            port=settings.port,
            ssl_context=ssl_context,
            # Gateways open many connections at once; aiohttp's default queue is 128.
            backlog=settings.backlog,
            access_log=None,
            print=None,
            shutdown_timeout=5,
        )
    return 0
