"""A TCP proxy for fault tests: forward, cut every connection, or swallow traffic.

Like asyncpg's test fuzzer: the sidecar connects through it, and the test breaks
the network for real (RST/FIN on `cut`, silence without any error on `blackhole`,
which is what a half-open link looks like to the client).
"""

from __future__ import annotations

import asyncio
import contextlib
import time


class TcpProxy:
    """Listens on 127.0.0.1 and forwards to `target_host:target_port`, or to the Unix
    socket `unix_path` when given (a TCP way into a socket-only server)."""

    def __init__(self, target_host: str, target_port: int, unix_path: str | None = None) -> None:
        self.target = (target_host, target_port)
        self.unix_path = unix_path
        self.mode = "open"
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.port = 0
        self.accepted: list[float] = []  # monotonic time of every connection accepted

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def refuse(self) -> None:
        """Cut every connection and stop listening: connects are refused (RST on SYN),
        what a stopped server looks like, until `listen_again`."""
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def listen_again(self) -> None:
        """Listen on the same port again and forward (after `refuse`)."""
        self.restore()
        await self.start()

    async def stop(self) -> None:
        await self.refuse()

    def cut(self) -> None:
        """Close every connection now and refuse new ones until `restore`."""
        self.mode = "cut"
        for client, upstream in list(self._links):
            client.close()
            upstream.close()
        self._links.clear()

    def blackhole(self) -> None:
        """Keep connections open but forward nothing (a half-open link)."""
        self.mode = "blackhole"

    def restore(self) -> None:
        self.mode = "open"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted.append(time.monotonic())
        if self.mode == "cut":
            writer.close()
            return
        try:
            if self.unix_path is not None:
                up_reader, up_writer = await asyncio.open_unix_connection(self.unix_path)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        link = (writer, up_writer)
        self._links.add(link)
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        finally:
            self._links.discard(link)
            writer.close()
            up_writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if self.mode == "open":
                    writer.write(data)
                    await writer.drain()
                elif self.mode == "cut":
                    return
        writer.close()
