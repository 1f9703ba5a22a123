"""JSON in and out of the check API: orjson when installed, the standard library otherwise.

Both paths accept exactly the same documents and produce the same bytes for the
shapes pdp sends.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from pdp.errors import RequestError

try:
    import orjson
except ImportError:  # pragma: no cover - the plain path; orjson is an optional extra
    orjson = None  # type: ignore[assignment]

JsonObject = dict[str, Any]


class _NotFinite(ValueError):
    """A number JSON cannot carry: NaN, Infinity, or one that overflows a double."""


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite(f"number {text[:32]} is out of range")
    return value


def _constant(name: str) -> Any:
    raise _NotFinite(f"{name} is not a JSON number")


def _integer(text: str) -> int | float:
    # Beyond 64 bits orjson reads an integer as a double: the same here.
    value = int(text)
    return value if -(2**63) <= value < 2**64 else _finite(text)


def plain_loads(raw: bytes) -> Any:
    """The standard library's decoder, held to strict JSON as orjson is: no NaN or
    Infinity literals, no number that overflows a double (`1e999`)."""
    return json.loads(raw, parse_float=_finite, parse_int=_integer, parse_constant=_constant)


def plain_dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


# Deep nesting makes the stdlib decoder recurse; `_NotFinite` is a ValueError.
PLAIN_DECODE_ERRORS: tuple[type[Exception], ...] = (ValueError, RecursionError)

FAST = orjson is not None  # which path this install takes

if orjson is not None:
    _loads: Callable[[bytes], Any] = orjson.loads
    dumps: Callable[[Any], bytes] = orjson.dumps
    _DECODE_ERRORS: tuple[type[Exception], ...] = (orjson.JSONDecodeError,)
else:  # pragma: no cover
    _loads = plain_loads
    dumps = plain_dumps
    _DECODE_ERRORS = PLAIN_DECODE_ERRORS


def loads(raw: bytes) -> JsonObject:
    """The request body as a JSON object; RequestError for empty, malformed or non-object."""
    if not raw:
        raise RequestError("the request body is empty; send a JSON object")
    try:
        body = _loads(raw)
    except _DECODE_ERRORS as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None
    if type(body) is not dict:
        raise RequestError(f"the request body must be a JSON object, not {kind(body)}")
    return body


def kind(value: object) -> str:
    """How an error message names the JSON type of `value` ("a string", "null", ...)."""
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


def error_body(error: str, message: str, field: str | None = None) -> bytes:
    """The JSON body of every non-2xx answer: `{"error", "message", "field"?}`."""
    body = {"error": error, "message": message}
    if field is not None:
        body["field"] = field
    return dumps(body)
