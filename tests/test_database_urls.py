"""Every command reads a libpq URL the same way: the parameters asyncpg understands
(`sslmode`, `sslrootcert`, `options`, `application_name`, `host=/socket`) work for
`migrate`, `seed`, `prune` and `serve` alike, and one a server cannot satisfy
(`sslmode=require` against a server without SSL) is the same one line from each.

The commands run as real processes; the TCP cases reach the database over TCP even
when the test server is socket-only (through a TcpProxy), so they run on the
embedded default too.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from loadtests.gateway_harness import Pdp
from tests.conftest import DatabaseFactory
from tests.pg_url import proxied, target, with_params

COMMANDS = (["migrate"], ["seed", "--demo", "--replace"], ["prune", "--once"], ["db", "url"])
TCP_VARIANTS = {
    "sslmode-disable": {"sslmode": "disable"},
    "sslmode-prefer": {"sslmode": "prefer"},
    # prefer never verifies, so a missing root certificate is not read (as in libpq).
    "sslrootcert": {"sslmode": "prefer", "sslrootcert": "/no/such/root.crt"},
    "options": {"options": "-c statement_timeout=60000"},
    "application_name": {"application_name": "pdp-url-test"},
}


def _pdp(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    return subprocess.run(
        [sys.executable, "-m", "pdp", *args], env={**env, "PDP_DATABASE_URL": url},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


async def _run(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    # In a thread: the proxy the command talks through runs on this event loop.
    return await asyncio.to_thread(_pdp, *args, url=url)


@pytest.fixture
async def tcp_url(empty_db_url: str) -> AsyncIterator[str]:
    """The fresh empty database over TCP (a proxy to the socket when the server has no TCP)."""
    if target(empty_db_url).unix_path is None:
        yield empty_db_url
        return
    async with proxied(empty_db_url) as (_proxy, via):
        yield via


async def _socket_url(url: str) -> str:
    """`url` over the server's Unix socket (`?host=/dir&port=N`), as libpq writes it."""
    conn = await asyncpg.connect(url)
    try:
        directory = (await conn.fetchval("SHOW unix_socket_directories")).split(",")[0].strip()
        port = await conn.fetchval("SHOW port")
    finally:
        await conn.close()
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    bare = urlunsplit(parts._replace(netloc=f"{user}@" if user else "", query=""))
    return with_params(bare, host=directory, port=port)


def _check(port: int, user: str, action: str) -> bool:
    body = {"subject": {"type": "user", "id": user}, "action": {"name": action},
            "resource": {"type": "document", "id": "roadmap"}}  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/access/v1/evaluation", json.dumps(body),
                     {"Content-Type": "application/json"})  # fmt: skip
        reply = conn.getresponse()
        answer = json.loads(reply.read())
    finally:
        conn.close()
    assert reply.status == 200, answer
    return bool(answer["decision"])


async def _every_command_works(url: str, run_dir: Path) -> None:
    for args in COMMANDS:
        result = await _run(*args, url=url)
        assert result.returncode == 0, (args, result.stderr)
        assert "Traceback" not in result.stderr
    pdp = await asyncio.to_thread(Pdp, url, run_dir, {"PDP_DEFAULT_TENANT": "demo"})
    try:
        assert await asyncio.to_thread(_check, pdp.port, "bob", "write")
        assert not await asyncio.to_thread(_check, pdp.port, "carol", "write")
    finally:
        assert await asyncio.to_thread(pdp.stop) == 0, pdp.proc.tail()


@pytest.mark.parametrize("variant", sorted(TCP_VARIANTS))
async def test_every_command_accepts_the_parameter(
    tcp_url: str, tmp_path: Path, variant: str
) -> None:
    await _every_command_works(with_params(tcp_url, **TCP_VARIANTS[variant]), tmp_path)


async def test_every_command_accepts_a_unix_socket_url(
    make_db: DatabaseFactory, tmp_path: Path
) -> None:
    url = await _socket_url(await make_db.create(migrated=False))
    assert "?host=/" in url
    await _every_command_works(url, tmp_path)


async def test_sslmode_require_without_ssl_is_the_same_line_from_every_command(
    tcp_url: str, tmp_path: Path
) -> None:
    url = with_params(tcp_url, sslmode="require")
    lines = set()
    for args in [*COMMANDS[:3], ["serve", "--port", "0"]]:
        result = await _run(*args, url=url)
        assert result.returncode == 1, (args, result.stderr)
        assert "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("pdp: error:")]
        assert len(errors) == 1, result.stderr
        lines.add(errors[0])
    assert len(lines) == 1, lines
    assert "SSL" in lines.pop()


@pytest.mark.parametrize(
    "url",
    ["postgresql://postgres@127.0.0.1:99999/pdp", "postgresql://postgres@a:5432,b:70000/pdp",
     "postgresql://postgres@/pdp?host=/tmp&port=123456"],
)  # fmt: skip
@pytest.mark.parametrize("args", [["migrate"], ["seed", "--demo"], ["prune", "--once"], ["serve"]])
async def test_a_port_out_of_range_is_one_line(url: str, args: list[str]) -> None:
    result = await _run(*args, url=url)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "pdp: error: PDP_DATABASE_URL: the URL's port is not a TCP port (1-65535)"
    )
