"""A private redis-server for one test: no TCP port at all, a Unix socket in a temp dir.

The binary is PDP_TEST_REDIS_SERVER, else `redis-server` on PATH (or /usr/bin,
/usr/sbin); a missing binary fails the test (nothing is skipped for a missing
service). No persistence: a restart comes back empty, as a crashed cache would.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import redis.exceptions


def redis_binary() -> str:
    found = os.environ.get("PDP_TEST_REDIS_SERVER") or shutil.which("redis-server")
    for candidate in (found, "/usr/bin/redis-server", "/usr/sbin/redis-server"):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail("no redis-server binary: install redis-server or set PDP_TEST_REDIS_SERVER")


class RedisServer:
    """`start()` / `stop()` a redis-server on `<directory>/redis.sock`; `url` reaches it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "redis.sock"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    async def start(self, within: float = 10.0) -> None:
        self._process = subprocess.Popen(  # noqa: ASYNC220 -- returns at once
            [
                redis_binary(), "--port", "0", "--unixsocket", str(self.socket),
                "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
                "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = aioredis.from_url(self.url)
        try:
            async with asyncio.timeout(within):
                while True:
                    if self._process.poll() is not None:
                        pytest.fail(f"redis-server exited with {self._process.returncode}")
                    try:
                        await client.ping()
                        return
                    except (redis.exceptions.ConnectionError, OSError):
                        await asyncio.sleep(0.02)  # no event says a socket is ready
        finally:
            await client.aclose()

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            process.wait(10)
        self.socket.unlink(missing_ok=True)


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    """A private redis-server on a Unix socket for one test (the `redis_server` fixture)."""
    # Not tmp_path: a Unix socket path must stay under ~100 bytes.
    directory = Path(tempfile.mkdtemp(prefix="pdp-redis-"))
    server = RedisServer(directory)
    await server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
