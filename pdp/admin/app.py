"""The admin API (aiohttp): tenants and everything in them, under /admin/v1/.

Every request presents `Authorization: Bearer pdpa_...`; the token is looked up on
every request (no cache: a revoked token fails on its next request) and verified in
constant time. GET needs the `read` scope, writes `write`, creating or deleting a
tenant `admin` on a platform token. A tenant token names its own tenant only: any
other tenant, existing or not, is the same 404, so existence never leaks.

Answers: 200/201 `{"data": ...}` (lists add `"next"`, a page token or null); writes add
`"revision"` (also `X-PDP-Revision`), the transaction id to pass as
`X-PDP-Min-Revision` to a sidecar. Single objects carry an `ETag`; `If-Match` on
PATCH/DELETE makes a stale write a 412. Errors are JSON `{"error", "message", "field"}`:
400 bad request, 401, 403 scope, 404, 405, 409 duplicate, 412, 413, 415, 422 a value
the data model refuses (unknown role, cycle with its path, bad scope or permission).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiohttp import web
from aiohttp.typedefs import Handler

from pdp.admin import access_review, audit, openapi, policy, policy_store, tokens
from pdp.admin.kinds import BY_NAME, KINDS, MAX_ID, AdminError, Kind, check_fields, check_id
from pdp.admin.policy import PolicyError
from pdp.admin.store import (
    AdminStore,
    Written,
    database_error,
    etag,
    not_found,
    parse_page_token,
)
from pdp.errors import RequestError, RequestReadTimeout

log = logging.getLogger(__name__)

STORE = web.AppKey("admin_store", AdminStore)
PRINCIPAL = web.RequestKey("principal", tokens.Principal)
REQUEST_ID = web.RequestKey("request_id", str)
PREFIX = "/admin/v1"
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
Route = Callable[[web.Request], Awaitable[web.StreamResponse]]
_WRITE_METHODS = frozenset({"POST", "PATCH", "PUT", "DELETE"})


def _error(
    status: int, error: str, message: str, field: str | None = None, **headers: str
) -> web.Response:
    body: dict[str, Any] = {"error": error, "message": message}
    if field is not None:
        body["field"] = field
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request.headers.get("X-Request-ID") or uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    try:
        response = await _authenticated(request, handler)
    except AdminError as exc:
        response = _error(exc.status, exc.error, exc.message, exc.field)
    except RequestReadTimeout as exc:  # the HTTP edge gave up on a slow body: close
        response = _error(exc.status, exc.error, exc.message)
        response.force_close()
    except RequestError as exc:
        response = _error(400, "bad_request", exc.message, exc.field)
    except ConnectionError:  # the client went away mid-request: not our error
        response = _error(499, "client_closed_request", "the client went away")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        names = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
        response = _error(exc.status, names.get(exc.status, "bad_request"), exc.reason, **headers)
    except Exception:
        log.exception("admin request %s %s failed", request.method, request.rel_url.path)
        response = _error(500, "internal", "internal error (logged)")
    if not response.prepared:  # a streamed answer sent its headers itself
        response.headers["X-Request-ID"] = request_id
    return response


async def _authenticated(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.rel_url.path == f"{PREFIX}/openapi.yaml":
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, text = header.partition(" ")
    parts = tokens.split(text.strip()) if scheme.lower() == "bearer" else None
    if parts is None:
        return _unauthorized("missing or malformed bearer token")
    token_id, secret = parts
    verdict = tokens.verify(
        await request.app[STORE].lookup_token(token_id), secret, datetime.now(UTC)
    )
    if isinstance(verdict, str):
        return _unauthorized({"unknown_token": "unknown token", "revoked": "token revoked",
                              "expired": "token expired"}[verdict])  # fmt: skip
    needed = "write" if request.method in _WRITE_METHODS else "read"
    if not verdict.may(needed):
        return _error(403, "forbidden", f"this token lacks the {needed!r} scope")
    request[PRINCIPAL] = verdict
    return await handler(request)


def _unauthorized(message: str) -> web.Response:
    return _error(
        401, "unauthorized", message, **{"WWW-Authenticate": 'Bearer error="invalid_token"'}
    )


def _principal(request: web.Request) -> tokens.Principal:
    return request[PRINCIPAL]


def _tenant(request: web.Request) -> str:
    """The path's tenant, if this token may name it (else the 404 any unknown tenant gets)."""
    tenant = _param("tenant", request.match_info["tenant"])
    bound = _principal(request).tenant_id
    if bound is not None and tenant != bound:
        raise AdminError(404, "not_found", f"unknown tenant {tenant!r}")
    return tenant


def _plain(request: web.Request) -> None:
    """Refuse compressed bodies (415): the admin API inflates nothing."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise AdminError(
            415, "unsupported_media_type", f"Content-Encoding {encoding!r} is not accepted"
        )


async def _body(request: web.Request) -> dict[str, Any]:
    _plain(request)
    if request.content_type != "application/json":
        raise AdminError(415, "unsupported_media_type", "send Content-Type: application/json")
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError("body must be a JSON object")
    return body


def _written(written: Written, status: int = 200) -> web.Response:
    body: dict[str, Any] = {"revision": written.revision}
    headers = {"X-PDP-Revision": written.revision}
    if written.row is not None:
        body["data"] = written.row
        headers["ETag"] = etag(written.row)
    return web.json_response(body, status=status, headers=headers)


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", str(DEFAULT_LIMIT))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise RequestError(f"limit must be an integer from 1 to {MAX_LIMIT}", "limit")
    return int(raw)


# --- one kind's handlers -----------------------------------------------------------------


def _item_key(kind: Kind, request: web.Request) -> dict[str, str]:
    key = {c: _param(c, request.match_info[c]) for c in kind.path_key}
    defaults = dict(kind.query_defaults)
    for column in kind.query_key:
        key[column] = _param(column, request.query.get(column, defaults.get(column)))
    return {c: key[c] for c in kind.key}


def _param(name: str, value: str | None) -> str:
    """A path or query parameter naming an id: a malformed one is a 400 (bodies: 422)."""
    if value is None or not value or len(value) > MAX_ID or "\x00" in value:
        raise RequestError(
            f"{name} must be a non-empty string of at most {MAX_ID} characters", name
        )
    return value


def _handlers(kind: Kind) -> dict[str, Route]:  # noqa: PLR0915  (five small closures)
    async def list_(request: web.Request) -> web.StreamResponse:
        tenant = _tenant(request)
        filters = {c: _param(c, request.match_info[c]) for c in kind.parent_key}
        allowed = set(kind.key) | {f.name for f in kind.fields if f.type in ("text", "status")}
        for name, value in request.query.items():
            if name in ("limit", "after"):
                continue
            if name not in allowed:
                raise RequestError(
                    f"unknown filter {name!r} (filters: {', '.join(sorted(allowed))})", name
                )
            filters[name] = _param(name, value)
        after = request.query.get("after")
        key = None if after is None else parse_page_token(after, len(kind.key))
        store = request.app[STORE]
        async with store.transaction(_principal(request), tenant) as conn:
            if not await store.tenant_visible(conn, tenant):
                raise AdminError(404, "not_found", f"unknown tenant {tenant!r}")
            rows, following = await store.rows(
                conn, kind, tenant, filters=filters, after=key, limit=_limit(request)
            )
        return web.json_response({"data": rows, "next": following})

    async def create(request: web.Request) -> web.StreamResponse:
        tenant = _tenant(request)
        body = await _body(request)
        key = {c: _param(c, request.match_info[c]) for c in kind.parent_key}
        defaults = dict(kind.query_defaults)
        for column in kind.key:
            if column in key:
                if column in body and body[column] != key[column]:
                    raise AdminError(422, "unprocessable", f"{column} is given by the path", column)
                continue
            key[column] = check_id(column, body.get(column, defaults.get(column)))
        fields = check_fields(kind, body, partial=False)
        store = request.app[STORE]
        async with store.transaction(_principal(request), tenant) as conn:
            if not await store.tenant_visible(conn, tenant):
                raise AdminError(404, "not_found", f"unknown tenant {tenant!r}")
            written = await store.create(conn, kind, tenant, {c: key[c] for c in kind.key}, fields)
        return _written(written, 201)

    async def get(request: web.Request) -> web.StreamResponse:
        tenant = _tenant(request)
        key = _item_key(kind, request)
        store = request.app[STORE]
        async with store.transaction(_principal(request), tenant) as conn:
            row = await store.get(conn, kind, tenant, key)
        if row is None:
            raise not_found(kind, key)
        return web.json_response({"data": row}, headers={"ETag": etag(row)})

    async def patch(request: web.Request) -> web.StreamResponse:
        tenant = _tenant(request)
        key = _item_key(kind, request)
        body = await _body(request)
        for column in set(kind.key) & set(body):
            if body[column] != key[column]:
                raise AdminError(
                    422, "unprocessable", f"{column} is part of the key and cannot change", column
                )
        fields = check_fields(
            kind, {k: v for k, v in body.items() if k not in kind.key}, partial=True
        )
        store = request.app[STORE]
        async with store.transaction(_principal(request), tenant) as conn:
            written = await store.update(
                conn, kind, tenant, key, fields, if_match=request.headers.get("If-Match")
            )
        return _written(written)

    async def delete(request: web.Request) -> web.StreamResponse:
        tenant = _tenant(request)
        key = _item_key(kind, request)
        store = request.app[STORE]
        async with store.transaction(_principal(request), tenant) as conn:
            written = await store.delete(
                conn, kind, tenant, key, if_match=request.headers.get("If-Match")
            )
        return _written(written)

    handlers: dict[str, Route] = {"list": list_, "create": create, "get": get, "delete": delete}
    if kind.fields:
        handlers["patch"] = patch
    return handlers


# --- bulk: many operations, one transaction -------------------------------------------

MAX_OPERATIONS = 1000


def _operation(raw: object, index: int) -> tuple[str, Kind, dict[str, str], dict[str, Any], Any]:
    where = f"operations[{index}]"
    if not isinstance(raw, dict):
        raise RequestError(f"{where} must be an object", where)
    op, kind_name = raw.get("op"), raw.get("kind")
    if op not in ("create", "update", "delete"):
        raise RequestError(f"{where}.op must be 'create', 'update' or 'delete'", f"{where}.op")
    kind = BY_NAME.get(kind_name) if isinstance(kind_name, str) else None
    if kind is None:
        raise RequestError(f"{where}.kind must be one of {', '.join(BY_NAME)}", f"{where}.kind")
    given = raw.get("key", {})
    if not isinstance(given, dict):
        raise RequestError(f"{where}.key must be an object", f"{where}.key")
    defaults = dict(kind.query_defaults)
    key = {c: check_id(c, given.get(c, defaults.get(c))) for c in kind.key}
    fields = raw.get("fields", {})
    if not isinstance(fields, dict):
        raise RequestError(f"{where}.fields must be an object", f"{where}.fields")
    checked = {} if op == "delete" else check_fields(kind, fields, partial=op == "update")
    return op, kind, key, checked, raw.get("if_match")


async def _bulk(request: web.Request) -> web.StreamResponse:
    tenant = _tenant(request)
    body = await _body(request)
    raw = body.get("operations")
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_OPERATIONS:
        raise RequestError(f"operations must be a list of 1 to {MAX_OPERATIONS}", "operations")
    operations = []
    for index, item in enumerate(raw):
        try:
            operations.append(_operation(item, index))
        except RequestError as exc:
            raise _at(exc, index) from None
    store = request.app[STORE]
    results = []
    async with store.transaction(_principal(request), tenant) as conn:
        if not await store.tenant_visible(conn, tenant):
            raise AdminError(404, "not_found", f"unknown tenant {tenant!r}")
        written = None
        for index, (op, kind, key, fields, if_match) in enumerate(operations):
            try:
                async with conn.transaction():  # a savepoint: the error names its operation
                    if op == "create":
                        written = await store.create(conn, kind, tenant, key, fields)
                    elif op == "update":
                        written = await store.update(
                            conn, kind, tenant, key, fields, if_match=if_match
                        )
                    else:
                        written = await store.delete(conn, kind, tenant, key, if_match=if_match)
            except asyncpg.PostgresError as exc:
                raise _at(database_error(exc), index) from None
            except RequestError as exc:
                raise _at(exc, index) from None
            results.append({"op": op, "kind": kind.name, "data": written.row})
        assert written is not None
    headers = {"X-PDP-Revision": written.revision}
    return web.json_response({"revision": written.revision, "results": results}, headers=headers)


def _at(exc: Exception, index: int) -> Exception:
    """The error of operation `index`, saying so; nothing of the bulk was written."""
    if not isinstance(exc, RequestError):
        return exc
    where = f"operations[{index}]"
    field = exc.field if exc.field and exc.field.startswith(where) else (
        f"{where}.{exc.field}" if exc.field else where
    )  # fmt: skip
    message = exc.message if exc.message.startswith(where) else f"{where}: {exc.message}"
    if isinstance(exc, AdminError):
        return AdminError(exc.status, exc.error, message, field)
    return RequestError(message, field)


# --- policy as code ------------------------------------------------------------------

_POLICY_TYPES = frozenset(
    {"application/yaml", "application/x-yaml", "text/yaml", "application/json"}
)


async def _policy_put(request: web.Request) -> web.StreamResponse:
    tenant = _tenant(request)
    if request.content_type not in _POLICY_TYPES:
        raise AdminError(
            415, "unsupported_media_type", "send the policy as application/yaml or JSON"
        )
    dry_run = request.query.get("dry_run", "false")
    if dry_run not in ("true", "false"):
        raise RequestError("dry_run must be true or false", "dry_run")
    try:
        _plain(request)
        text = (await request.read()).decode()
    except UnicodeDecodeError:
        raise RequestError("the policy is not UTF-8") from None
    store = request.app[STORE]
    try:
        async with store.transaction(_principal(request), tenant) as conn:
            outcome = await policy_store.plan_or_apply(
                conn, text, "policy", tenant=tenant, write=dry_run == "false"
            )
    except policy_store.UnknownTenant:
        raise AdminError(404, "not_found", f"unknown tenant {tenant!r}") from None
    except PolicyError as exc:
        raise AdminError(422, "unprocessable", str(exc)) from None
    body = outcome.to_json()
    headers = {} if outcome.revision is None else {"X-PDP-Revision": outcome.revision}
    return web.json_response(body, headers=headers)


async def _policy_get(request: web.Request) -> web.StreamResponse:
    tenant = _tenant(request)
    store = request.app[STORE]
    async with store.transaction(_principal(request), tenant) as conn:
        if not await store.tenant_visible(conn, tenant):
            raise AdminError(404, "not_found", f"unknown tenant {tenant!r}")
        state = await policy_store.read_state(conn, tenant)
    return web.Response(text=policy.export(tenant, state), content_type="application/yaml")


# --- the audit trail -------------------------------------------------------------------


async def _audit(request: web.Request) -> web.StreamResponse:
    """One keyset page of the tenant's change-log and archive rows, in id order."""
    principal = _principal(request)
    given = request.query.get("tenant")
    tenant = principal.tenant_id
    if given is not None:
        given = _param("tenant", given)
        if tenant is not None and given != tenant:
            raise AdminError(404, "not_found", f"unknown tenant {given!r}")
        tenant = given
    if tenant is None:
        raise RequestError("a platform token names the tenant: ?tenant=T", "tenant")
    limit = _limit(request)
    found = audit.AuditFilter.from_query(request.query, tenant=tenant)
    store = request.app[STORE]
    # No existence check: a platform token may read a deleted tenant's history (a
    # tenant token cannot outlive its tenant). An unknown tenant has no rows.
    async with store.transaction(principal, tenant) as conn:
        records, following = await audit.page(conn, found, limit)
    return web.json_response(
        {"data": records, "next": None if following is None else str(following)}
    )


# --- access review ------------------------------------------------------------------------

_REVIEW_TYPES = {"json": "application/json", "jsonl": "application/x-ndjson", "csv": "text/csv"}


def _review_query(request: web.Request) -> tuple[Any, Any, str]:
    for name in request.query:
        if name not in ("at", "since", "format"):
            raise RequestError(f"unknown parameter {name!r} (at, since, format)", name)
    at, since = (
        None if (text := request.query.get(n)) is None else audit.parse_time(n, text)
        for n in ("at", "since")
    )
    form = request.query.get("format", "json")
    if form not in _REVIEW_TYPES:
        raise RequestError("format must be json, jsonl or csv", "format")
    return at, since, form


async def _access_review(request: web.Request) -> web.StreamResponse:
    """Every grant path of the tenant, streamed (json|jsonl|csv, rendered by PostgreSQL)."""
    tenant = _tenant(request)
    at, since, form = _review_query(request)
    store = request.app[STORE]
    # One snapshot: a past state is rebuilt by several statements.
    async with store.transaction(_principal(request), tenant, isolation="repeatable_read") as conn:
        if not await store.tenant_visible(conn, tenant):
            raise AdminError(404, "not_found", f"unknown tenant {tenant!r}")
        moment = at if at is not None else await conn.fetchval("SELECT now()")
        # A history too short is a 400 here, before any byte is sent.
        query = await access_review.prepare(conn, tenant, moment, past=at is not None, since=since)
        response = web.StreamResponse(
            headers={"Content-Type": _REVIEW_TYPES[form], "X-Request-ID": request[REQUEST_ID]}
        )
        await response.prepare(request)
        await access_review.export(conn, query, form, response.write)
    await response.write_eof()
    return response


# --- tenants -------------------------------------------------------------------------------


def _platform(request: web.Request, scope: str) -> tokens.Principal:
    principal = _principal(request)
    if principal.tenant_id is not None or not principal.may(scope):
        raise AdminError(
            403, "forbidden", f"managing tenants needs a platform token with the {scope!r} scope"
        )
    return principal


async def _tenants_list(request: web.Request) -> web.StreamResponse:
    principal = _principal(request)
    store = request.app[STORE]
    async with store.transaction(principal, principal.tenant_id, platform=True) as conn:
        rows = await conn.fetch("SELECT id, name, created_at FROM pdp.tenants ORDER BY id")
    return web.json_response({"data": [_tenant_json(r) for r in rows], "next": None})


async def _tenant_get(request: web.Request) -> web.StreamResponse:
    tenant = _tenant(request)
    principal = _principal(request)
    store = request.app[STORE]
    async with store.transaction(principal, principal.tenant_id) as conn:
        row = await conn.fetchrow(
            "SELECT id, name, created_at FROM pdp.tenants WHERE id = $1", tenant
        )
    if row is None:
        raise AdminError(404, "not_found", f"unknown tenant {tenant!r}")
    data = _tenant_json(row)
    return web.json_response({"data": data}, headers={"ETag": etag(data)})


async def _tenant_create(request: web.Request) -> web.StreamResponse:
    principal = _platform(request, "admin")
    body = await _body(request)
    unknown = sorted(set(body) - {"id", "name"})
    if unknown:
        raise AdminError(
            422, "unprocessable", f"unknown field {unknown[0]!r} (writable: id, name)", unknown[0]
        )
    tenant = check_id("id", body.get("id"))
    name = body.get("name", "")
    if not isinstance(name, str):
        raise AdminError(422, "unprocessable", "name must be a string", "name")
    store = request.app[STORE]
    async with store.transaction(principal, tenant, platform=True) as conn:
        row = await conn.fetchrow(
            "INSERT INTO pdp.tenants (id, name) VALUES ($1, $2) RETURNING id, name, created_at",
            tenant,
            name,
        )
        revision = str(await conn.fetchval("SELECT pg_current_xact_id()::text"))
    return _written(Written(_tenant_json(row), revision), 201)


async def _tenant_delete(request: web.Request) -> web.StreamResponse:
    principal = _platform(request, "admin")
    tenant = request.match_info["tenant"]
    store = request.app[STORE]
    async with store.transaction(principal, tenant, platform=True) as conn:
        gone = await conn.fetchval("DELETE FROM pdp.tenants WHERE id = $1 RETURNING id", tenant)
        revision = str(await conn.fetchval("SELECT pg_current_xact_id()::text"))
    if gone is None:
        raise AdminError(404, "not_found", f"unknown tenant {tenant!r}")
    return _written(Written(None, revision))


def _tenant_json(row: Any) -> dict[str, Any]:
    return {"id": row["id"], "name": row["name"], "created_at": row["created_at"].isoformat()}


async def _openapi(request: web.Request) -> web.StreamResponse:
    return web.Response(text=openapi.document_yaml(), content_type="application/yaml")


def build_admin_app(store: AdminStore, *, max_body_bytes: int = 1024 * 1024) -> web.Application:
    # No automatic decompression: a small gzip body can inflate to gigabytes on the loop.
    app = web.Application(
        middlewares=[_guard],
        client_max_size=max_body_bytes,
        handler_args={"auto_decompress": False},
    )
    app[STORE] = store
    tenants = f"{PREFIX}/tenants"
    app.router.add_get(tenants, _tenants_list)
    app.router.add_post(tenants, _tenant_create)
    app.router.add_get(tenants + "/{tenant}", _tenant_get)
    app.router.add_delete(tenants + "/{tenant}", _tenant_delete)
    app.router.add_get(f"{PREFIX}/openapi.yaml", _openapi)
    app.router.add_get(f"{PREFIX}/audit", _audit)
    app.router.add_post(tenants + "/{tenant}/bulk", _bulk)
    app.router.add_put(tenants + "/{tenant}/policy", _policy_put)
    app.router.add_get(tenants + "/{tenant}/policy", _policy_get)
    app.router.add_get(tenants + "/{tenant}/access-review", _access_review)
    for kind in KINDS:
        handlers = _handlers(kind)
        base = tenants + "/{tenant}"
        app.router.add_get(base + kind.collection, handlers["list"])
        app.router.add_post(base + kind.collection, handlers["create"])
        item = base + kind.item
        app.router.add_get(item, handlers["get"])
        app.router.add_delete(item, handlers["delete"])
        if "patch" in handlers:
            app.router.add_patch(item, handlers["patch"])
    assert set(BY_NAME) == {k.name for k in KINDS}
    return app
