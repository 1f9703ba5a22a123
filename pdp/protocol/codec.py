"""JSON in and out of the check API: orjson when installed, the standard library otherwise.

Both paths accept exactly the same documents and produce the same bytes for the
shapes pdp sends.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pdp.errors import RequestError

try:
    import orjson
except ImportError:  # pragma: no cover - the plain path; orjson is an optional extra
    orjson = None  # type: ignore[assignment]

JsonObject = dict[str, Any]

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
