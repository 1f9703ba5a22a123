"""Validation of the members every AuthZEN request shares, each error naming its JSON path."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pdp.errors import RequestError
from pdp.protocol.codec import JsonObject, kind

# Same bound as the database's CHECK constraints (pdp.pg.schema.MAX_ID_LENGTH), restated
# here so the protocol layer does not import SQLAlchemy.
MAX_ID_LENGTH = 256


def is_id(value: object) -> bool:
    """A string that can be an id: 1 to MAX_ID_LENGTH characters, no NUL (PostgreSQL's
    text cannot hold one: the SQL fallback would fail instead of answering)."""
    return type(value) is str and 0 < len(value) <= MAX_ID_LENGTH and "\x00" not in value


def required_object(parent: Mapping[str, Any], key: str, path: str) -> JsonObject:
    value = parent.get(key)
    if type(value) is dict:
        return value
    if value is None and key not in parent:
        raise RequestError(f"{path} is required", path)
    raise RequestError(f"{path} must be an object, not {kind(value)}", path)


def optional_object(parent: Mapping[str, Any], key: str, path: str) -> JsonObject | None:
    if key not in parent:
        return None
    value = parent[key]
    if type(value) is not dict:
        raise RequestError(f"{path} must be an object, not {kind(value)}", path)
    return value


def string(obj: Mapping[str, Any], key: str, path: str) -> str:
    value = obj.get(key)
    if is_id(value):
        return str(value)
    if value is None and key not in obj:
        raise RequestError(f"{path} is required", path)
    if type(value) is not str:
        raise RequestError(f"{path} must be a string, not {kind(value)}", path)
    if "\x00" in value:
        raise RequestError(f"{path} must not contain a NUL character", path)
    raise RequestError(f"{path} must be 1 to {MAX_ID_LENGTH} characters long", path)


def tenant(subject: JsonObject, path: str, default: str | None) -> str:
    """`subject.properties.tenant`, else `default`; RequestError when neither is there."""
    props = subject.get("properties")
    if props is not None or "properties" in subject:
        if type(props) is not dict:
            raise RequestError(
                f"{path}.properties must be an object, not {kind(props)}", f"{path}.properties"
            )
        if "tenant" in props:
            return string(props, "tenant", f"{path}.properties.tenant")
    if default is None:
        field = f"{path}.properties.tenant"
        raise RequestError(f"{field} is required (no default tenant is configured)", field)
    return default


def check_properties(obj: JsonObject, path: str) -> None:
    """`properties`, when present, must be an object."""
    if "properties" in obj and type(obj["properties"]) is not dict:
        raise RequestError(
            f"{path}.properties must be an object, not {kind(obj['properties'])}",
            f"{path}.properties",
        )
