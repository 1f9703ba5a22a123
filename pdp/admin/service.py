"""`pdp admin serve`: the admin API in a process of its own.

Why not inside `pdp serve`: the sidecar's event loop answers checks from memory and
must never wait behind a database transaction; the admin API is all database
transactions. Its own process also keeps its listener, its credentials (a
pdp_admin member, PDP_ADMIN_DATABASE_URL) and its failure domain apart from the
check path, and it runs where operators want it (once per cluster, not per pod).
It refuses to start while no admin token exists: there would be no one to serve.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import asyncpg
from aiohttp import web
from prometheus_client import CollectorRegistry

from pdp.admin.app import build_admin_app
from pdp.admin.store import AdminStore, create_pool
from pdp.config import Settings
from pdp.errors import ConfigError, PdpError
from pdp.http_edge import EdgeLimits, EdgeRunner, default_max_connections, raise_file_limit
from pdp.metrics import Metrics

SHUTDOWN_SECONDS = 5.0  # how long requests in flight may still take at a stop

log = logging.getLogger(__name__)


async def check_ready(url: str) -> None:
    """ConfigError unless this login may act as pdp_admin and an active token exists."""
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            try:
                await conn.execute("SET LOCAL ROLE pdp_admin")
                active = await conn.fetchval("SELECT pdp.admin_tokens_active()")
            except (asyncpg.InsufficientPrivilegeError, asyncpg.UndefinedFunctionError) as exc:
                raise ConfigError(
                    f"the admin API's database login cannot act as pdp_admin ({exc.message});"
                    " run pdp migrate, and GRANT pdp_admin TO that login"
                ) from None
    finally:
        await conn.close()
    if not active:
        raise ConfigError(
            "the admin API stays off: no active admin token exists"
            " (create one: pdp admin token create --name NAME --scopes read,write)"
        )


def serve(settings: Settings, url: str) -> int:
    """Run the admin API on PDP_ADMIN_HOST:PDP_ADMIN_PORT until SIGINT/SIGTERM, behind the
    same HTTP edge as the check API (whole-request read timeout, connection cap, JSON
    answers to what aiohttp refuses itself)."""
    asyncio.run(check_ready(url))
    max_connections = settings.max_connections or default_max_connections(raise_file_limit())
    limits = EdgeLimits(settings.request_read_timeout_seconds, max_connections)
    asyncio.run(_serve(settings, url, limits))
    return 0


async def _serve(settings: Settings, url: str, limits: EdgeLimits) -> None:
    pool = await create_pool(url)
    # Its own registry: the admin process's edge counts refusals as the sidecar's does.
    runner = EdgeRunner(
        build_admin_app(AdminStore(pool)), limits, Metrics(CollectorRegistry()),
        access_log=None,
        keepalive_timeout=settings.keepalive_timeout_seconds,
        lingering_time=settings.request_read_timeout_seconds,
        shutdown_timeout=SHUTDOWN_SECONDS,
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await runner.setup()
        site = web.TCPSite(runner, settings.admin_host, settings.admin_port)
        try:
            await site.start()
        except OSError as exc:
            where = f"{settings.admin_host}:{settings.admin_port}"
            raise PdpError(f"cannot listen on {where}: {exc.strerror or exc}") from None
        log.info(
            "admin API on http://%s:%d/admin/v1/ (at most %d connections)",
            settings.admin_host, settings.admin_port, limits.max_connections,
        )  # fmt: skip
        await stop.wait()
        log.info("admin API stopping")
    finally:
        await runner.cleanup()
        await pool.close()
