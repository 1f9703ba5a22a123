"""Raw HTTP/1.1 over a real socket, for requests no client library would send, and a
real `EdgeRunner` (pdp's HTTP edge) on an ephemeral port serving a test app."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from pdp.http_edge import EdgeLimits, EdgeRunner
from pdp.web.app import METRICS


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes
    closed: bool  # the server closed the connection after this answer

    def json(self) -> Any:
        return json.loads(self.body)


@asynccontextmanager
async def edge_server(
    app: web.Application,
    limits: EdgeLimits,
    keepalive: float = 75.0,
    runners: list[EdgeRunner] | None = None,
) -> AsyncIterator[int]:
    """`app` served by an EdgeRunner on 127.0.0.1; yields the port (and appends the
    runner to `runners`, for a test that waits on the server's state)."""
    runner = EdgeRunner(
        app, limits, app[METRICS], access_log=None, keepalive_timeout=keepalive,
        lingering_time=limits.read_timeout, shutdown_timeout=2,
    )  # fmt: skip
    await runner.setup()
    if runners is not None:
        runners.append(runner)
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def read_answer(
    reader: asyncio.StreamReader, timeout: float = 10.0, close_wait: float = 0.0
) -> Answer:
    """One response from `reader` (Content-Length framed) and whether the server then
    closed the connection: said so (`Connection: close`) and did, or, with `close_wait`,
    closed it within that many seconds."""
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    closed = False
    if headers.get("connection", "").lower() == "close":
        closed = await at_eof(reader, timeout)
        assert closed, "Connection: close, yet the connection stayed open"
    elif close_wait:
        closed = await at_eof(reader, close_wait)
    return Answer(status, headers, body, closed)


async def at_eof(reader: asyncio.StreamReader, wait: float) -> bool:
    """Whether the peer closes the connection within `wait` seconds, sending nothing more
    (a reset counts: closing with unread input sends one)."""
    try:
        async with asyncio.timeout(wait):
            rest = await reader.read()
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return rest == b""


async def exchange(
    port: int, data: bytes, timeout: float = 10.0, close_wait: float = 0.0
) -> Answer:
    """Send `data` on a new connection and read one answer (see `read_answer`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await read_answer(reader, timeout, close_wait)
    finally:
        writer.close()
        await _closed(writer)


async def _closed(writer: asyncio.StreamWriter) -> None:
    with suppress(ConnectionError):
        await writer.wait_closed()


def post(
    path: str, body: bytes, *, headers: dict[str, str] | None = None, length: int | None = None
) -> bytes:
    """The bytes of a POST of `body` (JSON unless `headers` says otherwise)."""
    fields = {"Host": "pdp", "Content-Type": "application/json", **(headers or {})}
    fields.setdefault("Content-Length", str(len(body) if length is None else length))
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return head.encode("latin-1") + b"\r\n" + body


def get(path: str, headers: dict[str, str] | None = None) -> bytes:
    fields = {"Host": "pdp", **(headers or {})}
    head = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return head.encode("latin-1") + b"\r\n"
