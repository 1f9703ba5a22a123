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

import asyncpg
from aiohttp import web

from pdp.admin.app import build_admin_app
from pdp.admin.store import AdminStore, create_pool
from pdp.config import Settings
from pdp.errors import ConfigError

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
    """Run the admin API on PDP_ADMIN_HOST:PDP_ADMIN_PORT until SIGINT/SIGTERM."""
    asyncio.run(check_ready(url))

    async def app() -> web.Application:
        pool = await create_pool(url)
        application = build_admin_app(AdminStore(pool))

        async def close(_: web.Application) -> None:
            await pool.close()

        application.on_cleanup.append(close)
        return application

    log.info("admin API on http://%s:%d/admin/v1/", settings.admin_host, settings.admin_port)
    web.run_app(
        app(), host=settings.admin_host, port=settings.admin_port, print=None,
        access_log=None, handle_signals=True,
    )  # fmt: skip
    return 0
