"""The original request's path, normalized before any route is matched.

Gateways hand the URI over raw (nginx's `$request_uri`, Envoy without
`normalize_path`), so `/public/../admin` must not match a `/public/...` rule. The
steps (RFC 3986 section 6.2.2 then 5.2.4): drop the query and fragment, decode
percent-encoded *unreserved* characters (`%2E` is `.`), remove dot segments,
collapse empty segments (`//`, a trailing `/`), then decode each segment in full.
An encoded slash (`%2F`) stays inside its segment: it is data, not a separator.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ABSOLUTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")
MAX_PATH_LENGTH = 8192


class PathError(ValueError):
    """The URI cannot be normalized (its message says why); the request is denied."""


def _decode_unreserved(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else match.group(0).upper()


def split_uri(uri: str) -> tuple[str, str]:
    """(path, query) of a request target: origin form (`/a?b`) or absolute form."""
    if not uri.startswith("/"):
        absolute = _ABSOLUTE.match(uri)
        if absolute is None:
            raise PathError(f"not a request path: {uri[:100]!a}")
        uri = uri[absolute.end() :] or "/"
    path, _, query = uri.partition("?")
    return path.partition("#")[0], query.partition("#")[0]


def normalize(path: str) -> tuple[str, ...]:
    """The decoded segments of `path` (starting with `/`) after normalization.

    Raises PathError for a path that is not absolute, too long, carries a malformed
    escape, is not UTF-8 once decoded, or holds control characters.
    """
    if not path.startswith("/"):
        raise PathError(f"the path must start with '/': {path[:100]!a}")
    if len(path) > MAX_PATH_LENGTH:
        raise PathError(f"the path is longer than {MAX_PATH_LENGTH} characters")
    if "%" not in path and "/." not in path and "//" not in path:
        parts = path[1:].split("/")  # the common case: nothing to decode or remove
        if parts[-1] == "":
            parts.pop()
        return tuple(parts)
    if "%" in path:
        if _BAD_ESCAPE.search(path):
            raise PathError("the path holds a malformed percent-escape")
        path = _ESCAPE.sub(_decode_unreserved, path)
    out: list[str] = []
    for raw in path.split("/"):
        if raw in ("", "."):
            continue
        if raw == "..":
            if out:
                out.pop()
            continue
        out.append(_decode(raw) if "%" in raw else raw)
    return tuple(out)


def _decode(segment: str) -> str:
    try:
        value = unquote(segment, errors="strict")
    except UnicodeDecodeError:
        raise PathError("the path is not UTF-8 once percent-decoded") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise PathError("the path holds a control character")
    return value


def render(segments: tuple[str, ...]) -> str:
    """A readable form of normalized segments (for messages and conditions)."""
    return "/" + "/".join(segments)
