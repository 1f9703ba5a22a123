"""What every admin route shares: the app and request keys, JSON errors, the principal
and its tenant, bodies, ids, pages and the answer to a write (see `pdp.admin.app`)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from pdp.admin import tokens
from pdp.admin.kinds import MAX_ID, AdminError, Kind
from pdp.admin.store import AdminStore, Written, etag
from pdp.errors import RequestError

STORE = web.AppKey("admin_store", AdminStore)
PRINCIPAL = web.RequestKey("principal", tokens.Principal)
REQUEST_ID = web.RequestKey("request_id", str)
PREFIX = "/admin/v1"
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(
    status: int, error: str, message: str, field: str | None = None, **headers: str
) -> web.Response:
    body: dict[str, Any] = {"error": error, "message": message}
    if field is not None:
        body["field"] = field
    return web.json_response(body, status=status, headers=headers)


def principal(request: web.Request) -> tokens.Principal:
    return request[PRINCIPAL]


def tenant_of(request: web.Request) -> str:
    """The path's tenant, if this token may name it (else the 404 any unknown tenant gets)."""
    tenant = id_param("tenant", request.match_info["tenant"])
    bound = principal(request).tenant_id
    if bound is not None and tenant != bound:
        raise AdminError(404, "not_found", f"unknown tenant {tenant!r}")
    return tenant


def refuse_compressed(request: web.Request) -> None:
    """Refuse compressed bodies (415): the admin API inflates nothing."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise AdminError(
            415, "unsupported_media_type", f"Content-Encoding {encoding!r} is not accepted"
        )


async def json_body(request: web.Request) -> dict[str, Any]:
    refuse_compressed(request)
    if request.content_type != "application/json":
        raise AdminError(415, "unsupported_media_type", "send Content-Type: application/json")
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError("body must be a JSON object")
    return body


def written_response(written: Written, status: int = 200) -> web.Response:
    body: dict[str, Any] = {"revision": written.revision}
    headers = {"X-PDP-Revision": written.revision}
    if written.row is not None:
        body["data"] = written.row
        headers["ETag"] = etag(written.row)
    return web.json_response(body, status=status, headers=headers)


def page_limit(request: web.Request) -> int:
    raw = request.query.get("limit", str(DEFAULT_LIMIT))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise RequestError(f"limit must be an integer from 1 to {MAX_LIMIT}", "limit")
    return int(raw)


def item_key(kind: Kind, request: web.Request) -> dict[str, str]:
    key = {c: id_param(c, request.match_info[c]) for c in kind.path_key}
    defaults = dict(kind.query_defaults)
    for column in kind.query_key:
        key[column] = id_param(column, request.query.get(column, defaults.get(column)))
    return {c: key[c] for c in kind.key}


def id_param(name: str, value: str | None) -> str:
    """A path or query parameter naming an id: a malformed one is a 400 (bodies: 422)."""
    if value is None or not value or len(value) > MAX_ID or "\x00" in value:
        raise RequestError(
            f"{name} must be a non-empty string of at most {MAX_ID} characters", name
        )
    return value
