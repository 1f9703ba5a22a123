"""Admin routes that write records: one kind's list/create/get/patch/delete, bulk
(many operations in one transaction) and tenants."""

from __future__ import annotations

from typing import Any

import asyncpg
from aiohttp import web

from pdp.admin import tokens
from pdp.admin.http import (
    STORE,
    Route,
    id_param,
    item_key,
    json_body,
    page_limit,
    principal,
    tenant_of,
    written_response,
)
from pdp.admin.kinds import BY_NAME, AdminError, Kind, check_fields, check_id
from pdp.admin.store import Written, database_error, etag, not_found, parse_page_token
from pdp.errors import RequestError


def kind_routes(kind: Kind) -> dict[str, Route]:  # noqa: PLR0915  (five small closures)
    async def list_(request: web.Request) -> web.StreamResponse:
        tenant = tenant_of(request)
        filters = {c: id_param(c, request.match_info[c]) for c in kind.parent_key}
        allowed = set(kind.key) | {f.name for f in kind.fields if f.type in ("text", "status")}
        for name, value in request.query.items():
            if name in ("limit", "after"):
                continue
            if name not in allowed:
                raise RequestError(
                    f"unknown filter {name!r} (filters: {', '.join(sorted(allowed))})", name
                )
            filters[name] = id_param(name, value)
        after = request.query.get("after")
        key = None if after is None else parse_page_token(after, len(kind.key))
        store = request.app[STORE]
        async with store.transaction(principal(request), tenant) as conn:
            if not await store.tenant_visible(conn, tenant):
                raise AdminError(404, "not_found", f"unknown tenant {tenant!r}")
            rows, following = await store.rows(
                conn, kind, tenant, filters=filters, after=key, limit=page_limit(request)
            )
        return web.json_response({"data": rows, "next": following})

    async def create(request: web.Request) -> web.StreamResponse:
        tenant = tenant_of(request)
        body = await json_body(request)
        key = {c: id_param(c, request.match_info[c]) for c in kind.parent_key}
        defaults = dict(kind.query_defaults)
        for column in kind.key:
            if column in key:
                if column in body and body[column] != key[column]:
                    raise AdminError(422, "unprocessable", f"{column} is given by the path", column)
                continue
            key[column] = check_id(column, body.get(column, defaults.get(column)))
        fields = check_fields(kind, body, partial=False)
        store = request.app[STORE]
        async with store.transaction(principal(request), tenant) as conn:
            if not await store.tenant_visible(conn, tenant):
                raise AdminError(404, "not_found", f"unknown tenant {tenant!r}")
            written = await store.create(conn, kind, tenant, {c: key[c] for c in kind.key}, fields)
        return written_response(written, 201)

    async def get(request: web.Request) -> web.StreamResponse:
        tenant = tenant_of(request)
        key = item_key(kind, request)
        store = request.app[STORE]
        async with store.transaction(principal(request), tenant) as conn:
            row = await store.get(conn, kind, tenant, key)
        if row is None:
            raise not_found(kind, key)
        return web.json_response({"data": row}, headers={"ETag": etag(row)})

    async def patch(request: web.Request) -> web.StreamResponse:
        tenant = tenant_of(request)
        key = item_key(kind, request)
        body = await json_body(request)
        for column in set(kind.key) & set(body):
            if body[column] != key[column]:
                raise AdminError(
                    422, "unprocessable", f"{column} is part of the key and cannot change", column
                )
        fields = check_fields(
            kind, {k: v for k, v in body.items() if k not in kind.key}, partial=True
        )
        store = request.app[STORE]
        async with store.transaction(principal(request), tenant) as conn:
            written = await store.update(
                conn, kind, tenant, key, fields, if_match=request.headers.get("If-Match")
            )
        return written_response(written)

    async def delete(request: web.Request) -> web.StreamResponse:
        tenant = tenant_of(request)
        key = item_key(kind, request)
        store = request.app[STORE]
        async with store.transaction(principal(request), tenant) as conn:
            written = await store.delete(
                conn, kind, tenant, key, if_match=request.headers.get("If-Match")
            )
        return written_response(written)

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


async def bulk(request: web.Request) -> web.StreamResponse:
    tenant = tenant_of(request)
    body = await json_body(request)
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
    async with store.transaction(principal(request), tenant) as conn:
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


# --- tenants -------------------------------------------------------------------------------


def _platform(request: web.Request, scope: str) -> tokens.Principal:
    who = principal(request)
    if who.tenant_id is not None or not who.may(scope):
        raise AdminError(
            403, "forbidden", f"managing tenants needs a platform token with the {scope!r} scope"
        )
    return who


async def tenants_list(request: web.Request) -> web.StreamResponse:
    who = principal(request)
    store = request.app[STORE]
    async with store.transaction(who, who.tenant_id, platform=True) as conn:
        rows = await conn.fetch("SELECT id, name, created_at FROM pdp.tenants ORDER BY id")
    return web.json_response({"data": [_tenant_json(r) for r in rows], "next": None})


async def tenant_get(request: web.Request) -> web.StreamResponse:
    tenant = tenant_of(request)
    who = principal(request)
    store = request.app[STORE]
    async with store.transaction(who, who.tenant_id) as conn:
        row = await conn.fetchrow(
            "SELECT id, name, created_at FROM pdp.tenants WHERE id = $1", tenant
        )
    if row is None:
        raise AdminError(404, "not_found", f"unknown tenant {tenant!r}")
    data = _tenant_json(row)
    return web.json_response({"data": data}, headers={"ETag": etag(data)})


async def tenant_create(request: web.Request) -> web.StreamResponse:
    principal = _platform(request, "admin")
    body = await json_body(request)
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
    return written_response(Written(_tenant_json(row), revision), 201)


async def tenant_delete(request: web.Request) -> web.StreamResponse:
    principal = _platform(request, "admin")
    tenant = request.match_info["tenant"]
    store = request.app[STORE]
    async with store.transaction(principal, tenant, platform=True) as conn:
        gone = await conn.fetchval("DELETE FROM pdp.tenants WHERE id = $1 RETURNING id", tenant)
        revision = str(await conn.fetchval("SELECT pg_current_xact_id()::text"))
    if gone is None:
        raise AdminError(404, "not_found", f"unknown tenant {tenant!r}")
    return written_response(Written(None, revision))


def _tenant_json(row: Any) -> dict[str, Any]:
    return {"id": row["id"], "name": row["name"], "created_at": row["created_at"].isoformat()}
