"""Reverse indexes for the subject search: who holds an assignment, who is in a group.

`Holders` maps role -> scope -> the ids (users or groups) holding that (role, scope)
assignment; `Ids` maps a key (a group) to the ids under it (its members). A value is
the single id itself while there is one, then a dict of ids to None: most
resource-scoped assignments have one holder, and an str-keyed dict costs 16 bytes
per id and about 180 for a small one (a set: 16 per slot at a lower fill, 216 empty).

Rows are unique per (holder, role, scope) and per (group, member), so the tenant
calls `hold` once when a row appears and `release` once when it goes: each is O(1).
Ids stored here must be the same objects the tenant keeps (interned), so that the
index costs pointers, not copies of strings.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

IdSet = str | dict[str, None]
Ids = dict[str, IdSet]
Holders = dict[str, Ids]


def add(ids: Ids, key: str, who: str) -> None:
    """Put `who` under `key`."""
    held = ids.get(key)
    if held is None:
        ids[key] = who
    elif isinstance(held, str):
        if held != who:
            ids[key] = {held: None, who: None}
    else:
        held[who] = None


def remove(ids: Ids, key: str, who: str) -> None:
    """Take `who` from under `key` (nothing if absent); drop the key when it empties."""
    held = ids.get(key)
    if held is None:
        return
    if isinstance(held, str):
        if held == who:
            del ids[key]
        return
    held.pop(who, None)
    if len(held) == 1:
        ids[key] = next(iter(held))


def hold(index: Holders, role: str, scope: str, who: str) -> None:
    """Record that `who` holds (role, scope)."""
    by_scope = index.get(role)
    if by_scope is None:
        index[role] = {scope: who}
    else:
        add(by_scope, scope, who)


def release(index: Holders, role: str, scope: str, who: str) -> None:
    """Record that `who` no longer holds (role, scope)."""
    by_scope = index.get(role)
    if by_scope is not None:
        remove(by_scope, scope, who)
        if not by_scope:
            del index[role]


def merge(ids: Ids, other: Ids) -> None:
    """Put every id under each key of `other` under that key of `ids` too (`other`'s id
    sets may be taken over, not copied: `other` is not to be used after)."""
    for key, theirs in other.items():
        mine = ids.get(key)
        if mine is None:
            ids[key] = theirs
        elif isinstance(mine, str):
            if isinstance(theirs, str):
                if theirs != mine:
                    ids[key] = {mine: None, theirs: None}
            else:
                joined = {mine: None}
                joined.update(theirs)
                ids[key] = joined
        elif isinstance(theirs, str):
            mine[theirs] = None
        else:
            mine.update(theirs)


def merge_holders(index: Holders, other: Holders) -> None:
    """`merge` for every role of `other` (whose dicts may be taken over)."""
    for role, by_scope in other.items():
        mine = index.get(role)
        if mine is None:
            index[role] = by_scope
        else:
            merge(mine, by_scope)


def pools(index: Holders, roles: Iterable[str], scopes: Iterable[str]) -> list[IdSet]:
    """The id sets of whoever holds one of `roles` at one of `scopes` (distinct scopes)."""
    out: list[IdSet] = []
    for role in roles:
        by_scope = index.get(role)
        if by_scope is not None:
            out.extend(held for scope in scopes if (held := by_scope.get(scope)) is not None)
    return out


def size(found: Iterable[IdSet]) -> int:
    """How many ids the sets hold together, counting an id once per set."""
    return sum(1 if isinstance(held, str) else len(held) for held in found)


def distinct(found: Iterable[IdSet]) -> Iterator[str]:
    """Every id of the sets once, lazily (the order of first appearance)."""
    seen: set[str] = set()
    for held in found:
        for who in (held,) if isinstance(held, str) else held:
            if who not in seen:
                seen.add(who)
                yield who


def union(found: Iterable[IdSet]) -> set[str]:
    """Every id of the sets (set updates run in C: no Python work per id)."""
    out: set[str] = set()
    for held in found:
        if isinstance(held, str):
            out.add(held)
        else:
            out.update(held)
    return out
