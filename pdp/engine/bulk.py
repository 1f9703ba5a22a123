"""Bulk upserts of a loading tenant's user rows: the loops `Loader` runs, no call per row.

The users, group_members and user_roles tables are nearly all of a big tenant's rows
(3.5 M of 3.6 M at 1,000,000 users). `TenantState.upsert` pays per row a dispatch, a
digest tally and calls into `pdp.engine.grants` and `pdp.engine.holders`; these loops
do the same upserts inline on a tenant that is `loading` and leave exactly the state
`upsert` would leave, order of insertion included. Rows may come in any order and
repeat keys, as for `upsert`.

Each loop also sums the digest lines (`pdp.engine.digest`) of the rows it adds into
a `Tally`, while a row's fields are at hand (a pass over the built users afterwards
cost 2-3x as much per line: its objects are scattered in memory). A row that replaces
one already held marks the tally `replaced`: the load then sums every row once at
its end instead.

Equal values are made once per load and shared (`Shared`): a grant, the one-grant and
one-group tuples most users hold, and attributes texts. (A pass after the load that
shared equal grants and user records took 4-5 s at 1,000,000 users; sharing as the
rows arrive, it would free 4,000 of 5.6 M blocks.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from sys import intern
from typing import Any

from pdp.engine import grants as g
from pdp.engine import holders as h
from pdp.engine.digest import FIRST_64, md5
from pdp.engine.tenant import EMPTY_ATTRIBUTES, TenantState

AnyRow = tuple[Any, ...]  # as in tenant.py: no typing.cast call per row


class Shared:
    """Canonical values of one load (see the module docstring).

    `one_grant` maps a grant to the one-grant tuple of its canonical grant, so one
    lookup by a row's fields finds both.
    """

    __slots__ = ("one_grant", "one_group", "texts")

    def __init__(self) -> None:
        self.one_grant: dict[g.Grant, tuple[g.Grant]] = {}
        self.one_group: dict[str, tuple[str]] = {}
        self.texts: dict[str, str] = {}


class Tally:
    """Sum and count of the digest lines of the user rows a load added to one tenant."""

    __slots__ = ("lines", "replaced", "total")

    def __init__(self) -> None:
        self.total = 0
        self.lines = 0
        self.replaced = False


def add_users(state: TenantState, rows: Iterable[AnyRow], shared: Shared, tally: Tally) -> None:
    """`state.upsert("users", row)` for each row."""
    users = state.users
    attributes = state.user_attributes
    texts = shared.texts
    first, t = FIRST_64, state.tenant_id
    added = lines = total = 0
    for row in rows:
        uid = intern(row[1])
        status = intern(row[2] or "")
        attrs = row[3] if len(row) > 3 else None
        if attrs is None:
            attrs = EMPTY_ATTRIBUTES
        rec = users.get(uid)
        if rec is None:
            users[uid] = (status, g.NO_GRANTS, ())
            added += 1
        else:
            if rec[0] is None:
                added += 1
            else:
                tally.replaced = True
            users[uid] = (status, rec[1], rec[2])
        lines += 1
        total += first(md5(f"users|{t}|{uid}|{status}|{attrs}".encode()).digest())[0]
        if attrs == EMPTY_ATTRIBUTES:
            if attributes:
                attributes.pop(uid, None)
        else:
            attributes[uid] = texts.setdefault(attrs, attrs)
    state.count["users"] += added
    tally.total += total
    tally.lines += lines


def add_members(state: TenantState, rows: Iterable[AnyRow], shared: Shared, tally: Tally) -> None:
    """`state.upsert("group_members", row)` for each row."""
    users = state.users
    members = state.members
    one = shared.one_group
    first, t = FIRST_64, state.tenant_id
    added = total = 0
    for _, group, member in rows:
        uid = intern(member)
        rec = users.get(uid)
        groups = () if rec is None else rec[2]
        if group in groups:
            continue  # the same row again: nothing to replace
        gid = intern(group)
        if groups:
            joined = tuple(sorted((*groups, gid)))
        else:
            joined = one.get(gid) or one.setdefault(gid, (gid,))
        users[uid] = (None, g.NO_GRANTS, joined) if rec is None else (rec[0], rec[1], joined)
        added += 1
        total += first(md5(f"group_members|{t}|{gid}|{uid}".encode()).digest())[0]
        held = members.get(gid)  # holders.add, inline
        if held is None:
            members[gid] = uid
        elif held.__class__ is str:
            if held != uid:
                members[gid] = {held: None, uid: None}
        else:
            held[uid] = None  # type: ignore[index]
    state.count["group_members"] += added
    tally.total += total
    tally.lines += added


def add_user_roles(
    state: TenantState, rows: Iterable[AnyRow], shared: Shared, tally: Tally
) -> None:
    """`state.upsert("user_roles", row)` for each row."""
    users = state.users
    index = state.user_holders
    one = shared.one_grant
    first, t = FIRST_64, state.tenant_id
    added = total = 0
    for _, user, role_id, scope_id, expires in rows:
        uid = intern(user)
        exp = None if expires is None else float(expires)
        fields = (role_id, scope_id, exp)
        single = one.get(fields)
        if single is None:
            grant = (intern(role_id), intern(scope_id), exp)
            single = one[grant] = (grant,)
        grant = single[0]
        rec = users.get(uid)
        held = g.NO_GRANTS if rec is None else rec[1]
        if held:
            assert rec is not None
            put, old = g.put(held, grant)
            users[uid] = (rec[0], put, rec[2])
            if old is not None:
                tally.replaced = True
                continue
        else:
            users[uid] = (None, single, ()) if rec is None else (rec[0], single, rec[2])
        added += 1
        role, scope = grant[0], grant[1]
        when = "" if exp is None else round(exp * 1_000_000)
        total += first(md5(f"user_roles|{t}|{uid}|{role}|{scope}|{when}".encode()).digest())[0]
        by_scope = index.get(role)  # holders.hold, inline
        if by_scope is None:
            index[role] = {scope: uid}
            continue
        who = by_scope.get(scope)
        if who is None:
            by_scope[scope] = uid
        elif who.__class__ is str:
            if who != uid:
                by_scope[scope] = {who: None, uid: None}
        else:
            who[uid] = None  # type: ignore[index]
    state.count["user_roles"] += added
    tally.total += total
    tally.lines += added


USER_ENTITIES = ("users", "group_members", "user_roles")


def absorb(state: TenantState, part: TenantState, tally: Tally) -> None:
    """Add to `state` the user rows `part` holds: a load of other users of the tenant.

    `part` holds the users, memberships and direct assignments of users `state` holds
    no row of (a part of a load split by user id, `sync.pg_load`), and no other rows;
    ValueError otherwise, `state` then left partly merged (the load is to be dropped).
    Costs a dict update for the users, and a step per group and per (role, scope) for
    the reverse indexes: the rows themselves are not upserted again. `part`'s containers
    are taken over: it is not to be used after.
    """
    if any(part.count[entity] for entity in part.count if entity not in USER_ENTITIES):
        raise ValueError(f"tenant {state.tenant_id}: a part holds rows other than users'")
    held = len(state.users)
    state.users.update(part.users)
    if len(state.users) != held + len(part.users):  # a free test of disjointness
        raise ValueError(f"tenant {state.tenant_id}: a part holds users this load holds too")
    state.user_attributes.update(part.user_attributes)
    h.merge(state.members, part.members)
    h.merge_holders(state.user_holders, part.user_holders)
    lines = 0
    for entity in USER_ENTITIES:
        state.count[entity] += part.count[entity]
        lines += part.count[entity]
    tally.total += part.running_sum()
    tally.lines += lines


BULK: dict[str, Callable[[TenantState, Iterable[AnyRow], Shared, Tally], None]] = {
    "users": add_users,
    "group_members": add_members,
    "user_roles": add_user_roles,
}
