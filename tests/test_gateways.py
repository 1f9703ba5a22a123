"""Forward-auth end to end: real nginx, Envoy and Traefik in front of an upstream, a real
`pdp serve` over a seeded PostgreSQL tenant, the configurations of deploy/gateways/.

Every gateway, each with its own pdp (the gateway mode is configuration): allowed
users reach the upstream and it sees X-PDP-Subject (never a client-sent one), denied
users get 403 with pdp's JSON, anonymous ones 401 with a challenge, public routes pass
without a subject, dot segments cannot turn a protected path into a public one, the
API-gateway profile (route:<METHOD> grants) works, and a grant committed in
PostgreSQL changes the gateway's answer within the staleness bound. Then the same
with a bearer JWT (RS256, keys from a JWKS file) instead of the trusted header.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from loadtests.gateway_harness import (
    DEPLOY,
    GATEWAYS,
    Gateway,
    Pdp,
    Reply,
    Upstream,
    upstream_headers,
)
from tests.conftest import DatabaseFactory

TENANT = "acme"
MAX_STALENESS = 5.0
ISSUER = "https://issuer.test"
AUDIENCE = "pdp-gateway-tests"
DOC = "/projects/p1/documents/d1"
SEED = """
INSERT INTO pdp.tenants (id) VALUES ('acme');
INSERT INTO pdp.users (tenant_id, id) VALUES
  ('acme', 'alice'), ('acme', 'bob'), ('acme', 'carol'), ('acme', 'dave'),
  ('acme', 'late-nginx'), ('acme', 'late-envoy'), ('acme', 'late-traefik');
INSERT INTO pdp.roles (tenant_id, id) VALUES
  ('acme', 'reader'), ('acme', 'writer'), ('acme', 'project-viewer');
INSERT INTO pdp.role_inherits VALUES ('acme', 'writer', 'reader');
INSERT INTO pdp.role_permissions (tenant_id, role_id, permission) VALUES
  ('acme', 'reader', 'document:read'), ('acme', 'writer', 'document:write'),
  ('acme', 'project-viewer', 'route:GET');
INSERT INTO pdp.user_roles (tenant_id, user_id, role_id, scope) VALUES
  ('acme', 'alice', 'reader', '*'),
  ('acme', 'dave', 'writer', 'document:d1'),
  ('acme', 'carol', 'project-viewer', 'route:/projects/{project_id}');
"""


def _run(coro: Coroutine[Any, Any, None]) -> None:
    """Run `coro` to its end on a loop of its own (in a thread: the test's loop stays as is)."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coro).result(timeout=60)


async def _execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def gateway_db(template_db: str) -> Iterator[str]:
    """A migrated database holding the `acme` tenant above (shared by this module)."""
    factory = DatabaseFactory(template_db)
    holder: list[str] = []

    async def create() -> None:
        holder.append(await factory.create())
        await _execute(holder[0], SEED)

    _run(create())
    yield holder[0]
    _run(factory.drop_all())


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.stop()


def _pdp_env(mode: str, **extra: str) -> dict[str, str]:
    return {
        "PDP_ROUTES": str(DEPLOY / "routes.yaml"), "PDP_FORWARD_AUTH_MODE": mode,
        "PDP_DEFAULT_TENANT": TENANT, "PDP_MAX_STALENESS_SECONDS": str(MAX_STALENESS),
        "PDP_POLL_INTERVAL_SECONDS": "0.5", **extra,
    }  # fmt: skip


@pytest.fixture(scope="module", params=GATEWAYS)
def gateway(
    request: pytest.FixtureRequest, gateway_db: str, upstream: Upstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Gateway]:  # fmt: skip
    """A real gateway (each of the three in turn) with its own pdp in header mode."""
    name: str = request.param
    run_dir = tmp_path_factory.mktemp(f"gw-{name}")
    pdp = Pdp(gateway_db, run_dir, _pdp_env(name), name=f"pdp-{name}")
    try:
        gw = Gateway(name, run_dir / "gateway", pdp.port, upstream.port)
        try:
            yield gw
        finally:
            assert gw.stop() == 0, gw.proc.tail()
    finally:
        assert pdp.stop() == 0, pdp.proc.tail()


def _reached(reply: Reply) -> dict[str, Any]:
    echo = reply.upstream
    assert reply.status == 200, (reply.status, reply.body[:300])
    assert echo is not None, reply.body[:300]
    return echo


def test_allowed_user_reaches_the_upstream_as_pdps_subject(gateway: Gateway) -> None:
    echo = _reached(gateway.send("GET", DOC, {"X-User-Id": "alice"}))
    assert upstream_headers(echo, "X-PDP-Subject") == ["alice"]
    assert echo["path"] == DOC
    # HEAD is decided as the GET it mirrors.
    assert gateway.send("HEAD", DOC, {"X-User-Id": "alice"}).status == 200


def test_a_client_sent_subject_header_never_reaches_the_upstream(gateway: Gateway) -> None:
    echo = _reached(gateway.send("GET", DOC, {"X-User-Id": "alice", "X-PDP-Subject": "admin"}))
    assert upstream_headers(echo, "X-PDP-Subject") == ["alice"]
    public = _reached(gateway.send("GET", "/docs/intro", {"X-PDP-Subject": "admin"}))
    assert upstream_headers(public, "X-PDP-Subject") == []


def test_denied_user_gets_403_with_the_reason(gateway: Gateway) -> None:
    reply = gateway.send("GET", DOC, {"X-User-Id": "bob"})
    assert reply.status == 403
    assert reply.upstream is None
    assert reply.json() == {"error": "forbidden", "reason": "no_grant"}
    # alice may read, not write; dave's writer role covers d1 only.
    assert gateway.send("PUT", DOC, {"X-User-Id": "alice"}).status == 403
    assert gateway.send("PUT", DOC, {"X-User-Id": "dave"}).status == 200
    assert gateway.send("PUT", "/projects/p1/documents/d2", {"X-User-Id": "dave"}).status == 403


def test_anonymous_gets_401_with_a_challenge(gateway: Gateway) -> None:
    reply = gateway.send("GET", DOC)
    assert reply.status == 401
    assert reply.header("WWW-Authenticate") == 'Bearer realm="pdp"'
    assert reply.json()["error"] == "unauthenticated"


def test_public_routes_pass_and_unmatched_ones_are_denied(gateway: Gateway) -> None:
    echo = _reached(gateway.send("GET", "/docs/guide/intro"))
    assert upstream_headers(echo, "X-PDP-Subject") == []
    assert gateway.send("POST", "/docs/guide/intro").status == 403  # public is GET only
    reply = gateway.send("GET", "/nowhere", {"X-User-Id": "alice"})
    assert (reply.status, reply.json()) == (403, {"error": "forbidden", "reason": "no_route"})


@pytest.mark.parametrize(
    "path", ["/docs/../projects/p1/documents/d1", "/docs/%2e%2e/projects/p1/documents/d1",
             "/docs/./..//projects/p1/documents/d1"],
)  # fmt: skip
def test_dot_segments_cannot_make_a_protected_path_public(gateway: Gateway, path: str) -> None:
    reply = gateway.send("GET", path)
    # Denied as the protected path it resolves to (a gateway may refuse it even sooner).
    assert reply.upstream is None
    assert reply.status in (400, 401), (reply.status, reply.body[:200])


def test_the_api_gateway_profile_grants_by_route_template(gateway: Gateway) -> None:
    assert gateway.send("GET", "/projects/p7", {"X-User-Id": "carol"}).status == 200
    assert gateway.send("DELETE", "/projects/p7", {"X-User-Id": "carol"}).status == 403
    assert gateway.send("GET", "/projects/p7", {"X-User-Id": "alice"}).status == 403


def test_a_committed_grant_changes_the_answer_within_the_staleness_bound(
    gateway: Gateway, gateway_db: str
) -> None:
    user = f"late-{gateway.name}"
    assert gateway.send("GET", DOC, {"X-User-Id": user}).status == 403
    grant = f"INSERT INTO pdp.user_roles VALUES ('acme', '{user}', 'reader', '*')"
    _run(_execute(gateway_db, grant))
    committed = time.monotonic()
    while (status := gateway.send("GET", DOC, {"X-User-Id": user}).status) != 200:
        assert status == 403
        assert time.monotonic() - committed < MAX_STALENESS, "not visible within the bound"
        time.sleep(0.02)  # polling the gateway with a deadline: no event crosses it
    _run(_execute(gateway_db, f"DELETE FROM pdp.user_roles WHERE user_id = '{user}'"))
    revoked = time.monotonic()
    while gateway.send("GET", DOC, {"X-User-Id": user}).status != 403:
        assert time.monotonic() - revoked < MAX_STALENESS, "revocation not visible in time"
        time.sleep(0.02)


# --- the same with a bearer JWT --------------------------------------------------------


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[rsa.RSAPrivateKey, Path]:
    """An RSA key and a JWKS file with its public half (kid k1)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", alg="RS256", use="sig")
    path = tmp_path_factory.mktemp("jwks") / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    return key, path


def _token(key: rsa.RSAPrivateKey, subject: str, expires_in: float = 300, **claims: Any) -> str:
    now = int(time.time())
    body = {"sub": subject, "iss": ISSUER, "aud": AUDIENCE, "iat": now,
            "exp": now + int(expires_in), **claims}  # fmt: skip
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": "k1"})


@pytest.fixture(scope="module", params=GATEWAYS)
def jwt_gateway(
    request: pytest.FixtureRequest, gateway_db: str, upstream: Upstream,
    tmp_path_factory: pytest.TempPathFactory, signing_key: tuple[rsa.RSAPrivateKey, Path],
) -> Iterator[Gateway]:  # fmt: skip
    name: str = request.param
    run_dir = tmp_path_factory.mktemp(f"gw-jwt-{name}")
    env = _pdp_env(name, PDP_JWT_JWKS_FILE=str(signing_key[1]), PDP_JWT_ISSUER=ISSUER,
                   PDP_JWT_AUDIENCE=AUDIENCE)  # fmt: skip
    pdp = Pdp(gateway_db, run_dir, env, name=f"pdp-jwt-{name}")
    try:
        gw = Gateway(name, run_dir / "gateway", pdp.port, upstream.port)
        try:
            yield gw
        finally:
            assert gw.stop() == 0, gw.proc.tail()
    finally:
        assert pdp.stop() == 0, pdp.proc.tail()


def test_a_valid_bearer_jwt_names_the_subject(
    jwt_gateway: Gateway, signing_key: tuple[rsa.RSAPrivateKey, Path]
) -> None:
    key = signing_key[0]
    echo = _reached(
        jwt_gateway.send("GET", DOC, {"Authorization": f"Bearer {_token(key, 'alice')}"})
    )
    assert upstream_headers(echo, "X-PDP-Subject") == ["alice"]
    denied = jwt_gateway.send("GET", DOC, {"Authorization": f"Bearer {_token(key, 'bob')}"})
    assert denied.status == 403


def test_an_expired_or_foreign_jwt_gets_401_invalid_token(
    jwt_gateway: Gateway, signing_key: tuple[rsa.RSAPrivateKey, Path]
) -> None:
    expired = _token(signing_key[0], "alice", expires_in=-120)  # past the 30 s leeway
    foreign = _token(rsa.generate_private_key(public_exponent=65537, key_size=2048), "alice")
    for token in (expired, foreign, "not.a.jwt"):
        reply = jwt_gateway.send("GET", DOC, {"Authorization": f"Bearer {token}"})
        assert reply.status == 401, token
        assert reply.header("WWW-Authenticate") == 'Bearer error="invalid_token"'
        assert reply.json()["error"] == "invalid_token"
    # With JWTs configured the trusted header counts for nothing.
    reply = jwt_gateway.send("GET", DOC, {"X-User-Id": "alice"})
    assert (reply.status, reply.header("WWW-Authenticate")) == (401, 'Bearer realm="pdp"')
