"""HTTPS and mutual TLS on the check API, with certificates made in the test, through a real
`pdp serve` process; and the configuration errors a user can make."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from loadtests.run import free_port
from pdp.pg import seed, seed_data
from tests.certs import Pki, make_pki

EVALUATION = {
    "subject": {"type": "user", "id": "bob", "properties": {"tenant": "demo"}},
    "action": {"name": "write"},
    "resource": {"type": "document", "id": "roadmap"},
}


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


def _env(**pdp: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    return {**clean, **pdp}


def _client_context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


async def _get(url: str, context: ssl.SSLContext, **kwargs: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.request(
        kwargs.pop("method", "GET"), url, ssl=context, **kwargs
    ) as response:
        return response.status, await response.json()


@pytest.fixture
async def serve(tmp_path: Path, db_url: str) -> AsyncIterator[Any]:
    await seed.load(db_url, seed_data.demo())
    procs: list[asyncio.subprocess.Process] = []

    async def start(context: ssl.SSLContext, **tls: str) -> str:
        port = free_port()
        env = _env(PDP_DATABASE_URL=db_url, PDP_PORT=str(port), PDP_LOG_LEVEL="WARNING", **tls)
        with (tmp_path / f"serve-{port}.log").open("wb") as log:
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "pdp", "serve", env=env, stdout=log, stderr=log
                )
            )
        base = f"https://127.0.0.1:{port}"
        async with asyncio.timeout(60):
            # The server offers no readiness event: poll /readyz over TLS with a deadline.
            while True:
                assert procs[-1].returncode is None, (tmp_path / f"serve-{port}.log").read_text()
                try:
                    if (await _get(f"{base}/readyz", context))[0] == 200:
                        return base
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)

    yield start
    for proc in procs:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)


async def test_https_answers_and_advertises_https(serve: Any, pki: Pki) -> None:
    context = _client_context(pki)
    base = await serve(context, PDP_TLS_CERT_FILE=str(pki.server_cert), PDP_TLS_KEY_FILE=str(pki.server_key))
    status, answer = await _get(f"{base}/access/v1/evaluation", context, method="POST", json=EVALUATION)
    assert (status, answer["decision"], answer["context"]["via_group"]) == (200, True, "engineering")
    _, meta = await _get(f"{base}/.well-known/authzen-configuration", context)
    assert meta["access_evaluation_endpoint"] == f"{base}/access/v1/evaluation"
    # A client that does not trust the CA refuses the server.
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await _get(f"{base}/healthz", ssl.create_default_context())


async def test_mutual_tls_requires_a_client_certificate_from_the_ca(serve: Any, pki: Pki) -> None:
    trusted = _client_context(pki, pki.client_cert, pki.client_key)
    base = await serve(
        trusted,
        PDP_TLS_CERT_FILE=str(pki.server_cert),
        PDP_TLS_KEY_FILE=str(pki.server_key),
        PDP_TLS_CLIENT_CA_FILE=str(pki.ca),
    )
    status, answer = await _get(f"{base}/access/v1/evaluation", trusted, method="POST", json=EVALUATION)
    assert (status, answer["decision"]) == (200, True)
    for context in (_client_context(pki), _client_context(pki, pki.other_client_cert, pki.other_client_key)):
        with pytest.raises((aiohttp.ClientConnectionError, ssl.SSLError)):
            await _get(f"{base}/access/v1/evaluation", context, method="POST", json=EVALUATION)


def _serve_fails(**tls: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "pdp", "serve"], env=_env(PDP_DATABASE_URL="postgresql://x@127.0.0.1:1/x", **tls),
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_tls_configuration_errors_are_one_line(pki: Pki, tmp_path: Path) -> None:
    assert "PDP_TLS_CERT_FILE and PDP_TLS_KEY_FILE must be set together" in _serve_fails(
        PDP_TLS_CERT_FILE=str(pki.server_cert)
    )
    assert "PDP_TLS_CLIENT_CA_FILE needs" in _serve_fails(PDP_TLS_CLIENT_CA_FILE=str(pki.ca))
    assert "PDP_TLS_KEY_FILE: no such file" in _serve_fails(
        PDP_TLS_CERT_FILE=str(pki.server_cert), PDP_TLS_KEY_FILE=str(tmp_path / "missing.key")
    )
    # A key that is not the certificate's: refused before anything starts.
    assert "cannot load the certificate and key" in _serve_fails(
        PDP_TLS_CERT_FILE=str(pki.server_cert), PDP_TLS_KEY_FILE=str(pki.client_key)
    )
