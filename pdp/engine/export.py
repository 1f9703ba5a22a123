"""The rows an engine holds, back in the row format it was built from (`pdp.engine.rows`).

`Engine.build(tables(engine), engine.revision)` holds the same rows again: the same
digest per tenant (`pdp.engine.digest`, whose lines this walk mirrors one for one).
A local snapshot file (`sync.file_snapshot`) writes these tables and reloads them.

The walk only reads; it may run in a worker thread while checks read the same engine,
as long as nothing applies a change meanwhile (the caller's guarantee).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pdp.engine.grants import iter_grants
from pdp.engine.rows import ENTITIES, Row

if TYPE_CHECKING:
    from pdp.engine.tenant import TenantState

TableRows = dict[str, list[Row]]


def tenant_tables(state: TenantState, out: TableRows) -> None:
    """Append every row held for this tenant to `out` (entity -> rows)."""
    t = state.tenant_id
    if state.exists:
        out["tenants"].append((t,))
    _users(state, out)
    _groups(state, out)
    role_rows(state, out)
    resources = out["resources"]
    for rtype, of_type in state.resources.items():
        resources.extend((t, rtype, rid, attrs) for rid, attrs in of_type.items())


def empty_tables() -> TableRows:
    return {entity: [] for entity in ENTITIES}


def _users(state: TenantState, out: TableRows) -> None:
    t = state.tenant_id
    users, user_roles, members = out["users"], out["user_roles"], out["group_members"]
    attributes = state.user_attributes
    for uid, (status, grants, groups) in state.users.items():
        if status is not None:
            users.append((t, uid, status, attributes.get(uid, "{}")))
        user_roles.extend((t, uid, role, scope, exp) for role, scope, exp in iter_grants(grants))
        members.extend((t, gid, uid) for gid in groups)


def _groups(state: TenantState, out: TableRows) -> None:
    t = state.tenant_id
    out["groups"].extend((t, gid) for gid in state.groups)
    group_roles = out["group_roles"]
    for gid, index in state.group_grants.items():
        group_roles.extend((t, gid, role, scope, exp) for role, scope, exp in iter_grants(index))


def role_rows(state: TenantState, out: TableRows) -> None:
    """Append the tenant's role graph rows (roles, role_inherits, role_permissions)."""
    t = state.tenant_id
    graph = state.roles
    out["roles"].extend((t, role) for role in graph.roles)
    inherits = out["role_inherits"]
    for role, targets in graph.edges.items():
        inherits.extend((t, role, target) for target in targets)
    perms = out["role_permissions"]
    for role, held in graph.perms.items():
        perms.extend((t, role, perm, None) for perm in held)
    for role, conds in graph.conds.items():
        perms.extend((t, role, perm, cond.text) for perm, cond in conds.items())
