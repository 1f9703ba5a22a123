"""The original request as a gateway describes it, and what a decision on it may read.

`GatewayRequest` is built once per `/forward-auth` call; `attributes()` is the one
place that turns it into AuthZEN-shaped request attributes for conditional grants:

    subject   {"type": "user", "id": <subject>, "properties": {"tenant": <tenant>}}
    action    {"name": <action>, "properties": {"method": <HTTP method>}}
    resource  {"type", "id", "properties": {<path parameter>: <value>, ...}}
    context   {"http": {"method", "path", "route", "headers": {<lower-case name>: <value>}}}

Only the headers named in `PDP_FORWARD_AUTH_HEADERS` are copied. Nothing calls
`attributes()` on the unconditional path: it is built when the engine asks for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from pdp.conditions import Facts
from pdp.gateway.paths import render
from pdp.gateway.routes import Match


class GatewayRequest(NamedTuple):
    """One forward-auth question: who, which HTTP request, which route it matched.

    A NamedTuple rather than a frozen dataclass: it is built on every request, and a
    tuple costs a fifth of a frozen dataclass's `__init__` (measured: 0.4 vs 2 us).
    """

    method: str
    segments: tuple[str, ...]
    match: Match
    subject: str
    tenant: str
    headers: Mapping[str, str]  # the selected headers, names lower-case

    @property
    def action(self) -> str:
        return self.match.action(self.method)

    def attributes(self) -> dict[str, Any]:
        """The request attributes conditions see (see the module docstring)."""
        match = self.match
        return {
            "subject": {"type": "user", "id": self.subject, "properties": {"tenant": self.tenant}},
            "action": {"name": self.action, "properties": {"method": self.method}},
            "resource": {
                "type": match.resource_type,
                "id": match.resource_id,
                "properties": dict(match.params),
            },
            "context": {
                "http": {
                    "method": self.method,
                    "path": render(self.segments),
                    "route": match.route.template,
                    "headers": dict(self.headers),
                }
            },
        }

    def facts(self) -> Facts:
        """`attributes()` in the shape the engine's conditions read (built on demand)."""
        a = self.attributes()
        return Facts(
            "user",
            a["subject"]["properties"],
            a["resource"]["properties"],
            a["action"]["properties"],
            a["context"],
        )
