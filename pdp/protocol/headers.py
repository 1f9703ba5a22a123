"""Request headers with a meaning to pdp, parsed (pure: no web framework)."""

from __future__ import annotations

from pdp.errors import RequestError

MIN_REVISION = "X-PDP-Min-Revision"


def parse_min_revision(raw: str) -> int:
    """The `X-PDP-Min-Revision` header: a transaction id (xid8) in decimal."""
    if not (0 < len(raw) <= 20 and raw.isascii() and raw.isdigit()):
        raise RequestError(
            f"{MIN_REVISION} must be a transaction id (a decimal integer, as returned by "
            "pg_current_xact_id())",
            MIN_REVISION,
        )
    return int(raw)
