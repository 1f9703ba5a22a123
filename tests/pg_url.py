"""PostgreSQL URLs in tests: where one points, and the same database through a TcpProxy.

asyncpg reads `postgresql://user@host:port/db` and also the embedded server's
`postgresql://user@/db?host=/socket/dir&port=N` (a Unix socket). Rewriting the text
`host:port` misses the second form (the proxy is bypassed) and splitting on the last
`/` cuts into its query: every test that retargets a URL goes through here.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tests.tcp_proxy import TcpProxy


@dataclass(frozen=True, slots=True)
class Target:
    """Where a URL connects: a TCP host and port, or a socket directory and port."""

    host: str
    port: int

    @property
    def unix_path(self) -> str | None:
        """The socket file PostgreSQL listens on in directory `host` (libpq's naming)."""
        return f"{self.host}/.s.PGSQL.{self.port}" if self.host.startswith("/") else None


def _query(url: str) -> list[tuple[str, str]]:
    return parse_qsl(urlsplit(url).query, keep_blank_values=True)


def target(url: str) -> Target:
    """Where asyncpg connects for `url` (the netloc's host wins over `?host=`, as in asyncpg)."""
    parts = urlsplit(url)
    query = dict(_query(url))
    host = parts.hostname or query.get("host") or "localhost"
    port = parts.port or int(query.get("port") or 5432)
    return Target(host, port)


def at(url: str, host: str, port: int) -> str:
    """`url` sent over TCP to `host:port` instead: user, database and other parameters kept."""
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    netloc = f"{user}@{host}:{port}" if user else f"{host}:{port}"
    query = [(k, v) for k, v in _query(url) if k not in ("host", "port")]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, safe="/")))


def with_database(url: str, name: str) -> str:
    """`url` naming database `name` (a `?host=/socket` query kept intact)."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def with_password(url: str, password: str) -> str:
    """`url` with `password` for its user (the netloc gets one even when it had none)."""
    parts = urlsplit(url)
    user, _, hosts = parts.netloc.rpartition("@")
    name = user.partition(":")[0] or "postgres"
    return urlunsplit(parts._replace(netloc=f"{name}:{password}@{hosts}"))


def with_params(url: str, **params: str) -> str:
    """`url` with these query parameters added (or replaced)."""
    query = [(k, v) for k, v in _query(url) if k not in params] + list(params.items())
    return urlunsplit(urlsplit(url)._replace(query=urlencode(query, safe="/")))


@contextlib.asynccontextmanager
async def proxied(url: str) -> AsyncIterator[tuple[TcpProxy, str]]:
    """A TcpProxy in front of `url`'s server (TCP or Unix socket) and the URL through it."""
    where = target(url)
    proxy = TcpProxy(where.host, where.port, unix_path=where.unix_path)
    await proxy.start()
    try:
        yield proxy, at(url, "127.0.0.1", proxy.port)
    finally:
        await proxy.stop()
