"""`/forward-auth`: the decision endpoint of nginx `auth_request`, Traefik `forwardAuth`
and Envoy `ext_authz` (HTTP), which cannot send an AuthZEN body.

Any method, and any path below `/forward-auth` (Envoy appends the original path to its
`path_prefix`). Where the original request is read from is configured, never guessed
from the headers present (nginx copies every client header into its subrequest, so a
client could send Traefik's): `PDP_FORWARD_AUTH_MODE`

    nginx     X-Original-Method, X-Original-URI
    traefik   X-Forwarded-Method, X-Forwarded-Uri
    envoy     this request's own method, and its path after /forward-auth

The path is normalized (`pdp.gateway.paths`) and matched against the route table
(`PDP_ROUTES`); the subject comes from the trusted header (`X-User-Id` by default)
or, when a JWKS is configured, only from a verified bearer JWT. Answers, all small:

    200  allow: X-PDP-Decision-Id, X-PDP-Subject (unless PDP_FORWARD_AUTH_SEND_SUBJECT
         is false); a public route or `default: allow` carries no subject
    401  no subject, or an invalid token: WWW-Authenticate, {"error", "message"}
    403  deny: {"error": "forbidden", "reason"} (or "bad_request" for a request the
         gateway described badly: it is still a deny); with decision logs on
         (PDP_DECISION_LOG) an engine's deny carries its X-PDP-Decision-Id too, the id
         of its row in the log
    503  no decision possible (no data yet, stale data, JWKS unreachable): fail closed

never a 3xx or a 404 (nginx would turn them into 500s, Traefik and Envoy would show
them to the client). With nginx, which throws the auth body away, every non-200
also carries its JSON in `X-PDP-Error-Body` for the gateway to re-emit.

The decision is the engine's, the same as `/access/v1/evaluation`'s; the hot path
does no I/O and no await (a JWT with an unknown key id may wait for a bounded JWKS
refresh, see `pdp.web.jwks`).
"""

from __future__ import annotations

import itertools
import logging
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from pdp.config import Settings
from pdp.decision_log import DecisionLog
from pdp.engine import Decision, Engine
from pdp.errors import ConfigError, DependencyError
from pdp.gateway import (
    GatewayRequest,
    Identity,
    InvalidToken,
    KeySet,
    PathError,
    RouteTable,
    TokenPolicy,
    UnknownKey,
    normalize,
    parse_routes,
    split_uri,
    verify,
)
from pdp.metrics import Metrics
from pdp.protocol import MAX_ID_LENGTH, dumps
from pdp.replica import Replica
from pdp.web.jwks import JwksKeys, load_jwks_file

log = logging.getLogger(__name__)

PATH = "/forward-auth"
DECISION_ID = "X-PDP-Decision-Id"
SUBJECT = "X-PDP-Subject"
ERROR_BODY = "X-PDP-Error-Body"
STALE = "X-PDP-Stale"
ENDPOINT = "forward_auth"  # the endpoint label of pdp_decisions_total
_JSON = "application/json"
_METHOD = re.compile(r"^[A-Z][A-Z-]{0,31}$")  # as the route table's (pdp.gateway.routes)
_COMMON_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_ORIGINAL = {
    "nginx": ("X-Original-Method", "X-Original-URI"),
    "traefik": ("X-Forwarded-Method", "X-Forwarded-Uri"),
}
_NO_CREDENTIALS = 'Bearer realm="pdp"'
_INVALID_TOKEN = 'Bearer error="invalid_token"'  # noqa: S105 -- a challenge, not a secret


def load_routes(path: Path) -> RouteTable:
    """The route table in `path`, read and validated; ConfigError naming file and entry."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ConfigError(f"PDP_ROUTES: cannot read {path}: {reason}") from None
    return parse_routes(text, f"PDP_ROUTES: {path}")


class RouteBox:
    """The route table in force: each request reads it once, a reload swaps it whole."""

    def __init__(self, table: RouteTable | None, path: Path | None = None) -> None:
        self.table = table
        self.path = path  # where a reload reads it again (None: not from a file)


@dataclass(frozen=True, slots=True)
class Gateway:
    """What forward-auth needs besides the replica: the routes and, for JWTs, the keys."""

    routes: RouteBox
    keys: JwksKeys | None = None


def gateway_from_settings(settings: Settings) -> Gateway:
    """Routes and keys as configured, loaded now (at start): ConfigError when invalid."""
    table = None if settings.routes_path is None else load_routes(settings.routes_path)
    if table is not None and not (
        settings.default_tenant or settings.tenant_header or settings.jwt_tenant_claim
    ):
        raise ConfigError(
            "PDP_ROUTES needs a tenant: set PDP_DEFAULT_TENANT, "
            "PDP_FORWARD_AUTH_TENANT_HEADER or PDP_JWT_TENANT_CLAIM"
        )
    keys = None
    if settings.jwt_jwks_file is not None:
        initial = load_jwks_file(settings.jwt_jwks_file)
        keys = _keys(settings, settings.jwt_jwks_file, initial)
    elif settings.jwt_jwks_url is not None:
        keys = _keys(settings, settings.jwt_jwks_url, None)
    return Gateway(RouteBox(table, settings.routes_path), keys)


def _keys(settings: Settings, source: str | Path, initial: KeySet | None) -> JwksKeys:
    return JwksKeys(
        source,
        ttl=settings.jwt_jwks_ttl_seconds,
        timeout=settings.jwt_jwks_timeout_seconds,
        initial=initial,
    )


class _Answer(Exception):
    """A non-200 answer decided before the engine is asked (raised inside the handler)."""

    def __init__(self, status: int, body: dict[str, str], challenge: str | None = None) -> None:
        super().__init__(body.get("message") or body.get("reason"))
        self.status = status
        self.body = body
        self.challenge = challenge


# Decision ids: a per-process random prefix and a counter (as the request ids).
_ID_PREFIX = "fa" + uuid.uuid4().hex[:14]
_IDS = itertools.count(1)


def _new_decision_id() -> str:
    return f"{_ID_PREFIX}{next(_IDS):012x}"


class ForwardAuthApi:
    """The forward-auth handler over one replica; `routes()` gives its two routes."""

    def __init__(
        self,
        settings: Settings,
        replica: Replica,
        metrics: Metrics,
        gateway: Gateway | None,
        decision_log: DecisionLog | None = None,
    ) -> None:
        self._replica = replica
        self._log = decision_log
        self._metrics = metrics
        self._gateway = gateway or Gateway(RouteBox(None))
        self._mode = settings.forward_auth_mode
        self._subject_header = settings.subject_header
        self._tenant_header = settings.tenant_header
        self._default_tenant = settings.default_tenant
        self._send_subject = settings.send_subject
        self._selected = tuple(h.lower() for h in settings.condition_headers)
        self._max_staleness = settings.max_staleness_seconds
        self._serve_stale = settings.stale_mode == "serve"
        self._nginx = settings.forward_auth_mode == "nginx"
        self._deny_bodies: dict[str, tuple[bytes, dict[str, str]]] = {}
        self._policy = TokenPolicy(
            algorithms=settings.jwt_algorithms,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            leeway=settings.jwt_leeway_seconds,
            subject_claim=settings.jwt_subject_claim,
            tenant_claim=settings.jwt_tenant_claim,
        )

    def routes(self) -> list[web.RouteDef]:
        return [web.route("*", PATH, self.check), web.route("*", PATH + "/{tail:.*}", self.check)]

    # --- the handler -------------------------------------------------------------------

    async def check(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            return await self._check(request, started)
        except _Answer as answer:
            return self._refusal(answer)

    async def _check(self, request: web.Request, started: float) -> web.Response:
        method, uri = self._original(request)
        try:
            path, _query = split_uri(uri)
            segments = normalize(path)
        except PathError as exc:
            raise _Answer(403, {"error": "bad_request", "message": str(exc)}) from None
        table = self._gateway.routes.table
        if table is None:
            raise _Answer(403, {"error": "forbidden", "reason": "no_route_table"})
        match = table.match(method, segments)
        if match is None or match.route.public:
            if match is None and not table.default_allow:
                raise _Answer(403, {"error": "forbidden", "reason": "no_route"})
            self._metrics.decided(ENDPOINT, True, time.perf_counter() - started)
            return self._allow(None, None)
        if self._gateway.keys is None:
            subject, token_tenant = self._header_subject(request), None
        else:
            subject, token_tenant = await self._token_subject(request, self._gateway.keys)
        tenant = token_tenant or self._tenant(request)
        users = self._replica.users
        if users is not None and self._replica.engine is not None:
            try:  # on-demand mode: the subject's rows into memory first
                await users.ensure(tenant, subject)
            except DependencyError:
                log.warning("loading the subject's rows failed; refusing", exc_info=True)
                raise _Answer(503, {"error": "unavailable", "reason": "user_unavailable"}) from None
        engine, stale = self._gate()
        selected = selected_headers(request.headers, self._selected) if self._selected else {}
        asked = GatewayRequest(method, segments, match, subject, tenant, selected)
        now = time.time()
        decision = _decide(engine, asked, now)
        seconds = time.perf_counter() - started
        self._metrics.decided(ENDPOINT, decision.allowed, seconds)
        if self._log is not None:
            return self._logged(asked, decision, engine, now, seconds, stale)
        if not decision.allowed:
            return self._denied(decision.reason)
        return self._allow(subject, stale)

    def _logged(  # noqa: PLR0917 -- internal, the decision's parts
        self, asked: GatewayRequest, decision: Decision, engine: Engine, now: float,
        seconds: float, stale: str | None,
    ) -> web.Response:  # fmt: skip
        """The answer of a logged decision: its X-PDP-Decision-Id (on a deny too) is the
        decision log row's id."""
        assert self._log is not None
        decision_id = _new_decision_id()
        match = asked.match
        self._log.record(
            decision_id, now, ENDPOINT, asked.tenant, "user", asked.subject, asked.action,
            match.resource_type, match.resource_id, decision.allowed, decision.reason,
            engine.revision, seconds,
        )  # fmt: skip
        if decision.allowed:
            return self._allow(asked.subject, stale, decision_id)
        denied = self._denied(decision.reason)
        denied.headers[DECISION_ID] = decision_id
        return denied

    def _original(self, request: web.Request) -> tuple[str, str]:
        """(method, URI) of the request the gateway asks about, as the mode says."""
        if self._mode == "envoy":
            method, uri = request.method, request.raw_path[len(PATH) :]
            if not uri.startswith("/"):
                uri = "/" + uri
        else:
            method_header, uri_header = _ORIGINAL[self._mode]
            method = request.headers.get(method_header, "")
            uri = request.headers.get(uri_header, "")
            if not uri or not method:
                missing = uri_header if not uri else method_header
                message = f"{missing} is missing (PDP_FORWARD_AUTH_MODE={self._mode})"
                raise _Answer(403, {"error": "bad_request", "message": message})
        if method not in _COMMON_METHODS:
            method = method.upper()
        if method not in _COMMON_METHODS and not _METHOD.match(method):
            raise _Answer(403, {"error": "bad_request", "message": "not an HTTP method"})
        return method, uri

    def _header_subject(self, request: web.Request) -> str:
        """The trusted header's subject; _Answer 401 when there is none."""
        subject = request.headers.get(self._subject_header)
        if not subject:
            raise _unauthenticated(f"no {self._subject_header} header")
        if len(subject) > MAX_ID_LENGTH:
            message = f"{self._subject_header} is longer than {MAX_ID_LENGTH} characters"
            raise _Answer(403, {"error": "bad_request", "message": message})
        return subject

    async def _token_subject(self, request: web.Request, keys: JwksKeys) -> tuple[str, str | None]:
        """(subject, tenant or None) of the bearer JWT; _Answer 401 when there is none."""
        token = _bearer(request.headers.get("Authorization"))
        identity = await self._verify(token, keys)
        return identity.subject, identity.tenant

    async def _verify(self, token: str, keys: JwksKeys) -> Identity:
        key_set = keys.current()
        try:
            if key_set is None:
                key_set = await keys.after_unknown_kid()
                if key_set is None:
                    raise _Answer(503, {"error": "unavailable", "reason": "no_jwks"})
            try:
                return verify(token, key_set, self._policy)
            except UnknownKey:
                refreshed = await keys.after_unknown_kid()
                if refreshed is None or refreshed is key_set:
                    raise
                return verify(token, refreshed, self._policy)
        except InvalidToken as exc:
            raise _invalid_token(str(exc)) from None

    def _tenant(self, request: web.Request) -> str:
        if self._tenant_header is not None:
            tenant = request.headers.get(self._tenant_header)
            if tenant:
                if len(tenant) > MAX_ID_LENGTH:
                    message = f"{self._tenant_header} is longer than {MAX_ID_LENGTH} characters"
                    raise _Answer(403, {"error": "bad_request", "message": message})
                return tenant
        if self._default_tenant is None:
            header = self._tenant_header or "tenant"
            raise _unauthenticated(f"no {header} header and no default tenant")
        return self._default_tenant

    def _gate(self) -> tuple[Engine, str | None]:
        """The engine to ask (and the X-PDP-Stale value), or _Answer 503: fail closed."""
        replica = self._replica
        engine = replica.engine
        if engine is None:
            raise _Answer(503, {"error": "unavailable", "reason": "not_ready"})
        staleness = replica.staleness()
        if staleness <= self._max_staleness:
            return engine, None
        if self._serve_stale:
            return engine, f"{staleness:.3f}"
        raise _Answer(503, {"error": "unavailable", "reason": "stale"})

    # --- answers -----------------------------------------------------------------------

    def _allow(
        self, subject: str | None, stale: str | None, decision_id: str | None = None
    ) -> web.Response:
        headers = {DECISION_ID: decision_id or _new_decision_id()}
        if subject is not None and self._send_subject:
            headers[SUBJECT] = subject
        if stale is not None:
            headers[STALE] = stale
        return web.Response(status=200, headers=headers)

    def _denied(self, reason: str) -> web.Response:
        """The engine's deny: a 403 whose body is serialized once per reason."""
        cached = self._deny_bodies.get(reason)
        if cached is None:
            body = dumps({"error": "forbidden", "reason": reason})
            headers = {"Content-Type": _JSON}
            if self._nginx:
                headers[ERROR_BODY] = body.decode()
            cached = self._deny_bodies[reason] = (body, headers)
        return web.Response(status=403, body=cached[0], headers=cached[1])

    def _refusal(self, answer: _Answer) -> web.Response:
        body = dumps(answer.body)
        headers = {"Content-Type": _JSON}
        if answer.challenge is not None:
            headers["WWW-Authenticate"] = answer.challenge
        if self._nginx:
            headers[ERROR_BODY] = body.decode()
        return web.Response(status=answer.status, body=body, headers=headers)


def _decide(engine: Engine, asked: GatewayRequest, now: float) -> Decision:
    """The one call into the engine for forward-auth.

    The request's attributes (`asked.facts`) are built only if a conditional grant is a
    candidate: the engine calls it then, never on the unconditional path.
    """
    match = asked.match
    return engine.check(
        asked.tenant, asked.subject, match.resource_type, match.resource_id, asked.action, now,
        asked.facts,
    )  # fmt: skip


def _unauthenticated(message: str) -> _Answer:
    return _Answer(401, {"error": "unauthenticated", "message": message}, _NO_CREDENTIALS)


def _invalid_token(message: str) -> _Answer:
    return _Answer(401, {"error": "invalid_token", "message": message}, _INVALID_TOKEN)


def _bearer(header: str | None) -> str:
    if not header:
        raise _unauthenticated("no bearer token")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _invalid_token("the Authorization header is not a bearer token")
    return token


def selected_headers(headers: Mapping[str, str], names: tuple[str, ...]) -> dict[str, str]:
    """The headers named in `names` (lower-case) that `headers` holds."""
    return {name: headers[name] for name in names if name in headers}
