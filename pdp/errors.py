"""The one exception tree of pdp.

    PdpError
    ├── UserError            the caller's fault: bad input or configuration (HTTP 400, CLI exit 2)
    │   ├── ConfigError      a PDP_* variable or flag is invalid; names the variable
    │   └── RequestError     an API request is malformed; names the field (HTTP 400)
    │       ├── UnsupportedEncoding  a compressed body (HTTP 415; nothing is inflated)
    │       └── RequestReadTimeout   the request was not read in time (HTTP 408, closed)
    └── DependencyError      PostgreSQL or Redis trouble, raised `from` the driver error

Anything else escaping is our bug. A deny is a decision, never an exception: data
not loaded yet or stale is answered as a deny with its reason, not raised.
"""

from __future__ import annotations


class PdpError(Exception):
    """Base of every error pdp raises on purpose."""


class UserError(PdpError):
    """The caller's fault: fix the input and retry."""


class ConfigError(UserError):
    """A setting is invalid; the message names the variable."""


class RequestError(UserError):
    """A malformed request; `field` names the offending part (a JSON path)."""

    status = 400
    error = "bad_request"  # the `error` member of the JSON answer

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class UnsupportedEncoding(RequestError):
    """A body with a `Content-Encoding` other than identity: refused, never inflated."""

    status = 415
    error = "unsupported_media_type"


class RequestReadTimeout(RequestError):
    """The request (line, headers and body) did not arrive within the read timeout."""

    status = 408
    error = "request_timeout"


class DependencyError(PdpError):
    """A dependency (PostgreSQL, Redis) failed; the cause is chained."""
