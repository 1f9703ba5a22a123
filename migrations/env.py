"""Alembic environment: async, URL from the `pdp` command or PDP_DATABASE_URL.

The `pdp migrate` command resolves the URL (an explicit PDP_DATABASE_URL, or the
embedded server) and passes it in `config.attributes["url"]`; running `alembic`
directly falls back to the environment variable.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection

from pdp.pg.alchemy import async_engine
from pdp.pg.migrate import include_name
from pdp.pg.schema import SCHEMA, metadata

config = context.config


def _url() -> str:
    url = config.attributes.get("url") or os.environ.get("PDP_DATABASE_URL")
    if not url:
        raise RuntimeError("PDP_DATABASE_URL is not set and no URL was passed to alembic")
    return str(url)


def _offline_url() -> str:
    # Offline mode renders SQL for the dialect only; the query (sslmode, host) is not needed.
    scheme, _, rest = _url().partition("://")
    if scheme in ("postgres", "postgresql"):
        return f"postgresql+asyncpg://{rest.partition('?')[0]}"
    return _url()


def _configure(connection: Connection | None = None, **kw: object) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table_schema=SCHEMA,
        include_schemas=True,
        include_name=include_name,
        **kw,  # type: ignore[arg-type]
    )


def run_migrations_offline() -> None:
    _configure(url=_offline_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _run_sync(connection: Connection) -> None:
    # The version table lives in the pdp schema, which must exist before alembic looks.
    connection.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_migrations_online() -> None:
    engine = async_engine(_url())
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_run_sync)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_sync(connection)
    else:
        asyncio.run(run_migrations_online())
