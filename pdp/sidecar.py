"""`pdp serve`: the sidecar process. Builds the replica, the sync workers and the app.

This is the entry point that owns the event loop and the signals; everything it
starts stops inside the app's cleanup contexts, in reverse order.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from prometheus_client import CollectorRegistry

from pdp.config import Settings
from pdp.metrics import Metrics
from pdp.pg.embedded import database_url
from pdp.replica import Replica
from pdp.web.app import build_app
from sync.pg_fallback import PgFallback
from sync.pg_sync import SyncOptions
from sync.pg_verifier import PgVerifier
from sync.service import SyncService

log = logging.getLogger(__name__)


def sidecar_app(settings: Settings, url: str) -> web.Application:
    """The whole sidecar for the database at `url`: sync, verifier, fallback, API."""
    replica = Replica()
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    service = SyncService(
        url,
        replica,
        metrics,
        SyncOptions(poll_interval=settings.poll_interval_seconds),
        heartbeat=settings.heartbeat_seconds,
    )
    verifier = PgVerifier(url, service.sync, metrics, settings.verify_interval_seconds)
    fallback = PgFallback(url)
    return build_app(
        settings,
        replica=replica,
        registry=registry,
        metrics=metrics,
        fallback=fallback,
        workers=[service.lifespan, fallback.lifespan, verifier.lifespan],
    )


def _event_loop_policy() -> None:
    try:
        import uvloop  # noqa: PLC0415  (optional: the `fast` extra)
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def serve(settings: Settings) -> int:
    """Run the sidecar until SIGINT/SIGTERM."""
    _event_loop_policy()
    with database_url(settings) as url:
        app = sidecar_app(settings, url)
        log.info("serving the check API on http://%s:%d", settings.host, settings.port)
        web.run_app(
            app,
            host=settings.host,
            port=settings.port,
            # Gateways open many connections at once; aiohttp's default queue is 128.
            backlog=settings.backlog,
            access_log=None,
            print=None,
            shutdown_timeout=5,
        )
    return 0
