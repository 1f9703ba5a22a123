"""Forward-auth for API gateways, as pure functions (no I/O, no web framework).

paths     normalize the original request's path (dot segments, escapes, `//`)
routes    PDP_ROUTES: parse and validate the YAML, the compiled first-match table
tokens    verify a bearer JWT against given keys, map its claims to subject/tenant
request   the original request and the attributes a conditional grant may read
"""

from pdp.gateway.paths import PathError, normalize, render, split_uri
from pdp.gateway.request import GatewayRequest
from pdp.gateway.routes import ROUTE_TYPE, Match, Route, RouteTable, build_table, parse_routes
from pdp.gateway.tokens import (
    SUPPORTED_ALGORITHMS,
    Identity,
    InvalidToken,
    KeySet,
    TokenPolicy,
    UnknownKey,
    parse_jwks,
    verify,
)

__all__ = [
    "ROUTE_TYPE",
    "SUPPORTED_ALGORITHMS",
    "GatewayRequest",
    "Identity",
    "InvalidToken",
    "KeySet",
    "Match",
    "PathError",
    "Route",
    "RouteTable",
    "TokenPolicy",
    "UnknownKey",
    "build_table",
    "normalize",
    "parse_jwks",
    "parse_routes",
    "render",
    "split_uri",
    "verify",
]
