"""What the admin API manages: one `Kind` per pdp table, and the checks of its fields.

Pure: no I/O. A kind names its table, its key columns (after tenant_id) and where
each comes from (the path, or the query string for an assignment's scope), and its
writable fields with their types. The database still has the last word (grammar,
foreign keys, cycles); these checks give the caller a 422 naming the field first.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pdp.conditions import validate
from pdp.errors import RequestError

MAX_ID = 256


class AdminError(RequestError):
    """An answer other than 400: `status` and `error` say which (404, 409, 412, 422)."""

    def __init__(self, status: int, error: str, message: str, field: str | None = None) -> None:
        super().__init__(message, field)
        self.status = status
        self.error = error


def unprocessable(message: str, field: str | None) -> AdminError:
    return AdminError(422, "unprocessable", message, field)


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    type: str  # "text" | "status" | "object" | "timestamp" | "condition" (CEL)
    nullable: bool = False
    default: Any = None  # what a create without the field stores (None: the column's default)


@dataclass(frozen=True, slots=True)
class Kind:
    """A managed table: `collection` and `item` are route templates under the tenant."""

    name: str
    table: str
    key: tuple[str, ...]
    collection: str
    item: str
    fields: tuple[Field, ...] = ()
    query_key: tuple[str, ...] = ()  # key columns given as ?name=value (default below)
    query_defaults: tuple[tuple[str, str], ...] = ()

    @property
    def path_key(self) -> tuple[str, ...]:
        return tuple(k for k in self.key if k not in self.query_key)

    @property
    def parent_key(self) -> tuple[str, ...]:
        """Key columns the collection's path fixes (e.g. group_id of a group's members)."""
        return tuple(k for k in self.path_key if "{" + k in self.collection)

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def columns(self) -> tuple[str, ...]:
        return ("tenant_id", *self.key, *self.field_names)


_EXPIRES = Field("expires_at", "timestamp", nullable=True)

KINDS: tuple[Kind, ...] = (
    Kind(
        "users", "users", ("id",), "/users", "/users/{id}",
        (Field("status", "status"), Field("attributes", "object")),
    ),
    Kind("groups", "groups", ("id",), "/groups", "/groups/{id}", (Field("description", "text"),)),
    Kind(
        "group_members", "group_members", ("group_id", "user_id"),
        "/groups/{group_id}/members", "/groups/{group_id}/members/{user_id}",
    ),
    Kind("roles", "roles", ("id",), "/roles", "/roles/{id}", (Field("description", "text"),)),
    Kind(
        "role_inherits", "role_inherits", ("role_id", "inherits_id"),
        "/roles/{role_id}/inherits", "/roles/{role_id}/inherits/{inherits_id}",
    ),
    Kind(
        "role_permissions", "role_permissions", ("role_id", "permission"),
        "/roles/{role_id}/permissions", "/roles/{role_id}/permissions/{permission}",
        (Field("condition", "condition", nullable=True),),
    ),
    Kind(
        "user_roles", "user_roles", ("user_id", "role_id", "scope"),
        "/users/{user_id}/roles", "/users/{user_id}/roles/{role_id}", (_EXPIRES,),
        query_key=("scope",), query_defaults=(("scope", "*"),),
    ),
    Kind(
        "group_roles", "group_roles", ("group_id", "role_id", "scope"),
        "/groups/{group_id}/roles", "/groups/{group_id}/roles/{role_id}", (_EXPIRES,),
        query_key=("scope",), query_defaults=(("scope", "*"),),
    ),
    Kind(
        "resources", "resources", ("type", "id"), "/resources", "/resources/{type}/{id}",
        (Field("attributes", "object"),),
    ),
)  # fmt: skip
BY_NAME = {k.name: k for k in KINDS}


def check_id(name: str, value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID or "\x00" in value:
        raise unprocessable(
            f"{name} must be a non-empty string of at most {MAX_ID} characters", name
        )
    return value


def check_fields(kind: Kind, body: dict[str, Any], *, partial: bool) -> dict[str, Any]:
    """The writable fields of `body`, checked; unknown fields are an error (422)."""
    known = {f.name: f for f in kind.fields}
    unknown = sorted(set(body) - set(known) - set(kind.key) - {"tenant_id"})
    if unknown:
        allowed = ", ".join(kind.field_names) or "none"
        raise unprocessable(f"unknown field {unknown[0]!r} (writable: {allowed})", unknown[0])
    out: dict[str, Any] = {}
    for name, spec in known.items():
        if name not in body:
            continue
        out[name] = _check_value(spec, body[name])
    if partial and not out:
        raise unprocessable(f"nothing to change: give one of {', '.join(kind.field_names)}", None)
    return out


def _check_value(spec: Field, value: object) -> object:
    if value is None:
        if spec.nullable:
            return None
        raise unprocessable(f"{spec.name} may not be null", spec.name)
    if spec.type == "text" and isinstance(value, str) and "\x00" not in value:
        return value
    if spec.type == "status" and value in ("active", "disabled"):
        return value
    if spec.type == "object" and isinstance(value, dict):
        return value
    if spec.type == "condition" and isinstance(value, str):
        problem = validate(value)  # compiled now: an expression that cannot run is refused
        if problem is None:
            return value
        raise unprocessable(f"condition does not compile: {problem}", spec.name)
    if spec.type == "timestamp" and isinstance(value, str):
        try:
            stamp = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if stamp.tzinfo is not None:
                return stamp
    expected = {
        "text": "a string",
        "status": "'active' or 'disabled'",
        "object": "a JSON object",
        "timestamp": "an ISO 8601 time with a UTC offset",
        "condition": "a CEL expression (a string) or null",
    }[spec.type]
    raise unprocessable(f"{spec.name} must be {expected}", spec.name)
