"""The AuthZEN API-gateway profile on /access/v1/evaluation(s): subject {type: identity},
action {name: <HTTP method>}, resource {type: route, id: <route template>}.

Granted in the data model like any permission: a role holding `route:GET` (or
`route:*`), assigned with scope `route:<template>` (or `route:*` for every route).
"""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pytest_aiohttp import AiohttpClient

from pdp.engine import Engine, Snapshot
from pdp.replica import Replica
from pdp.web.app import build_app
from tests.test_web_support import Clock, settings

ROWS: dict[str, list[tuple[Any, ...]]] = {
    "tenants": [("acme",)],
    "users": [("acme", "carol", "active"), ("acme", "ops", "active"), ("acme", "bob", "active")],
    "roles": [("acme", "project-viewer"), ("acme", "operator")],
    "role_permissions": [("acme", "project-viewer", "route:GET"), ("acme", "operator", "route:*")],
    "user_roles": [
        ("acme", "carol", "project-viewer", "route:/projects/{project_id}", None),
        ("acme", "ops", "operator", "route:*", None),
    ],
}


def profile(user: str, method: str, template: str, stype: str = "identity") -> dict[str, Any]:
    return {
        "subject": {"type": stype, "id": user},
        "action": {"name": method},
        "resource": {"type": "route", "id": template},
    }


@pytest.mark.parametrize(
    ("user", "method", "template", "allowed", "reason"),
    [
        ("carol", "GET", "/projects/{project_id}", True, "granted"),
        ("carol", "DELETE", "/projects/{project_id}", False, "no_grant"),
        ("carol", "GET", "/admin", False, "no_grant"),
        ("ops", "DELETE", "/admin", True, "granted"),
        ("bob", "GET", "/projects/{project_id}", False, "no_grant"),
    ],
)
async def test_the_gateway_profile_is_decided_by_route_grants(
    aiohttp_client: AiohttpClient, user: str, method: str, template: str, allowed: bool,
    reason: str,
) -> None:  # fmt: skip
    clock = Clock()
    replica = Replica(clock=clock)
    replica.install(Engine.build(ROWS, Snapshot(1, 1)), epoch="e", synced_at=clock())
    app = build_app(settings(default_tenant="acme"), replica=replica, registry=CollectorRegistry())
    client = await aiohttp_client(app)
    response = await client.post("/access/v1/evaluation", json=profile(user, method, template))
    body = await response.json()
    assert (response.status, body["decision"], body["context"]["reason"]) == (200, allowed, reason)
    # `identity` is answered exactly as `user`; other subject types are refused.
    same = await client.post("/access/v1/evaluation", json=profile(user, method, template, "user"))
    assert (await same.json())["decision"] is allowed
    other = await client.post("/access/v1/evaluation", json=profile(user, method, template, "bot"))
    assert (await other.json())["context"]["reason"] == "unsupported_subject_type"
    batch = {"subject": {"type": "identity", "id": user},
             "evaluations": [{"action": {"name": method}, "resource": {"type": "route", "id": template}}] * 2}  # fmt: skip
    answered = await (await client.post("/access/v1/evaluations", json=batch)).json()
    answers = answered["evaluations"]
    assert [a["decision"] for a in answers] == [allowed, allowed]


async def test_route_grants_are_accepted_by_the_database(pg: Any) -> None:
    await pg.execute(
        """INSERT INTO pdp.tenants (id) VALUES ('acme');
           INSERT INTO pdp.users (tenant_id, id) VALUES ('acme', 'carol');
           INSERT INTO pdp.roles (tenant_id, id) VALUES ('acme', 'project-viewer');
           INSERT INTO pdp.role_permissions (tenant_id, role_id, permission)
             VALUES ('acme', 'project-viewer', 'route:GET');
           INSERT INTO pdp.user_roles (tenant_id, user_id, role_id, scope)
             VALUES ('acme', 'carol', 'project-viewer', 'route:/projects/{project_id}');"""
    )
    check = "SELECT pdp.check('acme', 'carol', 'route', $1, $2)"
    assert await pg.fetchval(check, "/projects/{project_id}", "GET") is True
    assert await pg.fetchval(check, "/projects/{project_id}", "DELETE") is False
