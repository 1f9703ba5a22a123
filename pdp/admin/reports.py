"""Admin routes that read or replace a tenant whole: policy as code, the audit trail
and the access review."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from pdp.admin import access_review, audit, policy, policy_store
from pdp.admin.http import (
    REQUEST_ID,
    STORE,
    id_param,
    page_limit,
    principal,
    refuse_compressed,
    tenant_of,
)
from pdp.admin.kinds import AdminError
from pdp.admin.policy import PolicyError
from pdp.errors import RequestError

# --- policy as code ------------------------------------------------------------------

_POLICY_TYPES = frozenset(
    {"application/yaml", "application/x-yaml", "text/yaml", "application/json"}
)


async def policy_put(request: web.Request) -> web.StreamResponse:
    tenant = tenant_of(request)
    if request.content_type not in _POLICY_TYPES:
        raise AdminError(
            415, "unsupported_media_type", "send the policy as application/yaml or JSON"
        )
    dry_run = request.query.get("dry_run", "false")
    if dry_run not in ("true", "false"):
        raise RequestError("dry_run must be true or false", "dry_run")
    try:
        refuse_compressed(request)
        text = (await request.read()).decode()
    except UnicodeDecodeError:
        raise RequestError("the policy is not UTF-8") from None
    store = request.app[STORE]
    try:
        async with store.transaction(principal(request), tenant) as conn:
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


async def policy_get(request: web.Request) -> web.StreamResponse:
    tenant = tenant_of(request)
    store = request.app[STORE]
    async with store.transaction(principal(request), tenant) as conn:
        if not await store.tenant_visible(conn, tenant):
            raise AdminError(404, "not_found", f"unknown tenant {tenant!r}")
        state = await policy_store.read_state(conn, tenant)
    return web.Response(text=policy.export(tenant, state), content_type="application/yaml")


# --- the audit trail -------------------------------------------------------------------


async def audit_route(request: web.Request) -> web.StreamResponse:
    """One keyset page of the tenant's change-log and archive rows, in id order."""
    who = principal(request)
    given = request.query.get("tenant")
    tenant = who.tenant_id
    if given is not None:
        given = id_param("tenant", given)
        if tenant is not None and given != tenant:
            raise AdminError(404, "not_found", f"unknown tenant {given!r}")
        tenant = given
    if tenant is None:
        raise RequestError("a platform token names the tenant: ?tenant=T", "tenant")
    limit = page_limit(request)
    found = audit.AuditFilter.from_query(request.query, tenant=tenant)
    store = request.app[STORE]
    # No existence check: a platform token may read a deleted tenant's history (a
    # tenant token cannot outlive its tenant). An unknown tenant has no rows.
    async with store.transaction(who, tenant) as conn:
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


async def access_review_route(request: web.Request) -> web.StreamResponse:
    """Every grant path of the tenant, streamed (json|jsonl|csv, rendered by PostgreSQL)."""
    tenant = tenant_of(request)
    at, since, form = _review_query(request)
    store = request.app[STORE]
    # One snapshot: a past state is rebuilt by several statements.
    async with store.transaction(principal(request), tenant, isolation="repeatable_read") as conn:
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
