"""Assignments (user_roles / group_roles rows) held in the shape a check scans fastest.

A grant is the tuple `(role_id, scope, expires_at)`. A holder's grants are either a
tuple sorted by `grant_order` (up to `SMALL` of them, scanned linearly: most users
have a handful) or a `ScopeIndex` mapping scope to grants sorted by role (many
resource-scoped assignments, looked up by the three scopes a check can match).
Tuples are immutable and may be shared between holders; a ScopeIndex belongs to one
holder and is changed in place.
"""

from __future__ import annotations

from collections.abc import Iterator

Grant = tuple[str, str, float | None]
ScopeIndex = dict[str, tuple[Grant, ...]]
Grants = tuple[Grant, ...] | ScopeIndex

SMALL = 8
NO_GRANTS: tuple[Grant, ...] = ()


def scope_rank(scope: str) -> int:
    """0 for one resource (`type:id`), 1 for a whole type (`type:*`), 2 for the tenant (`*`)."""
    if scope == "*":
        return 2
    return 1 if scope.endswith(":*") else 0


def grant_order(grant: Grant) -> tuple[int, str, str]:
    """Narrowest scope first, then role id: the order in which a grant is reported."""
    return (scope_rank(grant[1]), grant[0], grant[1])


def put(grants: Grants, grant: Grant) -> tuple[Grants, Grant | None]:
    """`grants` with `grant` replacing any grant of the same (role, scope).

    Returns the new holder value and the grant it replaced (None when the
    (role, scope) was new).
    """
    if not grants:  # the common first grant (an empty ScopeIndex never stays held)
        return (grant,), None
    if isinstance(grants, dict):
        return grants, index_put(grants, grant)
    role, scope = grant[0], grant[1]
    for i, held in enumerate(grants):
        if held[0] == role and held[1] == scope:  # same key, same place in the order
            return (*grants[:i], grant, *grants[i + 1 :]), held
    if len(grants) >= SMALL:
        index: ScopeIndex = {}
        for held in (*grants, grant):
            index_put(index, held)
        return index, None
    # Insert in order (keys are distinct per (role, scope)): no sort, no list.
    key = grant_order(grant)
    for i, held in enumerate(grants):
        if key < grant_order(held):
            return (*grants[:i], grant, *grants[i:]), None
    return (*grants, grant), None


def drop(grants: Grants, role: str, scope: str) -> tuple[Grants, Grant | None]:
    """`grants` without the (role, scope) grant, and that grant (None if there was none)."""
    if isinstance(grants, dict):
        removed = index_drop(grants, role, scope)
        return (grants if grants else NO_GRANTS), removed
    kept = []
    removed = None
    for held in grants:
        if held[0] == role and held[1] == scope:
            removed = held
        else:
            kept.append(held)
    return (grants if removed is None else tuple(kept)), removed


def index_put(index: ScopeIndex, grant: Grant) -> Grant | None:
    """Put `grant` into `index` in place; return the grant it replaced, if any."""
    role, scope = grant[0], grant[1]
    old = None
    kept = []
    for held in index.get(scope, NO_GRANTS):
        if held[0] == role:
            old = held
        else:
            kept.append(held)
    kept.append(grant)
    kept.sort(key=grant_order)
    index[scope] = tuple(kept)
    return old


def index_drop(index: ScopeIndex, role: str, scope: str) -> Grant | None:
    """Remove the (role, scope) grant from `index` in place; return it, if there was one."""
    current = index.get(scope)
    if not current:
        return None
    removed = None
    kept = []
    for held in current:
        if held[0] == role:
            removed = held
        else:
            kept.append(held)
    if kept:
        index[scope] = tuple(kept)
    else:
        del index[scope]
    return removed


def candidates(grants: Grants, one: str, whole_type: str) -> tuple[Grant, ...] | list[Grant]:
    """The grants that may match scopes `one` / `whole_type` / `*`, in grant_order.

    A tuple holder is returned whole (the caller filters by scope while scanning).
    """
    if not isinstance(grants, dict):
        return grants
    out = list(grants.get(one, NO_GRANTS))
    if whole_type != one:
        out.extend(grants.get(whole_type, NO_GRANTS))
    out.extend(grants.get("*", NO_GRANTS))
    return out


def iter_grants(grants: Grants) -> Iterator[Grant]:
    """Every grant of a holder, in no particular order."""
    if isinstance(grants, dict):
        for bucket in grants.values():
            yield from bucket
    else:
        yield from grants


def count(grants: Grants) -> int:
    """How many grants a holder has."""
    if isinstance(grants, dict):
        return sum(len(bucket) for bucket in grants.values())
    return len(grants)
