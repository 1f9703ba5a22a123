"""One tenant's state: users, groups, memberships, assignments and the role graph.

Memory per user is kept to one dict entry whose value is a shared-where-equal tuple
(status, direct grants, group ids); ids repeated across users (roles, scopes, groups,
status) are interned. User ids are not: the users dict holds one copy of each.

Every row is stored as given, whether or not its parent row exists (foreign keys
hold eventually in the database); what a check may use is decided at check time or
kept derived: `live_groups` holds the grant index of existing groups only, and the
role graph keeps closures for existing roles only. Upserts and deletes are
idempotent and cost in proportion to the row, never to the tenant.
"""

from __future__ import annotations

from collections.abc import Callable
from sys import intern
from typing import cast

from pdp.engine import grants as g
from pdp.engine.decision import Decision
from pdp.engine.roles import RoleGraph
from pdp.engine.rows import ENTITIES, Row

# (status, direct grants, sorted group ids); status None = no users row (yet).
UserRec = tuple[str | None, g.Grants, tuple[str, ...]]
NO_USER: UserRec = (None, g.NO_GRANTS, ())
_DECISION_CACHE_LIMIT = 65_536


class TenantState:
    """All rows of one tenant plus the derived structures a check reads."""

    __slots__ = (
        "_decisions",
        "count",
        "exists",
        "group_grants",
        "groups",
        "live_groups",
        "roles",
        "tenant_id",
        "users",
    )

    def __init__(self, tenant_id: str) -> None:
        self.tenant_id = tenant_id
        self.exists = False
        self.users: dict[str, UserRec] = {}
        self.groups: set[str] = set()
        self.group_grants: dict[str, g.Grants] = {}
        self.live_groups: dict[str, g.Grants] = {}
        self.roles = RoleGraph()
        self.count: dict[str, int] = dict.fromkeys(ENTITIES, 0)
        self._decisions: dict[tuple[str, str, str | None, str, float | None], Decision] = {}

    def upsert(self, entity: str, row: Row) -> None:
        """Make `row` current (idempotent)."""
        _UPSERT[entity](self, row)

    def delete(self, entity: str, key: tuple[str, ...]) -> None:
        """Remove the row with this key if present (idempotent)."""
        _DELETE[entity](self, key)

    def settle(self) -> None:
        """Bring derived role closures up to date after a batch; call before checking."""
        if self.roles.settle():
            self._decisions.clear()

    def granted(
        self, role: str, perm: str, group: str | None, scope: str, expires: float | None
    ) -> Decision:
        """The (cached) granted Decision for this assignment and matching permission."""
        key = (role, perm, group, scope, expires)
        found = self._decisions.get(key)
        if found is None:
            if len(self._decisions) >= _DECISION_CACHE_LIMIT:
                self._decisions.clear()
            path = self.roles.path(role, perm)
            found = Decision(True, "granted", role, path, perm, group, scope, expires)
            self._decisions[key] = found
        return found

    def compact(self) -> None:
        """Share equal immutable grants and user records (after a bulk load): saves memory."""
        canon: dict[object, object] = {}
        for uid, (status, grants, groups) in self.users.items():
            if isinstance(grants, dict):
                continue
            shared = tuple(canon.setdefault(x, x) for x in grants)
            rec = (status, canon.setdefault(shared, shared), canon.setdefault(groups, groups))
            self.users[uid] = cast(UserRec, canon.setdefault(rec, rec))

    # -- users and their direct assignments -------------------------------------------

    def _store_user(
        self, uid: str, status: str | None, grants: g.Grants, groups: tuple[str, ...]
    ) -> None:
        if status is None and not grants and not groups:
            self.users.pop(uid, None)
        else:
            self.users[uid] = (status, grants, groups)

    def _put_user(self, row: Row) -> None:
        _, uid, status = cast(tuple[str, str, str | None], row)
        rec = self.users.get(uid, NO_USER)
        if rec[0] is None:
            self.count["users"] += 1
        self.users[uid] = (intern(status or ""), rec[1], rec[2])

    def _del_user(self, key: tuple[str, ...]) -> None:
        rec = self.users.get(key[1])
        if rec is not None and rec[0] is not None:
            self.count["users"] -= 1
            self._store_user(key[1], None, rec[1], rec[2])

    def _put_user_role(self, row: Row) -> None:
        _, uid, role, scope, expires = cast(tuple[str, str, str, str, float | None], row)
        grant = (intern(role), intern(scope), None if expires is None else float(expires))
        rec = self.users.get(uid, NO_USER)
        grants, added = g.put(rec[1], grant)
        self.count["user_roles"] += added
        self.users[uid] = (rec[0], grants, rec[2])

    def _del_user_role(self, key: tuple[str, ...]) -> None:
        _, uid, role, scope = key
        rec = self.users.get(uid)
        if rec is not None:
            grants, removed = g.drop(rec[1], role, scope)
            self.count["user_roles"] -= removed
            self._store_user(uid, rec[0], grants, rec[2])

    # -- groups, memberships and group assignments ------------------------------------

    def _put_group(self, row: Row) -> None:
        gid = intern(cast(str, row[1]))
        if gid not in self.groups:
            self.groups.add(gid)
            self.count["groups"] += 1
            index = self.group_grants.get(gid)
            if index is not None:
                self.live_groups[gid] = index

    def _del_group(self, key: tuple[str, ...]) -> None:
        gid = key[1]
        if gid in self.groups:
            self.groups.remove(gid)
            self.count["groups"] -= 1
            self.live_groups.pop(gid, None)

    def _put_member(self, row: Row) -> None:
        # Memberships live only in the member's record: a check reads them from there,
        # and nothing needs members by group (a group change never walks its members).
        _, gid, uid = cast(tuple[str, str, str], row)
        status, grants, groups = self.users.get(uid, NO_USER)
        if gid not in groups:
            self.count["group_members"] += 1
            self.users[uid] = (status, grants, tuple(sorted((*groups, intern(gid)))))

    def _del_member(self, key: tuple[str, ...]) -> None:
        _, gid, uid = key
        rec = self.users.get(uid)
        if rec is not None and gid in rec[2]:
            self.count["group_members"] -= 1
            self._store_user(uid, rec[0], rec[1], tuple(x for x in rec[2] if x != gid))

    def _put_group_role(self, row: Row) -> None:
        _, gid, role, scope, expires = cast(tuple[str, str, str, str, float | None], row)
        gid = intern(gid)
        grant = (intern(role), intern(scope), None if expires is None else float(expires))
        grants, added = g.put(self.group_grants.get(gid, g.NO_GRANTS), grant)
        self.count["group_roles"] += added
        self._store_group_grants(gid, grants)

    def _del_group_role(self, key: tuple[str, ...]) -> None:
        _, gid, role, scope = key
        grants, removed = g.drop(self.group_grants.get(gid, g.NO_GRANTS), role, scope)
        self.count["group_roles"] -= removed
        self._store_group_grants(gid, grants)

    def _store_group_grants(self, gid: str, grants: g.Grants) -> None:
        if not grants:
            self.group_grants.pop(gid, None)
            self.live_groups.pop(gid, None)
            return
        self.group_grants[gid] = grants
        if gid in self.groups:
            self.live_groups[gid] = grants

    # -- roles ----------------------------------------------------------------------------

    def _put_tenant(self, row: Row) -> None:
        if not self.exists:
            self.exists = True
            self.count["tenants"] = 1

    def _del_tenant(self, key: tuple[str, ...]) -> None:
        # The engine drops the whole TenantState on a tenant delete; this is for completeness.
        self.exists = False
        self.count["tenants"] = 0

    def _put_role(self, row: Row) -> None:
        self.count["roles"] += self.roles.add_role(intern(cast(str, row[1])))

    def _del_role(self, key: tuple[str, ...]) -> None:
        self.count["roles"] -= self.roles.remove_role(key[1])

    def _put_inherit(self, row: Row) -> None:
        _, role, inherits = cast(tuple[str, str, str], row)
        self.count["role_inherits"] += self.roles.add_edge(intern(role), intern(inherits))

    def _del_inherit(self, key: tuple[str, ...]) -> None:
        self.count["role_inherits"] -= self.roles.remove_edge(key[1], key[2])

    def _put_perm(self, row: Row) -> None:
        _, role, perm = cast(tuple[str, str, str], row)
        self.count["role_permissions"] += self.roles.add_perm(intern(role), intern(perm))

    def _del_perm(self, key: tuple[str, ...]) -> None:
        self.count["role_permissions"] -= self.roles.remove_perm(key[1], key[2])


_UPSERT: dict[str, Callable[[TenantState, Row], None]] = {
    "tenants": TenantState._put_tenant,
    "users": TenantState._put_user,
    "groups": TenantState._put_group,
    "group_members": TenantState._put_member,
    "roles": TenantState._put_role,
    "role_inherits": TenantState._put_inherit,
    "role_permissions": TenantState._put_perm,
    "user_roles": TenantState._put_user_role,
    "group_roles": TenantState._put_group_role,
}

_DELETE: dict[str, Callable[[TenantState, tuple[str, ...]], None]] = {
    "tenants": TenantState._del_tenant,
    "users": TenantState._del_user,
    "groups": TenantState._del_group,
    "group_members": TenantState._del_member,
    "roles": TenantState._del_role,
    "role_inherits": TenantState._del_inherit,
    "role_permissions": TenantState._del_perm,
    "user_roles": TenantState._del_user_role,
    "group_roles": TenantState._del_group_role,
}


def upserter(entity: str) -> Callable[[TenantState, Row], None]:
    """The upsert function for one entity (lets a bulk load skip a lookup per row)."""
    return _UPSERT[entity]
