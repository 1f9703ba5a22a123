"""The SQLAlchemy engine alembic migrates with, connected by asyncpg from the plain URL.

SQLAlchemy's asyncpg dialect turns a URL's query (`?sslmode=require`,
`?host=/socket`, `?options=...`) into keyword arguments of `asyncpg.connect`,
which rejects most of them (`TypeError: ... unexpected keyword argument
'sslmode'`). asyncpg parses the libpq URL itself, so the engine gets a creator that
hands it the URL unchanged: every command (migrate, seed, serve, prune) then reads
the same URL the same way.
"""

from __future__ import annotations

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


def async_engine(url: str) -> AsyncEngine:
    """An engine whose connections are `asyncpg.connect(url)` with `url` as given."""
    dsn = plain_dsn(url)

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(dsn)

    # The URL only picks the dialect: every connection comes from the creator.
    return create_async_engine("postgresql+asyncpg://", async_creator=connect)


def plain_dsn(url: str) -> str:
    """`url` as asyncpg reads it: `postgresql+asyncpg://` becomes `postgresql://`."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.startswith("postgres"):
        return f"postgresql://{rest}"
    return url
