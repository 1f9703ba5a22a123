"""One tenant's state: users, groups, memberships, assignments and the role graph.

Memory per user is kept to one dict entry whose value is a shared-where-equal tuple
(status, direct grants, group ids); ids (users, roles, scopes, groups, status) are
interned, so the reverse indexes of the subject search (`pdp.engine.holders`: who holds
a role at a scope, who is in a group) cost pointers, not copies.

Every row is stored as given, whether or not its parent row exists (foreign keys
hold eventually in the database); what a check may use is decided at check time or
kept derived: `live_groups` holds the grant index of existing groups only, and the
role graph keeps closures for existing roles only. Upserts and deletes are
idempotent and cost in proportion to the row, never to the tenant; each also moves the
running digest (`pdp.engine.digest`) by the one line it creates, replaces or removes.
"""

from __future__ import annotations

from collections.abc import Callable
from sys import intern
from typing import Any, cast

from pdp.engine import grants as g
from pdp.engine import holders as h
from pdp.engine.decision import Decision
from pdp.engine.digest import MASK, grant_line, line_sum, line_value, render, row_line
from pdp.engine.roles import RoleGraph
from pdp.engine.rows import ENTITIES, Row

# (status, direct grants, sorted group ids); status None = no users row (yet).
UserRec = tuple[str | None, g.Grants, tuple[str, ...]]
NO_USER: UserRec = (None, g.NO_GRANTS, ())
EMPTY_ATTRIBUTES = "{}"  # jsonb '{}'::text, the column default
_DECISION_CACHE_LIMIT = 65_536
# A row as the upserts read it: fields typed by the row format (`pdp.engine.rows`).
# Any, not casts: `typing.cast` is a call, and a bulk load makes millions of upserts.
AnyRow = tuple[Any, ...]


class TenantState:
    """All rows of one tenant plus the derived structures a check reads."""

    __slots__ = (
        "_decisions",
        "_sum",
        "count",
        "exists",
        "group_grants",
        "group_holders",
        "groups",
        "live_groups",
        "members",
        "resources",
        "roles",
        "tenant_id",
        "user_attributes",
        "user_holders",
        "users",
    )

    def __init__(self, tenant_id: str, *, loading: bool = False) -> None:
        """An empty tenant; `loading` defers the running digest to the first `digest()`."""
        self.tenant_id = tenant_id
        self.exists = False
        self.users: dict[str, UserRec] = {}
        self.groups: set[str] = set()
        self.group_grants: dict[str, g.Grants] = {}
        self.live_groups: dict[str, g.Grants] = {}
        self.roles = RoleGraph()
        self.count: dict[str, int] = dict.fromkeys(ENTITIES, 0)
        self.user_holders: h.Holders = {}
        self.group_holders: h.Holders = {}
        self.members: h.Ids = {}
        # pdp.users.attributes as JSON text, only where not `{}`; the resource inventory
        # as type -> id -> attributes JSON text (parsed only when a condition reads it).
        self.user_attributes: dict[str, str] = {}
        self.resources: dict[str, dict[str, str]] = {}
        self._decisions: dict[tuple[str, str, str | None, str, float | None], Decision] = {}
        # Sum mod 2**64 of the digest line values of the held rows; the line count is
        # the sum of `count`. None while a bulk load runs (summed once at its end).
        self._sum: int | None = None if loading else 0

    def upsert(self, entity: str, row: Row) -> None:
        """Make `row` current (idempotent)."""
        _UPSERT[entity](self, row)

    def delete(self, entity: str, key: tuple[str, ...]) -> None:
        """Remove the row with this key if present (idempotent)."""
        _DELETE[entity](self, key)

    def digest(self) -> str:
        """The digest (`pdp.engine.digest`) of the rows held: O(1).

        Except once after a `loading` start: the first call then sums every row.
        """
        if self._sum is None:
            self._sum = line_sum(self)
        return render(self._sum, sum(self.count.values()))

    def start_digest(self, user_rows: int | None) -> None:
        """Start the running digest after a `loading` start (see `pdp.engine.Loader`).

        `user_rows`: the sum of the line values of every users, group_members and
        user_roles row held, known from the load; the other rows are summed here. None:
        sum every row.
        """
        if user_rows is None:
            self._sum = line_sum(self)
        else:
            self._sum = (user_rows + line_sum(self, users=False)) & MASK

    def running_sum(self) -> int:
        """The running digest's sum (what `resume_digest` takes back)."""
        if self._sum is None:
            self._sum = line_sum(self)
        return self._sum

    def resume_digest(self, total: int) -> None:
        """Take up the running digest at `total`, the `running_sum` of a state that held
        exactly these rows (a restored image, `pdp.engine.image`)."""
        self._sum = total & MASK

    def _tally(self, sign: int, entity: str, *fields: str) -> None:
        """Add (sign 1) or subtract (-1) the line of a row of this tenant to the digest."""
        if self._sum is not None:
            line = row_line(entity, self.tenant_id, *fields)
            self._sum = (self._sum + sign * line_value(line)) & MASK

    def _tally_grant(
        self, entity: str, holder: str, old: g.Grant | None, new: g.Grant | None
    ) -> None:
        """Move the digest from assignment row `old` to `new` (None: no row)."""
        if self._sum is None or old == new:
            return
        total = self._sum
        if old is not None:
            total -= line_value(grant_line(entity, self.tenant_id, holder, old))
        if new is not None:
            total += line_value(grant_line(entity, self.tenant_id, holder, new))
        self._sum = total & MASK

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

    # -- users and their direct assignments -------------------------------------------

    def _store_user(
        self, uid: str, status: str | None, grants: g.Grants, groups: tuple[str, ...]
    ) -> None:
        if status is None and not grants and not groups:
            self.users.pop(uid, None)
        else:
            self.users[uid] = (status, grants, groups)

    def _put_user(self, row: AnyRow) -> None:
        uid = intern(row[1])
        status: str = intern(row[2] or "")
        attrs: str | None = row[3] if len(row) > 3 else None
        attrs = EMPTY_ATTRIBUTES if attrs is None else attrs
        users = self.users
        rec = users.get(uid, NO_USER)
        if rec[0] is None:
            self.count["users"] += 1
        if self._sum is not None:
            old_attrs = self.user_attributes.get(uid, EMPTY_ATTRIBUTES)
            if rec[0] is not None and (rec[0] != status or old_attrs != attrs):
                self._tally(-1, "users", uid, rec[0], old_attrs)
            if rec[0] != status or old_attrs != attrs:
                self._tally(1, "users", uid, status, attrs)
        if attrs == EMPTY_ATTRIBUTES:
            if self.user_attributes:
                self.user_attributes.pop(uid, None)
        else:
            self.user_attributes[uid] = attrs
        users[uid] = (status, rec[1], rec[2])

    def _del_user(self, key: tuple[str, ...]) -> None:
        rec = self.users.get(key[1])
        if rec is not None and rec[0] is not None:
            self.count["users"] -= 1
            attrs = self.user_attributes.pop(key[1], EMPTY_ATTRIBUTES)
            self._tally(-1, "users", key[1], rec[0], attrs)
            self._store_user(key[1], None, rec[1], rec[2])

    def _put_user_role(self, row: AnyRow) -> None:
        _, uid, role, scope, expires = row
        uid = intern(uid)
        grant: g.Grant = (
            intern(role), intern(scope), None if expires is None else float(expires)
        )  # fmt: skip
        users = self.users
        rec = users.get(uid, NO_USER)
        grants, old = g.put(rec[1], grant)
        if old is None:
            self.count["user_roles"] += 1
            h.hold(self.user_holders, grant[0], grant[1], uid)
        if self._sum is not None:
            self._tally_grant("user_roles", uid, old, grant)
        users[uid] = (rec[0], grants, rec[2])

    def _del_user_role(self, key: tuple[str, ...]) -> None:
        _, uid, role, scope = key
        rec = self.users.get(uid)
        if rec is not None:
            grants, removed = g.drop(rec[1], role, scope)
            if removed is not None:
                self.count["user_roles"] -= 1
                h.release(self.user_holders, role, scope, uid)
                self._tally_grant("user_roles", uid, removed, None)
                self._store_user(uid, rec[0], grants, rec[2])

    # -- groups, memberships and group assignments ------------------------------------

    def _put_group(self, row: Row) -> None:
        gid = intern(cast(str, row[1]))
        if gid not in self.groups:
            self.groups.add(gid)
            self.count["groups"] += 1
            self._tally(1, "groups", gid)
            index = self.group_grants.get(gid)
            if index is not None:
                self.live_groups[gid] = index

    def _del_group(self, key: tuple[str, ...]) -> None:
        gid = key[1]
        if gid in self.groups:
            self.groups.remove(gid)
            self.count["groups"] -= 1
            self._tally(-1, "groups", gid)
            self.live_groups.pop(gid, None)

    def _put_member(self, row: AnyRow) -> None:
        # A check reads memberships from the member's record; `members` (group -> users)
        # serves the subject search only (a group change never walks its members).
        _, gid, uid = row
        uid = intern(uid)
        users = self.users
        status, grants, groups = users.get(uid, NO_USER)
        if gid not in groups:
            gid = intern(gid)
            self.count["group_members"] += 1
            h.add(self.members, gid, uid)
            if self._sum is not None:
                self._tally(1, "group_members", gid, uid)
            users[uid] = (status, grants, tuple(sorted((*groups, gid))) if groups else (gid,))

    def _del_member(self, key: tuple[str, ...]) -> None:
        _, gid, uid = key
        rec = self.users.get(uid)
        if rec is not None and gid in rec[2]:
            self.count["group_members"] -= 1
            h.remove(self.members, gid, uid)
            self._tally(-1, "group_members", gid, uid)
            self._store_user(uid, rec[0], rec[1], tuple(x for x in rec[2] if x != gid))

    def _put_group_role(self, row: Row) -> None:
        _, gid, role, scope, expires = cast(tuple[str, str, str, str, float | None], row)
        gid = intern(gid)
        grant = (intern(role), intern(scope), None if expires is None else float(expires))
        grants, old = g.put(self.group_grants.get(gid, g.NO_GRANTS), grant)
        if old is None:
            self.count["group_roles"] += 1
            h.hold(self.group_holders, grant[0], grant[1], gid)
        self._tally_grant("group_roles", gid, old, grant)
        self._store_group_grants(gid, grants)

    def _del_group_role(self, key: tuple[str, ...]) -> None:
        _, gid, role, scope = key
        grants, removed = g.drop(self.group_grants.get(gid, g.NO_GRANTS), role, scope)
        if removed is not None:
            self.count["group_roles"] -= 1
            h.release(self.group_holders, role, scope, gid)
            self._tally_grant("group_roles", gid, removed, None)
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
            self._tally(1, "tenants")

    def _del_tenant(self, key: tuple[str, ...]) -> None:
        # The engine drops the whole TenantState on a tenant delete; this is for completeness.
        if self.exists:
            self.exists = False
            self.count["tenants"] = 0
            self._tally(-1, "tenants")

    def _role_row(self, entity: str, changed: bool, sign: int, *fields: str) -> None:
        if changed:
            self.count[entity] += sign
            self._tally(sign, entity, *fields)

    def _put_role(self, row: Row) -> None:
        role = intern(cast(str, row[1]))
        self._role_row("roles", self.roles.add_role(role), 1, role)

    def _del_role(self, key: tuple[str, ...]) -> None:
        self._role_row("roles", self.roles.remove_role(key[1]), -1, key[1])

    def _put_inherit(self, row: Row) -> None:
        _, role, inherits = cast(tuple[str, str, str], row)
        role, inherits = intern(role), intern(inherits)
        self._role_row("role_inherits", self.roles.add_edge(role, inherits), 1, role, inherits)

    def _del_inherit(self, key: tuple[str, ...]) -> None:
        changed = self.roles.remove_edge(key[1], key[2])
        self._role_row("role_inherits", changed, -1, key[1], key[2])

    def _put_perm(self, row: Row) -> None:
        role, perm = intern(cast(str, row[1])), intern(cast(str, row[2]))
        condition = cast(str | None, row[3]) if len(row) > 3 else None
        held, old = self.roles.condition_of(role, perm)
        if held and old == condition:
            return
        self.roles.add_perm(role, perm, condition)
        if held:
            self._tally(-1, "role_permissions", role, perm, old or "")
        else:
            self.count["role_permissions"] += 1
        self._tally(1, "role_permissions", role, perm, condition or "")

    def _del_perm(self, key: tuple[str, ...]) -> None:
        held, old = self.roles.condition_of(key[1], key[2])
        if held:
            self.roles.remove_perm(key[1], key[2])
            self.count["role_permissions"] -= 1
            self._tally(-1, "role_permissions", key[1], key[2], old or "")

    # -- the resource inventory -------------------------------------------------------

    def _put_resource(self, row: Row) -> None:
        rtype, rid = intern(cast(str, row[1])), cast(str, row[2])
        attrs = cast(str | None, row[3]) if len(row) > 3 else None
        attrs = EMPTY_ATTRIBUTES if attrs is None else attrs
        of_type = self.resources.setdefault(rtype, {})
        old = of_type.get(rid)
        if old == attrs:
            return
        if old is None:
            self.count["resources"] += 1
        else:
            self._tally(-1, "resources", rtype, rid, old)
        self._tally(1, "resources", rtype, rid, attrs)
        of_type[rid] = EMPTY_ATTRIBUTES if attrs == EMPTY_ATTRIBUTES else attrs

    def _del_resource(self, key: tuple[str, ...]) -> None:
        of_type = self.resources.get(key[1])
        old = None if of_type is None else of_type.pop(key[2], None)
        if old is not None:
            self.count["resources"] -= 1
            self._tally(-1, "resources", key[1], key[2], old)
            if not of_type:
                del self.resources[key[1]]

    def resource_attributes(self, rtype: str, rid: str) -> str | None:
        """The inventory's attributes (JSON text) of a resource; None when not listed."""
        of_type = self.resources.get(rtype)
        return None if of_type is None else of_type.get(rid)


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
    "resources": TenantState._put_resource,
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
    "resources": TenantState._del_resource,
}


def upserter(entity: str) -> Callable[[TenantState, Row], None]:
    """The upsert function for one entity (lets a bulk load skip a lookup per row)."""
    return _UPSERT[entity]
