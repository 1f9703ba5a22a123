"""`/forward-auth` over a real aiohttp server: modes, answers, tenants, JWTs and JWKS.

The hand-written tenant of test_web_support (alice admin, bob a viewer of d1 and an
editor of d2, carol disabled); the real gateways are in test_gateways.py.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from prometheus_client import CollectorRegistry
from pytest_aiohttp import AiohttpClient, AiohttpServer

from pdp.config import Settings
from pdp.errors import ConfigError
from pdp.gateway import GatewayRequest, normalize, parse_routes
from pdp.replica import Replica
from pdp.web.api_keys import ApiKeys, new_key
from pdp.web.app import build_app
from pdp.web.forward_auth import ERROR_BODY, Gateway, RouteBox, gateway_from_settings
from pdp.web.jwks import JwksKeys
from tests.test_web_support import TENANT, Clock, loaded_replica, settings

ROUTES = """
routes:
  - method: GET
    path: /docs/{id}
    resource: {type: document, id: "{id}"}
    action: read
  - method: PUT
    path: /docs/{id}
    resource: {type: document, id: "{id}"}
    action: write
public:
  - GET /public/{rest*}
"""
Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_client(aiohttp_client: AiohttpClient, clock: Clock) -> MakeClient:
    async def make(
        replica: Replica | None = None, gateway: Gateway | None = None, **changes: Any
    ) -> Client:
        config = settings(**{"forward_auth_mode": "traefik", **changes})
        if gateway is None:
            gateway = Gateway(RouteBox(parse_routes(ROUTES)))
        app = build_app(
            config, replica=replica or loaded_replica(clock), registry=CollectorRegistry(),
            gateway=gateway,
        )  # fmt: skip
        return await aiohttp_client(app)

    return make


def traefik(method: str, uri: str, **headers: str) -> dict[str, str]:
    return {"X-Forwarded-Method": method, "X-Forwarded-Uri": uri, **headers}


async def ask(
    client: Client, headers: dict[str, str], path: str = "/forward-auth"
) -> tuple[int, Any, Any]:
    """(status, JSON body or None, headers) of a forward-auth call (GET, as Traefik sends)."""
    response = await client.get(path, headers=headers)
    body = await response.read()
    return response.status, json.loads(body) if body else None, response.headers


# --- decisions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "method", "uri", "status", "reason"),
    [
        ("alice", "GET", "/docs/d1", 200, None),
        ("bob", "GET", "/docs/d1?x=1", 200, None),
        ("bob", "HEAD", "/docs/d1", 200, None),
        ("bob", "PUT", "/docs/d1", 403, "no_grant"),
        ("bob", "PUT", "/docs/d2", 200, None),
        ("carol", "GET", "/docs/d1", 403, "user_disabled"),
        ("nobody", "GET", "/docs/d1", 403, "unknown_user"),
        ("alice", "DELETE", "/docs/d1", 403, "no_route"),
        ("alice", "GET", "/elsewhere", 403, "no_route"),
    ],
)
async def test_decisions(
    make_client: MakeClient, user: str, method: str, uri: str, status: int, reason: str | None
) -> None:
    client = await make_client()
    got, body, headers = await ask(client, traefik(method, uri, **{"X-User-Id": user}))
    assert got == status
    if status == 200:
        assert body is None
        assert headers["X-PDP-Subject"] == user
        assert headers["X-PDP-Decision-Id"]
    else:
        assert body == {"error": "forbidden", "reason": reason}
        assert "X-PDP-Subject" not in headers
        assert ERROR_BODY not in headers  # only nginx needs the body in a header


async def test_public_routes_need_no_subject_and_name_none(make_client: MakeClient) -> None:
    client = await make_client()
    status, _, headers = await ask(client, traefik("GET", "/public/a/b", **{"X-User-Id": "x"}))
    assert status == 200
    assert "X-PDP-Subject" not in headers
    assert (await ask(client, traefik("GET", "/public/../docs/d1")))[0] == 401


async def test_no_subject_is_401_with_a_challenge(make_client: MakeClient) -> None:
    client = await make_client()
    status, body, headers = await ask(client, traefik("GET", "/docs/d1"))
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Bearer realm="pdp"'
    assert body == {"error": "unauthenticated", "message": "no X-User-Id header"}


async def test_default_allow_lets_unmatched_requests_through(make_client: MakeClient) -> None:
    client = await make_client(gateway=Gateway(RouteBox(parse_routes(ROUTES + "default: allow"))))
    assert (await ask(client, traefik("GET", "/elsewhere")))[0] == 200
    assert (await ask(client, traefik("GET", "/docs/d1")))[0] == 401  # matched: still checked


async def test_no_route_table_denies_everything(make_client: MakeClient) -> None:
    client = await make_client(gateway=Gateway(RouteBox(None)))
    status, body, _ = await ask(client, traefik("GET", "/docs/d1", **{"X-User-Id": "alice"}))
    assert (status, body) == (403, {"error": "forbidden", "reason": "no_route_table"})


async def test_send_subject_false_keeps_the_subject_to_pdp(make_client: MakeClient) -> None:
    client = await make_client(send_subject=False)
    status, _, headers = await ask(client, traefik("GET", "/docs/d1", **{"X-User-Id": "alice"}))
    assert status == 200
    assert "X-PDP-Subject" not in headers


# --- where the original request is read -------------------------------------------------


async def test_nginx_mode_reads_x_original_and_repeats_the_body_in_a_header(
    make_client: MakeClient,
) -> None:
    client = await make_client(forward_auth_mode="nginx")
    ok = {"X-Original-Method": "GET", "X-Original-URI": "/docs/d1", "X-User-Id": "alice"}
    assert (await ask(client, ok))[0] == 200
    # A client-sent Traefik header is not read in nginx mode.
    spoof = {**ok, "X-Forwarded-Uri": "/public/x", "X-Forwarded-Method": "GET"}
    status, body, headers = await ask(
        client, {**spoof, "X-User-Id": "bob", "X-Original-Method": "PUT"}
    )
    assert status == 403
    assert json.loads(headers[ERROR_BODY]) == body == {"error": "forbidden", "reason": "no_grant"}
    status, body, headers = await ask(client, {"X-Forwarded-Uri": "/docs/d1", "X-User-Id": "alice"})
    assert status == 403
    assert body == {"error": "bad_request",
                    "message": "X-Original-URI is missing (PDP_FORWARD_AUTH_MODE=nginx)"}  # fmt: skip


async def test_envoy_mode_reads_the_method_and_the_path_after_the_prefix(
    make_client: MakeClient,
) -> None:
    client = await make_client(forward_auth_mode="envoy")
    response = await client.put("/forward-auth/docs/d2?v=1", headers={"X-User-Id": "bob"})
    assert response.status == 200
    response = await client.put("/forward-auth/docs/d1", headers={"X-User-Id": "bob"})
    assert response.status == 403
    # Traefik's headers mean nothing to envoy mode.
    response = await client.get(
        "/forward-auth/docs/d1", headers={"X-User-Id": "carol", "X-Forwarded-Uri": "/public/x"}
    )
    assert response.status == 403
    # /forward-auth itself is the path /.
    assert (await client.get("/forward-auth", headers={"X-User-Id": "bob"})).status == 403


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
async def test_any_method_on_any_subpath_is_answered_never_404_or_405(
    make_client: MakeClient, method: str
) -> None:
    client = await make_client(forward_auth_mode="envoy")
    response = await client.request(method, "/forward-auth/x/y/z", headers={"X-User-Id": "alice"})
    assert response.status == 403


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (traefik("GET", "/docs/%zz"), "malformed percent-escape"),
        (traefik("GET", "docs/d1"), "not a request path"),
        (traefik("G3T", "/docs/d1"), "not an HTTP method"),
        (traefik("GÉT", "/docs/d1"), "not an HTTP method"),
        ({"X-Forwarded-Uri": "/docs/d1"}, "X-Forwarded-Method is missing"),
        (traefik("GET", "/docs/d1", **{"X-User-Id": "u" * 257}), "longer than 256"),
    ],
)
async def test_a_badly_described_request_is_a_deny_naming_the_problem(
    make_client: MakeClient, headers: dict[str, str], message: str
) -> None:
    client = await make_client()
    status, body, _ = await ask(client, {"X-User-Id": "alice", **headers})
    assert status == 403
    assert body["error"] == "bad_request"
    assert message in body["message"]


# --- tenants and freshness -------------------------------------------------------------


async def test_the_tenant_header_wins_over_the_default(make_client: MakeClient) -> None:
    client = await make_client(tenant_header="X-Tenant")
    zed = traefik("GET", "/docs/d1", **{"X-User-Id": "zed"})
    assert (await ask(client, zed))[0] == 403  # default tenant acme: no zed there
    assert (await ask(client, {**zed, "X-Tenant": "globex"}))[0] == 200
    status, body, _ = await ask(client, {**zed, "X-Tenant": "nowhere"})
    assert (status, body["reason"]) == (403, "unknown_tenant")


async def test_no_tenant_at_all_is_401(make_client: MakeClient) -> None:
    client = await make_client(tenant_header="X-Tenant", default_tenant=None)
    status, body, _ = await ask(client, traefik("GET", "/docs/d1", **{"X-User-Id": "alice"}))
    assert status == 401
    assert body["message"] == "no X-Tenant header and no default tenant"


async def test_no_data_or_stale_data_is_503_never_an_allow(
    make_client: MakeClient, clock: Clock
) -> None:
    request = traefik("GET", "/docs/d1", **{"X-User-Id": "alice"})
    empty = await make_client(replica=Replica(clock=clock))
    status, body, _ = await ask(empty, request)
    assert (status, body) == (503, {"error": "unavailable", "reason": "not_ready"})
    replica = loaded_replica(clock)
    client = await make_client(replica=replica, max_staleness_seconds=5.0)
    clock.advance(6)
    status, body, _ = await ask(client, request)
    assert (status, body) == (503, {"error": "unavailable", "reason": "stale"})
    serving = await make_client(replica=replica, max_staleness_seconds=5.0, stale_mode="serve")
    status, _, headers = await ask(serving, request)
    assert (status, headers["X-PDP-Stale"]) == (200, "6.000")


async def test_decisions_are_counted_under_their_endpoint(make_client: MakeClient) -> None:
    client = await make_client()
    await ask(client, traefik("GET", "/docs/d1", **{"X-User-Id": "alice"}))
    await ask(client, traefik("PUT", "/docs/d1", **{"X-User-Id": "bob"}))
    text = await (await client.get("/metrics")).text()
    assert 'pdp_decisions_total{decision="allow",endpoint="forward_auth"} 1.0' in text
    assert 'pdp_decisions_total{decision="deny",endpoint="forward_auth"} 1.0' in text
    assert 'pdp_http_requests_total{route="/forward-auth",status="403"} 1.0' in text


def test_the_request_conditions_would_see() -> None:
    table = parse_routes(ROUTES)
    match = table.match("GET", normalize("/docs/d%201"))
    assert match is not None
    asked = GatewayRequest("GET", normalize("/docs/d%201"), match, "bob", TENANT, {"x-env": "prod"})
    assert asked.attributes() == {
        "subject": {"type": "user", "id": "bob", "properties": {"tenant": TENANT}},
        "action": {"name": "read", "properties": {"method": "GET"}},
        "resource": {"type": "document", "id": "d 1", "properties": {"id": "d 1"}},
        "context": {"http": {"method": "GET", "path": "/docs/d 1", "route": "/docs/{id}",
                             "headers": {"x-env": "prod"}}},
    }  # fmt: skip


# --- JWTs --------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclasses.dataclass
class Keys:
    rsa: rsa.RSAPrivateKey
    ec: ec.EllipticCurvePrivateKey
    secret: bytes

    def jwks(self, *kids: str) -> dict[str, Any]:
        made = {
            "r1": {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa.public_key())), "alg": "RS256"},
            "e1": {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ec.public_key())), "alg": "ES256"},
            "h1": {"kty": "oct", "k": _b64(self.secret), "alg": "HS256"},
        }  # fmt: skip
        return {"keys": [{**made[k[:2]], "kid": k} for k in kids]}


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec.generate_private_key(ec.SECP256R1()),
        b"s" * 32,
    )


def token(keys: Keys, kid: str, expires_in: int = 300, **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": "alice", "iat": now, "exp": now + expires_in, **claims}
    signer: Any = {"r": keys.rsa, "e": keys.ec, "h": keys.secret}[kid[0]]
    alg = {"r": "RS256", "e": "ES256", "h": "HS256"}[kid[0]]
    return jwt.encode(payload, signer, algorithm=alg, headers={"kid": kid})


def bearer(value: str) -> dict[str, str]:
    return traefik("GET", "/docs/d1", Authorization=f"Bearer {value}")


@pytest.fixture
def jwks_file(tmp_path: Path, keys: Keys) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(keys.jwks("r1", "e1", "h1")))
    return path


async def test_jwts_of_each_algorithm_from_a_jwks_file(
    make_client: MakeClient, keys: Keys, jwks_file: Path
) -> None:
    config = settings(jwt_jwks_file=jwks_file, routes_path=None)
    gateway = dataclasses.replace(
        gateway_from_settings(config), routes=RouteBox(parse_routes(ROUTES))
    )
    client = await make_client(gateway=gateway, jwt_jwks_file=jwks_file)
    for kid in ("r1", "e1", "h1"):
        status, _, headers = await ask(client, bearer(token(keys, kid, sub="bob")))
        assert (status, headers["X-PDP-Subject"]) == (200, "bob"), kid
    # The trusted header means nothing once JWTs are configured.
    status, _, headers = await ask(client, traefik("GET", "/docs/d1", **{"X-User-Id": "alice"}))
    assert (status, headers["WWW-Authenticate"]) == (401, 'Bearer realm="pdp"')


def _hs256_with(secret: bytes, kid: str) -> str:
    """A token whose HS256 signature uses `secret` (e.g. an RSA public key as text)."""
    header = _b64(json.dumps({"alg": "HS256", "kid": kid, "typ": "JWT"}).encode())
    body = _b64(json.dumps({"sub": "alice", "exp": int(time.time()) + 300}).encode())
    signature = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64(signature)}"


ISS, AUD = "https://issuer.test", "pdp"


def _issued(keys: Keys, kid: str = "r1", **claims: Any) -> str:
    return token(keys, kid, **{"iss": ISS, "aud": AUD, **claims})


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda k: _issued(k, expires_in=-60), "the token has expired"),
        (lambda k: _issued(k, iss="https://other.test"), "Invalid issuer"),
        (lambda k: _issued(k, aud="someone-else"), "Audience doesn't match"),
        (lambda k: token(k, "r1", aud=AUD), 'missing the "iss" claim'),
        (lambda k: _issued(k, sub=""), "claim 'sub' must be a string"),
        (lambda k: _issued(k, "r9"), "unknown key id 'r9'"),
        (lambda k: jwt.encode({"sub": "alice", "exp": 2**31}, "", algorithm="none"),
         "algorithm none is not accepted"),
        (lambda k: _hs256_with(k.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), "r1"),
         "does not fit the key's type"),
        (lambda k: "a.b.c", "malformed token"),
    ],
)  # fmt: skip
async def test_an_invalid_jwt_is_401_invalid_token(
    make_client: MakeClient, keys: Keys, jwks_file: Path, make: Callable[[Keys], str], message: str
) -> None:
    config = settings(jwt_jwks_file=jwks_file, jwt_issuer=ISS, jwt_audience=AUD)
    gateway = dataclasses.replace(
        gateway_from_settings(config), routes=RouteBox(parse_routes(ROUTES))
    )
    client = await make_client(gateway=gateway, jwt_issuer=ISS, jwt_audience=AUD)
    valid = _issued(keys)
    assert (await ask(client, bearer(valid)))[0] == 200
    status, body, headers = await ask(client, bearer(make(keys)))
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert body["error"] == "invalid_token"
    assert message in body["message"]


async def test_the_tenant_claim_names_the_tenant(
    make_client: MakeClient, keys: Keys, jwks_file: Path
) -> None:
    config = settings(jwt_jwks_file=jwks_file, jwt_tenant_claim="org")
    gateway = dataclasses.replace(
        gateway_from_settings(config), routes=RouteBox(parse_routes(ROUTES))
    )
    client = await make_client(gateway=gateway, jwt_tenant_claim="org")
    assert (await ask(client, bearer(token(keys, "r1", sub="zed", org="globex"))))[0] == 200
    status, body, _ = await ask(client, bearer(token(keys, "r1", sub="zed")))
    assert (status, body["message"]) == (401, "claim 'org' must be a string of 1 to 256 characters")


@dataclasses.dataclass
class JwksServer:
    document: dict[str, Any]
    server: TestServer
    fetches: int = 0

    @property
    def url(self) -> str:
        return str(self.server.make_url("/jwks.json"))


@pytest.fixture
async def jwks_server(aiohttp_server: AiohttpServer, keys: Keys) -> JwksServer:
    holder: list[JwksServer] = []

    async def serve(_request: web.Request) -> web.Response:
        holder[0].fetches += 1
        return web.json_response(holder[0].document)

    app = web.Application()
    app.router.add_get("/jwks.json", serve)
    holder.append(JwksServer(keys.jwks("r1"), await aiohttp_server(app)))
    return holder[0]


def _url_gateway(url: str, clock: Clock, **kwargs: Any) -> Gateway:
    keys = JwksKeys(url, ttl=kwargs.pop("ttl", 300.0), timeout=2.0, clock=clock, **kwargs)
    return Gateway(RouteBox(parse_routes(ROUTES)), keys)


async def test_jwks_from_a_url_refreshed_on_an_unknown_kid(
    make_client: MakeClient, keys: Keys, jwks_server: JwksServer
) -> None:
    clock = Clock()  # the JWKS cache's own: the replica's stays fresh
    gateway = _url_gateway(jwks_server.url, clock, min_refresh_interval=10.0)
    client = await make_client(gateway=gateway)
    assert (await ask(client, bearer(token(keys, "r1"))))[0] == 200
    assert jwks_server.fetches == 1
    # The issuer rotates a key in: the unknown kid fetches the set again, once.
    jwks_server.document = keys.jwks("r1", "e1")
    clock.advance(10)
    assert (await ask(client, bearer(token(keys, "e1"))))[0] == 200
    assert jwks_server.fetches == 2
    # Unknown kids within the interval do not hammer the issuer.
    for _ in range(3):
        status, body, _ = await ask(client, bearer(token(keys, "h1")))
        assert (status, body["message"]) == (401, "unknown key id 'h1'")
    assert jwks_server.fetches == 2


async def test_jwks_ttl_refreshes_in_the_background(
    make_client: MakeClient, keys: Keys, jwks_server: JwksServer
) -> None:
    clock = Clock()  # the JWKS cache's own: the replica's stays fresh
    gateway = _url_gateway(jwks_server.url, clock, ttl=60.0)
    client = await make_client(gateway=gateway)
    assert (await ask(client, bearer(token(keys, "r1"))))[0] == 200
    jwks_server.document = keys.jwks("e1")  # r1 retired
    clock.advance(61)
    # Answered with the keys at hand; the refresh runs behind it.
    assert (await ask(client, bearer(token(keys, "r1"))))[0] == 200
    assert gateway.keys is not None
    await gateway.keys.refreshed()
    assert jwks_server.fetches == 2
    assert (await ask(client, bearer(token(keys, "r1"))))[0] == 401
    assert (await ask(client, bearer(token(keys, "e1"))))[0] == 200


async def test_an_unreachable_jwks_is_503_not_an_allow(
    make_client: MakeClient, keys: Keys, clock: Clock
) -> None:
    gateway = _url_gateway("http://127.0.0.1:1/jwks.json", clock)
    client = await make_client(gateway=gateway)
    status, body, _ = await ask(client, bearer(token(keys, "r1")))
    assert (status, body) == (503, {"error": "unavailable", "reason": "no_jwks"})
    assert (await ask(client, traefik("GET", "/public/x")))[0] == 200  # public: no key needed


# --- configuration at start ----------------------------------------------------------------


def test_a_bad_route_file_names_the_file_and_entry(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("routes:\n  - path: /a\n  - path: /b/{x}/{x}\n")
    with pytest.raises(
        Exception, match=rf"^PDP_ROUTES: {path}: routes\[1\] \(/b/\{{x\}}/\{{x\}}\): "
    ):
        gateway_from_settings(Settings(routes_path=path, default_tenant="t"))
    with pytest.raises(Exception, match="PDP_ROUTES: cannot read"):
        gateway_from_settings(Settings(routes_path=tmp_path / "missing.yaml", default_tenant="t"))
    path.write_text("routes: []")
    with pytest.raises(Exception, match="PDP_ROUTES needs a tenant"):
        gateway_from_settings(Settings(routes_path=path))


def test_a_bad_jwks_file_fails_start(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text('{"keys": [{"kty": "RSA", "n": "x"}]}')
    with pytest.raises(Exception, match=r"PDP_JWT_JWKS_FILE: .*keys\[0\] is not a usable key"):
        gateway_from_settings(Settings(jwt_jwks_file=path))


def test_forward_auth_settings_are_validated_by_name(jwks_file: Path) -> None:
    both = {"PDP_JWT_JWKS_URL": "https://idp.test/jwks", "PDP_JWT_JWKS_FILE": str(jwks_file)}
    with pytest.raises(ConfigError, match=r"^PDP_JWT_JWKS_URL and PDP_JWT_JWKS_FILE: set one"):
        Settings.from_env(both)
    cases = {
        "PDP_FORWARD_AUTH_SUBJECT_HEADER": ("X User", "not an HTTP header name"),
        "PDP_FORWARD_AUTH_HEADERS": ("X-Env, bad header", "not an HTTP header name"),
        "PDP_FORWARD_AUTH_SEND_SUBJECT": ("maybe", "must be true or false"),
        "PDP_JWT_ALGORITHMS": ("RS256,none", "must be a comma list of HS256, RS256, ES256"),
        "PDP_JWT_LEEWAY_SECONDS": ("600", "must be 0 to 300 seconds"),
        "PDP_JWT_JWKS_FILE": ("/no/jwks.json", "no such file"),
        "PDP_ROUTES": ("/no/routes.yaml", "no such file"),
    }
    for env, (bad, message) in cases.items():
        with pytest.raises(ConfigError, match=f"^{env}: {message}"):
            Settings.from_env({env: bad})
    parsed = Settings.from_env(
        {"PDP_FORWARD_AUTH_HEADERS": "X-Env, X-Region", "PDP_FORWARD_AUTH_SEND_SUBJECT": "no",
         "PDP_JWT_ALGORITHMS": "es256", "PDP_JWT_JWKS_FILE": str(jwks_file)}
    )  # fmt: skip
    assert parsed.condition_headers == ("X-Env", "X-Region")
    assert parsed.send_subject is False
    assert parsed.jwt_algorithms == ("ES256",)
    assert parsed.jwt_enabled


async def test_with_api_keys_the_gateway_presents_its_key_beside_the_users_token(
    aiohttp_client: AiohttpClient, clock: Clock, keys: Keys, jwks_file: Path
) -> None:
    gateway_key = new_key()
    api_keys = ApiKeys((("gateway", hashlib.sha256(gateway_key.encode()).digest()),))
    config = settings(forward_auth_mode="traefik", jwt_jwks_file=jwks_file)
    gateway = dataclasses.replace(
        gateway_from_settings(config), routes=RouteBox(parse_routes(ROUTES))
    )
    app = build_app(
        config, replica=loaded_replica(clock), registry=CollectorRegistry(), gateway=gateway,
        api_keys=api_keys,
    )  # fmt: skip
    client = await aiohttp_client(app)
    user_token = bearer(token(keys, "r1"))
    # The user's bearer JWT is no API key: without the gateway's key, refused.
    assert (await ask(client, user_token))[0] == 401
    status, _, headers = await ask(client, {**user_token, "X-PDP-API-Key": gateway_key})
    assert (status, headers["X-PDP-Subject"]) == (200, "alice")
