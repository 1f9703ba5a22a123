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

import logging
import uuid
from datetime import UTC, datetime

from aiohttp import web
from aiohttp.typedefs import Handler

from pdp.admin import openapi, tokens
from pdp.admin.http import PREFIX, PRINCIPAL, REQUEST_ID, STORE, error
from pdp.admin.kinds import BY_NAME, KINDS, AdminError
from pdp.admin.records import (
    bulk,
    kind_routes,
    tenant_create,
    tenant_delete,
    tenant_get,
    tenants_list,
)
from pdp.admin.reports import access_review_route, audit_route, policy_get, policy_put
from pdp.admin.store import AdminStore
from pdp.errors import RequestError, RequestReadTimeout

log = logging.getLogger(__name__)

_WRITE_METHODS = frozenset({"POST", "PATCH", "PUT", "DELETE"})


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request.headers.get("X-Request-ID") or uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    try:
        response = await _authenticated(request, handler)
    except AdminError as exc:
        response = error(exc.status, exc.error, exc.message, exc.field)
    except RequestReadTimeout as exc:  # the HTTP edge gave up on a slow body: close
        response = error(exc.status, exc.error, exc.message)
        response.force_close()
    except RequestError as exc:
        response = error(400, "bad_request", exc.message, exc.field)
    except ConnectionError:  # the client went away mid-request: not our error
        response = error(499, "client_closed_request", "the client went away")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        names = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
        response = error(exc.status, names.get(exc.status, "bad_request"), exc.reason, **headers)
    except Exception:
        log.exception("admin request %s %s failed", request.method, request.rel_url.path)
        response = error(500, "internal", "internal error (logged)")
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
        return error(403, "forbidden", f"this token lacks the {needed!r} scope")
    request[PRINCIPAL] = verdict
    return await handler(request)


def _unauthorized(message: str) -> web.Response:
    return error(
        401, "unauthorized", message, **{"WWW-Authenticate": 'Bearer error="invalid_token"'}
    )


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
    app.router.add_get(tenants, tenants_list)
    app.router.add_post(tenants, tenant_create)
    app.router.add_get(tenants + "/{tenant}", tenant_get)
    app.router.add_delete(tenants + "/{tenant}", tenant_delete)
    app.router.add_get(f"{PREFIX}/openapi.yaml", _openapi)
    app.router.add_get(f"{PREFIX}/audit", audit_route)
    app.router.add_post(tenants + "/{tenant}/bulk", bulk)
    app.router.add_put(tenants + "/{tenant}/policy", policy_put)
    app.router.add_get(tenants + "/{tenant}/policy", policy_get)
    app.router.add_get(tenants + "/{tenant}/access-review", access_review_route)
    for kind in KINDS:
        handlers = kind_routes(kind)
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
