"""Search paging: opaque tokens bound to the request they continue.

A token carries the offset of the next page and a fingerprint of every request
member but `page` and the searched-for id, so a continuation that changes the
question is refused instead of answered from the wrong list.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pdp.errors import RequestError
from pdp.protocol.codec import JsonObject, kind
from pdp.protocol.fields import optional_object

DEFAULT_PAGE_LIMIT = 100
MAX_PAGE_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class Page:
    """Where a search page starts and how long it is; `fingerprint` binds its token."""

    offset: int
    limit: int
    fingerprint: str


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


def parse_page(body: JsonObject, endpoint: str, ignored: tuple[str, str | None]) -> Page:
    """The request's `page` (limit, token), checked against the request it continues.

    `ignored` names the member (entity, field) the search ignores: it may change between
    pages (field None: the whole entity).
    """
    page = optional_object(body, "page", "page") or {}
    optional_object(page, "properties", "page.properties")
    limit = page.get("limit", DEFAULT_PAGE_LIMIT)
    if type(limit) is float and limit.is_integer():  # JSON has one number type: 20.0 is 20
        limit = int(limit)
    # 0 would answer an empty page with a token for the same offset: a pager would loop.
    if type(limit) is not int or limit < 1:
        raise RequestError("page.limit must be a positive integer", "page.limit")
    fingerprint = _fingerprint(body, endpoint, ignored)
    offset = 0
    if "token" in page:
        token = page["token"]
        if type(token) is not str:
            raise RequestError(f"page.token must be a string, not {kind(token)}", "page.token")
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
