"""PEP authentication: API keys from a hashed keys file, through the app and the command."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pytest_aiohttp import AiohttpClient

from pdp.errors import ConfigError
from pdp.replica import Replica
from pdp.web.api_keys import ApiKeys, key_line, new_key
from tests.test_web_support import Clock, evaluation, loaded_replica, make_app

EVALUATION = "/access/v1/evaluation"


def _keys_file(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "keys"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_file_holds_hashes_and_names(tmp_path: Path) -> None:
    key = new_key()
    assert len(key) > 40
    assert key != new_key()
    line = key_line("gateway", key)
    assert line == f"gateway sha256:{hashlib.sha256(key.encode()).hexdigest()}"
    assert key not in line
    keys = ApiKeys.load(_keys_file(tmp_path, "# the gateways", "", line, key_line("app", "k2")))
    assert keys.identify(key) == "gateway"
    assert keys.identify("k2") == "app"
    assert keys.identify("k3") is None
    assert keys.identify(key[:-1]) is None


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (("gateway sha256:abc",), "line 1: expected 'NAME sha256:HEX'"),
        (("# comment", "gateway " + "0" * 64), "line 2: expected"),
        (("bad name sha256:" + "0" * 64,), "line 1"),
        (("# nothing but comments",), "holds no key"),
    ],
)
def test_a_malformed_file_names_the_line(tmp_path: Path, lines: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ApiKeys.load(_keys_file(tmp_path, *lines))


@pytest.fixture
def replica(clock: Clock) -> Replica:
    return loaded_replica(clock)


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def test_keys_guard_the_check_api_not_the_probes(
    aiohttp_client: AiohttpClient, replica: Replica, tmp_path: Path
) -> None:
    key = new_key()
    keys = ApiKeys.load(_keys_file(tmp_path, key_line("gw", key)))
    client = await aiohttp_client(make_app(replica, api_keys=keys))

    response = await client.post(EVALUATION, json=evaluation())
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="pdp"'
    assert (await response.json())["error"] == "unauthorized"
    response = await client.post(EVALUATION, json=evaluation(), headers={"X-PDP-API-Key": "nope"})
    assert (response.status, (await response.json())["message"]) == (401, "the API key is not valid")
    for headers in ({"X-PDP-API-Key": key}, {"Authorization": f"Bearer {key}"}):
        response = await client.post(EVALUATION, json=evaluation(), headers=headers)
        assert (response.status, (await response.json())["decision"]) == (200, True)
    # Unknown paths do not tell an unauthenticated caller what exists.
    assert (await client.get("/access/v1/nothing")).status == 401
    assert (await client.get("/access/v1/nothing", headers={"X-PDP-API-Key": key})).status == 404
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.yaml", "/.well-known/authzen-configuration"):
        assert (await client.get(path)).status == 200, path


async def test_no_keys_file_no_keys_needed(aiohttp_client: AiohttpClient, replica: Replica) -> None:
    client = await aiohttp_client(make_app(replica))
    response = await client.post(EVALUATION, json=evaluation())
    assert (response.status, (await response.json())["decision"]) == (200, True)


def test_api_key_create_prints_the_key_once_and_stores_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")} | {"PDP_API_KEYS_FILE": str(path)}
    made = []
    for name in ("gateway", "billing"):
        result = subprocess.run(
            [sys.executable, "-m", "pdp", "api-key", "create", "--name", name],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )
        assert result.returncode == 0, result.stderr
        made.append(result.stdout.strip())
        assert made[-1] not in result.stderr
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert all(key not in path.read_text() for key in made)
    keys = ApiKeys.load(path)
    assert [keys.identify(key) for key in made] == ["gateway", "billing"]
