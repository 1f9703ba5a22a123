"""AuthZEN 1.0 request parsing and response shaping: pure, no I/O, no aiohttp.

Every parse function takes the decoded JSON body and either returns a value object
or raises `RequestError(message, field)` where `field` is the dotted JSON path of the
offending member (`subject.properties.tenant`, `evaluations[2].resource.id`,
`page.token`). Unknown members are ignored, as the spec requires. The web layer
(`pdp.web_authzen`) maps the error to 400 and never sees a malformed value.

Batch entries are validated after the top-level defaults are applied: an entry that
is then incomplete is a per-entry error (that entry is denied, the request is 200);
anything wrong with the payload as a whole is a 400.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pdp.errors import RequestError

try:
    import orjson
except ImportError:  # pragma: no cover - the plain path; orjson is an optional extra
    orjson = None  # type: ignore[assignment]

# Same bound as the database's CHECK constraints (pdp.schema.MAX_ID_LENGTH), restated
# here so the web layer does not import SQLAlchemy.
MAX_ID_LENGTH = 256
DEFAULT_PAGE_LIMIT = 100
MAX_PAGE_LIMIT = 1000
SUBJECT_TYPE = "user"
SEMANTICS = ("execute_all", "deny_on_first_deny", "permit_on_first_permit")
ENTITIES = ("subject", "action", "resource")

JsonObject = dict[str, Any]


class Fallback(Protocol):
    """A fully consistent check answered by PostgreSQL (`pdp.check`); provided by `sync`."""

    async def __call__(self, tenant: str, user: str, rtype: str, rid: str, action: str) -> bool: ...


# --- JSON --------------------------------------------------------------------------

if orjson is not None:
    _loads: Callable[[bytes], Any] = orjson.loads
    dumps: Callable[[Any], bytes] = orjson.dumps
    _DECODE_ERRORS: tuple[type[Exception], ...] = (orjson.JSONDecodeError,)
else:  # pragma: no cover

    def _loads(raw: bytes) -> Any:
        return json.loads(raw)

    def dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    # Deep nesting makes the stdlib decoder recurse.
    _DECODE_ERRORS = (ValueError, RecursionError)


def loads(raw: bytes) -> JsonObject:
    """The request body as a JSON object; RequestError for empty, malformed or non-object."""
    if not raw:
        raise RequestError("the request body is empty; send a JSON object")
    try:
        body = _loads(raw)
    except _DECODE_ERRORS as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None
    if type(body) is not dict:
        raise RequestError(f"the request body must be a JSON object, not {_kind(body)}")
    return body


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# --- field validation ----------------------------------------------------------------


def _object(parent: Mapping[str, Any], key: str, path: str) -> JsonObject:
    value = parent.get(key)
    if type(value) is dict:
        return value
    if value is None and key not in parent:
        raise RequestError(f"{path} is required", path)
    raise RequestError(f"{path} must be an object, not {_kind(value)}", path)


def _optional_object(parent: Mapping[str, Any], key: str, path: str) -> JsonObject | None:
    if key not in parent:
        return None
    value = parent[key]
    if type(value) is not dict:
        raise RequestError(f"{path} must be an object, not {_kind(value)}", path)
    return value


def _string(obj: Mapping[str, Any], key: str, path: str) -> str:
    value = obj.get(key)
    if type(value) is str and 0 < len(value) <= MAX_ID_LENGTH:
        return value
    if value is None and key not in obj:
        raise RequestError(f"{path} is required", path)
    if type(value) is not str:
        raise RequestError(f"{path} must be a string, not {_kind(value)}", path)
    raise RequestError(f"{path} must be 1 to {MAX_ID_LENGTH} characters long", path)


def _tenant(subject: JsonObject, path: str, default: str | None) -> str:
    props = subject.get("properties")
    if props is not None or "properties" in subject:
        if type(props) is not dict:
            raise RequestError(
                f"{path}.properties must be an object, not {_kind(props)}", f"{path}.properties"
            )
        if "tenant" in props:
            return _string(props, "tenant", f"{path}.properties.tenant")
    if default is None:
        field = f"{path}.properties.tenant"
        raise RequestError(f"{field} is required (no default tenant is configured)", field)
    return default


def _check_properties(obj: JsonObject, path: str) -> None:
    if "properties" in obj and type(obj["properties"]) is not dict:
        raise RequestError(
            f"{path}.properties must be an object, not {_kind(obj['properties'])}",
            f"{path}.properties",
        )


# --- evaluation ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    """One access question, validated. `subject_type` other than `user` is answered deny."""

    tenant: str
    subject_type: str
    user: str
    resource_type: str
    resource_id: str
    action: str


def _id(value: object) -> bool:
    return type(value) is str and 0 < len(value) <= MAX_ID_LENGTH


def _fast_query(
    subject: JsonObject, action: JsonObject, resource: JsonObject, default_tenant: str | None
) -> Query | None:
    """The Query of a well-formed request, or None to let `_query` find and name the fault.

    The hot path: plain type checks, no error paths built (they cost f-strings).
    """
    stype, user = subject.get("type"), subject.get("id")
    name = action.get("name")
    rtype, rid = resource.get("type"), resource.get("id")
    # _id() inlined: this runs once per decision of every batch.
    m = MAX_ID_LENGTH
    if not (
        type(stype) is str and 0 < len(stype) <= m
        and type(user) is str and 0 < len(user) <= m
        and type(name) is str and 0 < len(name) <= m
        and type(rtype) is str and 0 < len(rtype) <= m
        and type(rid) is str and 0 < len(rid) <= m
    ):  # fmt: skip
        return None
    tenant = default_tenant
    if "properties" in subject:
        props = subject["properties"]
        if type(props) is not dict:
            return None
        if "tenant" in props:
            tenant = props["tenant"]
            if not _id(tenant):
                return None
    if tenant is None:
        return None
    for obj in (action, resource):
        if "properties" in obj and type(obj["properties"]) is not dict:
            return None
    return Query(tenant, stype, user, rtype, rid, name)


def _query(
    subject: JsonObject,
    action: JsonObject,
    resource: JsonObject,
    default_tenant: str | None,
    prefix: str = "",
) -> Query:
    fast = _fast_query(subject, action, resource, default_tenant)
    if fast is not None:
        return fast
    sp, ap, rp = f"{prefix}subject", f"{prefix}action", f"{prefix}resource"
    stype = _string(subject, "type", f"{sp}.type")
    user = _string(subject, "id", f"{sp}.id")
    tenant = _tenant(subject, sp, default_tenant)
    name = _string(action, "name", f"{ap}.name")
    _check_properties(action, ap)
    rtype = _string(resource, "type", f"{rp}.type")
    rid = _string(resource, "id", f"{rp}.id")
    _check_properties(resource, rp)
    return Query(tenant, stype, user, rtype, rid, name)


def parse_evaluation(body: JsonObject, default_tenant: str | None) -> Query:
    """`POST /access/v1/evaluation`: subject, action and resource are required."""
    subject = _object(body, "subject", "subject")
    action = _object(body, "action", "action")
    resource = _object(body, "resource", "resource")
    _optional_object(body, "context", "context")
    return _query(subject, action, resource, default_tenant)


@dataclass(frozen=True, slots=True)
class Batch:
    """`POST /access/v1/evaluations` with entries: each a Query or its own error."""

    entries: tuple[Query | RequestError, ...]
    semantic: str


def parse_evaluations(
    body: JsonObject, default_tenant: str | None, max_batch: int
) -> Query | Batch:
    """A Batch, or a Query when `evaluations` is missing or empty (then it is one evaluation).

    A key in an entry replaces the top-level default of the same name as a whole.
    """
    evaluations = body.get("evaluations")
    if evaluations is None and "evaluations" not in body:
        evaluations = []
    if type(evaluations) is not list:
        raise RequestError(f"evaluations must be an array, not {_kind(evaluations)}", "evaluations")
    semantic = _semantic(body)
    if not evaluations:
        return parse_evaluation(body, default_tenant)
    if len(evaluations) > max_batch:
        raise RequestError(
            f"evaluations holds {len(evaluations)} entries; at most {max_batch} are allowed",
            "evaluations",
        )
    defaults = {key: _optional_object(body, key, key) for key in (*ENTITIES, "context")}
    d_subject, d_action, d_resource = (defaults[key] for key in ENTITIES)
    entries: list[Query | RequestError] = []
    for index, entry in enumerate(evaluations):
        if type(entry) is dict:  # fast path: a well-formed entry, nothing to name
            subject = entry.get("subject", d_subject)
            action = entry.get("action", d_action)
            resource = entry.get("resource", d_resource)
            if (
                type(subject) is dict
                and type(action) is dict
                and type(resource) is dict
                and ("context" not in entry or type(entry["context"]) is dict)
            ):
                query = _fast_query(subject, action, resource, default_tenant)
                if query is not None:
                    entries.append(query)
                    continue
        path = f"evaluations[{index}]"
        if type(entry) is not dict:
            raise RequestError(f"{path} must be an object, not {_kind(entry)}", path)
        merged = {}
        for key, default in defaults.items():
            value = _optional_object(entry, key, f"{path}.{key}")
            merged[key] = default if value is None else value
        entries.append(_entry(merged, default_tenant, path))
    return Batch(tuple(entries), semantic)


def _entry(
    merged: dict[str, JsonObject | None], default_tenant: str | None, path: str
) -> Query | RequestError:
    try:
        parts = []
        for key in ENTITIES:
            value = merged[key]
            if value is None:
                raise RequestError(f"{path}.{key} is required", f"{path}.{key}")
            parts.append(value)
        return _query(parts[0], parts[1], parts[2], default_tenant, f"{path}.")
    except RequestError as exc:
        return exc


def _semantic(body: JsonObject) -> str:
    options = _optional_object(body, "options", "options")
    if options is None or "evaluations_semantic" not in options:
        return SEMANTICS[0]
    semantic = options["evaluations_semantic"]
    if semantic not in SEMANTICS:
        field = "options.evaluations_semantic"
        raise RequestError(f"{field} must be one of {', '.join(SEMANTICS)}", field)
    return str(semantic)


def stops_after(semantic: str, allowed: bool) -> bool:
    """Whether a batch with this semantic ends (truncated) after an entry so decided."""
    if semantic == "deny_on_first_deny":
        return not allowed
    if semantic == "permit_on_first_permit":
        return allowed
    return False


def entry_error(exc: RequestError) -> JsonObject:
    """The decision object of a batch entry that could not be evaluated (fail closed)."""
    error: JsonObject = {"status": exc.status, "message": exc.message}
    if exc.field is not None:
        error["field"] = exc.field
    return {"decision": False, "context": {"reason": "bad_request", "error": error}}


def error_body(error: str, message: str, field: str | None = None) -> bytes:
    """The JSON body of every non-2xx answer: `{"error", "message", "field"?}`."""
    body = {"error": error, "message": message}
    if field is not None:
        body["field"] = field
    return dumps(body)


# --- search --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Page:
    """Where a search page starts and how long it is; `fingerprint` binds its token."""

    offset: int
    limit: int
    fingerprint: str


@dataclass(frozen=True, slots=True)
class SubjectSearch:
    tenant: str
    subject_type: str
    resource_type: str
    resource_id: str
    action: str
    page: Page


@dataclass(frozen=True, slots=True)
class ResourceSearch:
    tenant: str
    subject_type: str
    user: str
    resource_type: str
    action: str
    page: Page


@dataclass(frozen=True, slots=True)
class ActionSearch:
    tenant: str
    subject_type: str
    user: str
    resource_type: str
    resource_id: str
    page: Page


def _subject_input(
    body: JsonObject, default_tenant: str | None, *, with_id: bool
) -> tuple[str, str, str]:
    """(type, id or "" when not an input, tenant) of a search request's subject."""
    subject = _object(body, "subject", "subject")
    stype = _string(subject, "type", "subject.type")
    user = _string(subject, "id", "subject.id") if with_id else ""
    return stype, user, _tenant(subject, "subject", default_tenant)


def _action_input(body: JsonObject) -> str:
    """The action name of a search request (an input of subject and resource search)."""
    action = _object(body, "action", "action")
    name = _string(action, "name", "action.name")
    _check_properties(action, "action")
    return name


def _resource_input(body: JsonObject, *, with_id: bool) -> tuple[str, str]:
    """(type, id or "" when not an input) of a search request's resource."""
    resource = _object(body, "resource", "resource")
    rtype = _string(resource, "type", "resource.type")
    rid = _string(resource, "id", "resource.id") if with_id else ""
    _check_properties(resource, "resource")
    return rtype, rid


def parse_subject_search(body: JsonObject, default_tenant: str | None) -> SubjectSearch:
    """Subject search: `subject.type` is searched (id ignored); resource and action are inputs."""
    stype, _, tenant = _subject_input(body, default_tenant, with_id=False)
    name = _action_input(body)
    rtype, rid = _resource_input(body, with_id=True)
    _optional_object(body, "context", "context")
    page = _page(body, "subject", ("subject", "id"))
    return SubjectSearch(tenant, stype, rtype, rid, name, page)


def parse_resource_search(body: JsonObject, default_tenant: str | None) -> ResourceSearch:
    """Resource search: subject and action are inputs; `resource.type` is searched."""
    stype, user, tenant = _subject_input(body, default_tenant, with_id=True)
    name = _action_input(body)
    rtype, _ = _resource_input(body, with_id=False)
    _optional_object(body, "context", "context")
    page = _page(body, "resource", ("resource", "id"))
    return ResourceSearch(tenant, stype, user, rtype, name, page)


def parse_action_search(body: JsonObject, default_tenant: str | None) -> ActionSearch:
    """Action search: subject and resource are inputs; any `action` member is ignored."""
    stype, user, tenant = _subject_input(body, default_tenant, with_id=True)
    rtype, rid = _resource_input(body, with_id=True)
    _optional_object(body, "context", "context")
    page = _page(body, "action", ("action", None))
    return ActionSearch(tenant, stype, user, rtype, rid, page)


def _fingerprint(body: JsonObject, endpoint: str, ignored: tuple[str, str | None]) -> str:
    """A hash of what a continuation request must repeat: every member but `page`
    and the searched-for entity's id (which the spec says to ignore)."""
    rest = {k: v for k, v in body.items() if k != "page"}
    key, member = ignored
    if member is None:
        rest.pop(key, None)
    elif type(rest.get(key)) is dict:
        rest[key] = {k: v for k, v in rest[key].items() if k != member}
    canonical = json.dumps([endpoint, rest], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def _page(body: JsonObject, endpoint: str, ignored: tuple[str, str | None]) -> Page:
    page = _optional_object(body, "page", "page") or {}
    _optional_object(page, "properties", "page.properties")
    limit = page.get("limit", DEFAULT_PAGE_LIMIT)
    if type(limit) is float and limit.is_integer():  # JSON has one number type: 20.0 is 20
        limit = int(limit)
    if type(limit) is not int or limit < 0:
        raise RequestError("page.limit must be a non-negative integer", "page.limit")
    fingerprint = _fingerprint(body, endpoint, ignored)
    offset = 0
    if "token" in page:
        token = page["token"]
        if type(token) is not str:
            raise RequestError(f"page.token must be a string, not {_kind(token)}", "page.token")
        if token:
            offset = _offset(token, fingerprint)
    return Page(offset, min(limit, MAX_PAGE_LIMIT), fingerprint)


def page_token(offset: int, fingerprint: str) -> str:
    """The opaque token of the page starting at `offset` of the request `fingerprint`."""
    raw = json.dumps({"o": offset, "h": fingerprint}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _offset(token: str, fingerprint: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        offset, bound_to = data["o"], data["h"]
    except (ValueError, TypeError, KeyError, RecursionError):
        raise RequestError("page.token is not a token this server issued", "page.token") from None
    if type(offset) is not int or offset < 0 or bound_to != fingerprint:
        raise RequestError(
            "page.token belongs to a different request; repeat every other member unchanged",
            "page.token",
        )
    return offset


def paged(
    items: Sequence[Any],
    page: Page,
    render: Callable[[Any], JsonObject],
    total: int | None = None,
) -> tuple[list[JsonObject], JsonObject]:
    """One page of `items` rendered, and the response `page` object (`next_token` "" at the end).

    `items` may hold only the answer's first `offset + limit` items when `total` gives
    the whole answer's size.
    """
    size = len(items) if total is None else total
    end = page.offset + page.limit
    results = [render(item) for item in items[page.offset : end]]
    more = end < size
    next_token = page_token(end, page.fingerprint) if more else ""
    return results, {"next_token": next_token, "count": len(results), "total": size}


def configuration(base_url: str) -> JsonObject:
    """The `/.well-known/authzen-configuration` document for a PDP at `base_url`."""
    base = base_url.rstrip("/")
    return {
        "policy_decision_point": base,
        "access_evaluation_endpoint": f"{base}/access/v1/evaluation",
        "access_evaluations_endpoint": f"{base}/access/v1/evaluations",
        "search_subject_endpoint": f"{base}/access/v1/search/subject",
        "search_resource_endpoint": f"{base}/access/v1/search/resource",
        "search_action_endpoint": f"{base}/access/v1/search/action",
    }


def parse_min_revision(raw: str) -> int:
    """The `X-PDP-Min-Revision` header: a transaction id (xid8) in decimal."""
    if not (0 < len(raw) <= 20 and raw.isascii() and raw.isdigit()):
        raise RequestError(
            "X-PDP-Min-Revision must be a transaction id (a decimal integer, as returned by "
            "pg_current_xact_id())",
            "X-PDP-Min-Revision",
        )
    return int(raw)
