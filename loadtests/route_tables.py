"""Synthetic PDP_ROUTES tables for the benchmarks: `size` entries, the real ones last.

The last 25 entries map `GET /api/<type>/{id}/<action>` to permission `<type>:<action>`
on `<type>:{id}` (the synthetic dataset's types and actions); the others are
plausible filler (`/svc-<n>/...` with parameters and mixed methods) that a request
for /api/... never matches, so a linear scan would try all of them first.
"""

from __future__ import annotations

RESOURCE_TYPES = ("document", "folder", "project", "invoice", "report")  # as seed_data
ACTIONS = ("read", "write", "delete", "share", "approve")
_FILLER_SHAPES = (
    "/svc-{n}/items",
    "/svc-{n}/items/{{item_id}}",
    "/svc-{n}/items/{{item_id}}/versions/{{version}}",
    "/svc-{n}/{{tenant}}/reports/{{report_id}}",
)
_METHODS = ("GET", "[PUT, PATCH]", "POST", "DELETE")


def routes_yaml(size: int) -> str:
    """A route table of `size` entries (at least the 25 real ones)."""
    real = [
        f"  - {{method: GET, path: '/api/{t}/{{id}}/{a}', resource: {{type: {t}, id: '{{id}}'}}, "
        f"action: {a}}}"
        for t in RESOURCE_TYPES
        for a in ACTIONS
    ]
    filler = []
    for i in range(max(0, size - len(real))):
        shape = _FILLER_SHAPES[i % len(_FILLER_SHAPES)].format(n=i // len(_FILLER_SHAPES))
        filler.append(f"  - {{method: {_METHODS[i % len(_METHODS)]}, path: '{shape}'}}")
    return "routes:\n" + "\n".join(filler + real) + "\npublic:\n  - GET /healthz\n"


def request_path(rtype: str, rid: str, action: str) -> str:
    """The path that the real entry for (rtype, action) maps to resource rtype:rid."""
    return f"/api/{rtype}/{rid}/{action}"
