"""One tenant's roles, their inheritance and their transitive permission sets.

Raw rows are kept as given (edges and permissions may name roles that do not exist);
`closure[role]` is kept for existing roles only and holds every permission of the role
and of each existing role it reaches through inheritance edges between existing roles.
Edges to a missing role are ignored; a cycle is tolerated (each role is visited once).

A conditional grant (role_permissions.condition not NULL) is kept apart: `perms` and
`closure` hold unconditional permissions only, so a check that an unconditional grant
decides never looks at a condition. `conds[role][perm]` is the role's own conditional
grant and `cond_closure[role]` every conditional grant the role reaches, as
`(holder, perm, Condition)` sorted by distance, then holder, then permission. A
permission both held unconditionally and conditionally is simply granted.
"""

from __future__ import annotations

from collections import deque

from pdp.conditions import Condition, compile_condition

CondGrant = tuple[str, str, Condition]


class _CycleError(Exception):
    """Inheritance has a cycle: memoised closure is not valid, use plain reachability."""


class RoleGraph:
    """Roles, role_inherits and role_permissions of one tenant.

    Mutators record which roles changed and return whether anything did; `settle()`
    then recomputes the closure of exactly the roles that reach a changed role.
    """

    __slots__ = (
        "_dirty",
        "_holder_paths",
        "_paths",
        "closure",
        "cond_closure",
        "conds",
        "edges",
        "parents",
        "perms",
        "roles",
    )

    def __init__(self) -> None:
        self.roles: set[str] = set()
        self.perms: dict[str, set[str]] = {}
        self.conds: dict[str, dict[str, Condition]] = {}
        self.cond_closure: dict[str, tuple[CondGrant, ...]] = {}
        self.edges: dict[str, set[str]] = {}
        self.parents: dict[str, set[str]] = {}
        self.closure: dict[str, frozenset[str]] = {}
        self._dirty: set[str] = set()
        self._paths: dict[tuple[str, str], tuple[str, ...]] = {}
        self._holder_paths: dict[tuple[str, str], tuple[str, ...]] = {}

    def add_role(self, role: str) -> bool:
        return self._changed(role, _add(self.roles, role))

    def remove_role(self, role: str) -> bool:
        return self._changed(role, _discard(self.roles, role))

    def add_perm(self, role: str, perm: str, condition: str | None = None) -> bool:
        """Hold `perm` on `role`, unconditionally or under `condition` (replacing the other)."""
        if condition is None:
            dropped = self._drop_cond(role, perm)
            return self._changed(role, _add(self.perms.setdefault(role, set()), perm) or dropped)
        held = self.conds.get(role, {}).get(perm)
        if held is not None and held.text == condition:
            return False
        self.conds.setdefault(role, {})[perm] = compile_condition(condition)
        _remove_from(self.perms, role, perm)
        return self._changed(role, True)

    def remove_perm(self, role: str, perm: str) -> bool:
        dropped = self._drop_cond(role, perm)
        return self._changed(role, _remove_from(self.perms, role, perm) or dropped)

    def condition_of(self, role: str, perm: str) -> tuple[bool, str | None]:
        """Whether the role holds `perm` itself, and under which condition (None: none)."""
        held = self.conds.get(role, {}).get(perm)
        if held is not None:
            return True, held.text
        return perm in self.perms.get(role, ()), None

    def _drop_cond(self, role: str, perm: str) -> bool:
        held = self.conds.get(role)
        if held is None or perm not in held:
            return False
        del held[perm]
        if not held:
            del self.conds[role]
        return True

    def add_edge(self, role: str, inherits: str) -> bool:
        self.parents.setdefault(inherits, set()).add(role)
        return self._changed(role, _add(self.edges.setdefault(role, set()), inherits))

    def remove_edge(self, role: str, inherits: str) -> bool:
        _remove_from(self.parents, inherits, role)
        return self._changed(role, _remove_from(self.edges, role, inherits))

    def _changed(self, role: str, changed: bool) -> bool:
        if changed:
            self._dirty.add(role)
        return changed

    def settle(self) -> bool:
        """Recompute closures reached by the changes since the last settle.

        Cost is the changed roles' ancestors and what they reach, not the tenant.
        Returns whether any role had changed (cached paths are then dropped).
        """
        if not self._dirty:
            return False
        affected = self._ancestors(self._dirty)
        self._dirty = set()
        self._paths.clear()
        self._holder_paths.clear()
        try:
            fresh = self._memo_closures(affected)
        except _CycleError:
            fresh = {r: self._reach_closure(r, affected) for r in affected if r in self.roles}
        for role in affected:
            if role in fresh:
                self.closure[role] = fresh[role]
            else:
                self.closure.pop(role, None)
        self._settle_conditions(affected)
        return True

    def _settle_conditions(self, affected: set[str]) -> None:
        # Conditional grants are few: a breadth-first walk per affected role, skipped
        # entirely while the tenant has none.
        if not self.conds:
            self.cond_closure.clear()
            return
        for role in affected:
            found = self._reach_conditions(role) if role in self.roles else ()
            if found:
                self.cond_closure[role] = found
            else:
                self.cond_closure.pop(role, None)

    def _reach_conditions(self, role: str) -> tuple[CondGrant, ...]:
        out: list[tuple[int, str, str, Condition]] = []
        seen = {role}
        level = [role]
        depth = 0
        while level:
            following = []
            for node in level:
                for perm, condition in self.conds.get(node, {}).items():
                    out.append((depth, node, perm, condition))
                for child in self._children(node):
                    if child not in seen:
                        seen.add(child)
                        following.append(child)
            level = following
            depth += 1
        out.sort(key=lambda item: item[:3])
        return tuple((holder, perm, cond) for _, holder, perm, cond in out)

    def _ancestors(self, roles: set[str]) -> set[str]:
        seen = set(roles)
        todo = list(roles)
        while todo:
            for parent in self.parents.get(todo.pop(), ()):
                if parent not in seen:
                    seen.add(parent)
                    todo.append(parent)
        return seen

    def _children(self, role: str) -> list[str]:
        return [c for c in self.edges.get(role, ()) if c in self.roles]

    def _memo_closures(self, affected: set[str]) -> dict[str, frozenset[str]]:
        # Iterative post-order DFS; unaffected children keep their (still exact) closure.
        out: dict[str, frozenset[str]] = {}
        for start in affected:
            if start in out or start not in self.roles:
                continue
            stack = [(start, iter(self._children(start)))]
            on_stack = {start}
            while stack:
                node, children = stack[-1]
                child = next(children, None)
                if child is None:
                    stack.pop()
                    on_stack.discard(node)
                    out[node] = self._union(node, out)
                elif child in on_stack:
                    raise _CycleError
                elif child in affected and child not in out:
                    on_stack.add(child)
                    stack.append((child, iter(self._children(child))))
        return out

    def _union(self, role: str, fresh: dict[str, frozenset[str]]) -> frozenset[str]:
        acc = set(self.perms.get(role, ()))
        for child in self._children(role):
            acc |= fresh[child] if child in fresh else self.closure[child]
        return frozenset(acc)

    def _reach_closure(self, role: str, affected: set[str]) -> frozenset[str]:
        acc: set[str] = set()
        seen = {role}
        todo = [role]
        while todo:
            node = todo.pop()
            if node not in affected:
                acc |= self.closure[node]
                continue
            acc |= self.perms.get(node, set())
            for child in self._children(node):
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
        return frozenset(acc)

    def path(self, role: str, perm: str) -> tuple[str, ...]:
        """Shortest inheritance chain from `role` to a role holding `perm` itself.

        Ties go to the chain found first when children are visited in sorted order.
        Cached until the next settle that changed something.
        """
        key = (role, perm)
        found = self._paths.get(key)
        if found is None:
            found = self._search(role, perm)
            self._paths[key] = found
        return found

    def path_to(self, role: str, holder: str) -> tuple[str, ...]:
        """Shortest inheritance chain from `role` down to `holder` (children in sorted order).

        Cached until the next settle that changed something.
        """
        key = (role, holder)
        found = self._holder_paths.get(key)
        if found is None:
            found = self._search(role, holder, to_role=True)
            self._holder_paths[key] = found
        return found

    def _search(self, role: str, perm: str, *, to_role: bool = False) -> tuple[str, ...]:
        came_from: dict[str, str | None] = {role: None}
        queue = deque([role])
        while queue:
            node = queue.popleft()
            if (node == perm) if to_role else (perm in self.perms.get(node, ())):
                chain = [node]
                while (prev := came_from[chain[-1]]) is not None:
                    chain.append(prev)
                return tuple(reversed(chain))
            for child in sorted(self._children(node)):
                if child not in came_from:
                    came_from[child] = node
                    queue.append(child)
        return (role,)


def _add(items: set[str], item: str) -> bool:
    if item in items:
        return False
    items.add(item)
    return True


def _discard(items: set[str], item: str) -> bool:
    if item not in items:
        return False
    items.remove(item)
    return True


def _remove_from(mapping: dict[str, set[str]], key: str, item: str) -> bool:
    items = mapping.get(key)
    if items is None or item not in items:
        return False
    items.remove(item)
    if not items:
        del mapping[key]
    return True
