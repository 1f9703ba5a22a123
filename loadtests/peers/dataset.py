"""The comparison's dataset, queries, reference rule and agreement check: pure, in memory.

`generate` turns one tenant of pdp's synthetic seed generator (`pdp.pg.seed_data`, the
rows `pdp seed` loads) into lookup tables every peer encoder reads, plus the same
rows in pdp's engine format. `make_queries` draws checks over real users and the
seed's resource id space, half of them on a resource the user holds a scoped
assignment on. `reference` is the rule of DESIGN.md section 2 written the naive way
(loops, no indexes), `expiry_dependent` marks the queries whose answer depends on an
assignment's expiry (the query set a peer without expiry cannot be held to), and
`check_agreement` runs one engine over the queries against the expected answers.

No peer is imported here: the tests cover this module without them installed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time
from functools import cached_property
from typing import Literal

from pdp.engine import COLUMNS, Row
from pdp.engine.rows import Field
from pdp.pg import seed_data

TENANT_PREFIX = "peers"
TENANT = f"{TENANT_PREFIX}-1"
UNKNOWN_EVERY = 100  # one query in this many names a user that does not exist

# (role, scope, expires_at epoch seconds or None)
Grant = tuple[str, str, float | None]
# An assignment a user holds: (role, scope, expires_at, the group it came through or None)
Held = tuple[str, str, float | None, str | None]
Expiry = Literal["respect", "drop", "ignore"]


@dataclass(frozen=True, slots=True)
class Query:
    """May `user` do `action` on the resource `rtype`:`rid`? (one tenant)."""

    user: str
    rtype: str
    rid: str
    action: str

    @property
    def permission(self) -> str:
        return f"{self.rtype}:{self.action}"

    def scopes(self) -> tuple[str, str, str]:
        """The assignment scopes that reach this resource, narrowest first."""
        return (f"{self.rtype}:{self.rid}", f"{self.rtype}:*", "*")

    def wanted(self) -> tuple[str, str, str, str]:
        """The permissions that match this action on this type (wildcards included)."""
        return (self.permission, f"{self.rtype}:*", f"*:{self.action}", "*:*")


@dataclass(frozen=True, slots=True)
class Path:
    """One way a query is granted: an assignment (direct or through `group`) of
    `role` at `scope`, and the role `holder` (reached from `role` by inheritance)
    that holds `permission` itself."""

    role: str
    scope: str
    group: str | None
    holder: str
    permission: str
    expires: float | None


@dataclass(eq=False)
class Dataset:
    """One tenant's RBAC data as lookup tables (every role and user is a key)."""

    tenant: str
    now: float  # the decision time every engine is asked at (the seed's `as_of`)
    resource_ids: int  # scoped ids are 1 .. resource_ids - 1 for every type
    types: tuple[str, ...]
    actions: tuple[str, ...]
    active: dict[str, bool]  # user -> status is 'active'
    groups_of: dict[str, tuple[str, ...]]  # user -> the groups it is a member of
    user_roles: dict[str, tuple[Grant, ...]]  # user -> its direct assignments
    group_roles: dict[str, tuple[Grant, ...]]  # group -> its assignments
    inherits: dict[str, tuple[str, ...]]  # role -> the roles it inherits directly
    grants: dict[str, tuple[str, ...]]  # role -> the permissions it holds itself
    rows: dict[str, list[Row]] = field(repr=False)  # pdp's engine rows

    @cached_property
    def reach(self) -> dict[str, frozenset[str]]:
        """role -> itself and every role it inherits, transitively."""
        out: dict[str, frozenset[str]] = {}

        def visit(role: str, seen: frozenset[str]) -> frozenset[str]:
            if role in out:
                return out[role]
            found = {role}
            for parent in self.inherits.get(role, ()):
                if parent not in seen:
                    found |= visit(parent, seen | {role})
            out[role] = frozenset(found)
            return out[role]

        for role in self.grants:
            visit(role, frozenset())
        return out

    @cached_property
    def inheritors(self) -> dict[str, tuple[str, ...]]:
        """role -> every role whose holders get its grants (itself included), sorted."""
        out: dict[str, list[str]] = {role: [] for role in self.grants}
        for role, reached in self.reach.items():
            for target in reached:
                out[target].append(role)
        return {role: tuple(sorted(roles)) for role, roles in out.items()}

    def assignments(self, user: str) -> list[Held]:
        """(role, scope, expires_at, group or None) of the user, direct then by group."""
        out: list[Held] = [(r, s, e, None) for r, s, e in self.user_roles.get(user, ())]
        for group in self.groups_of.get(user, ()):
            out += [(r, s, e, group) for r, s, e in self.group_roles.get(group, ())]
        return out

    def scoped_resources(self, user: str) -> list[tuple[str, str]]:
        """(type, id) of the resources the user's `type:id` assignments name."""
        found = set()
        for _, scope, _, _ in self.assignments(user):
            rtype, _, rid = scope.partition(":")
            if rid and rid != "*":
                found.add((rtype, rid))
        return sorted(found)


def _field(value: seed_data.Value, shift: float) -> Field:
    return value.timestamp() + shift if isinstance(value, datetime) else value


def generate(users: int, seed: int = 1, now: float | None = None) -> Dataset:
    """One tenant of `seed_data.synthetic` with `users` users (deterministic).

    The seed dates expiries around its `as_of` (expired ones at least an hour before,
    the others at least a day after); `now` moves them, and the decision time, so
    that `as_of` falls on `now`: every answer stays the same, and an engine that
    reads the wall clock (pdp's HTTP API) agrees for the next hour.
    """
    spec = seed_data.SeedSpec(users=users, seed=seed, tenant_prefix=TENANT_PREFIX)
    as_of = datetime.combine(spec.as_of, time(), UTC).timestamp()
    shift = 0.0 if now is None else now - as_of
    tables = seed_data.synthetic(spec).tables(TENANT)
    rows: dict[str, list[Row]] = {}
    for table, produced in tables.items():
        width = len(COLUMNS[table])
        rows[table] = [tuple(_field(v, shift) for v in row[:width]) for row in produced]
    return from_rows(TENANT, as_of + shift, rows, max(100, users // 5))


def from_rows(
    tenant: str,
    now: float,
    rows: dict[str, list[Row]],
    resource_ids: int,
    types: tuple[str, ...] = seed_data.RESOURCE_TYPES,
    actions: tuple[str, ...] = seed_data.ACTIONS,
) -> Dataset:
    """The lookup tables of one tenant's rows in pdp's engine format (`COLUMNS`)."""
    grants: dict[str, list[str]] = {str(r[1]): [] for r in rows["roles"]}
    inherits: dict[str, list[str]] = {role: [] for role in grants}
    for _, role, permission in rows["role_permissions"]:
        grants[str(role)].append(str(permission))
    for _, role, parent in rows["role_inherits"]:
        inherits[str(role)].append(str(parent))
    groups_of: dict[str, list[str]] = {}
    for _, group, user in rows["group_members"]:
        groups_of.setdefault(str(user), []).append(str(group))
    return Dataset(
        tenant=tenant,
        now=now,
        resource_ids=resource_ids,
        types=types,
        actions=actions,
        active={str(r[1]): r[2] == "active" for r in rows["users"]},
        groups_of={u: tuple(sorted(g)) for u, g in groups_of.items()},
        user_roles=_by_holder(rows["user_roles"]),
        group_roles=_by_holder(rows["group_roles"]),
        inherits={r: tuple(sorted(p)) for r, p in inherits.items()},
        grants={r: tuple(sorted(p)) for r, p in grants.items()},
        rows=rows,
    )


def _by_holder(rows: Iterable[Row]) -> dict[str, tuple[Grant, ...]]:
    out: dict[str, list[Grant]] = {}
    for _, holder, role, scope, expires in rows:
        expiry = None if expires is None else float(expires)
        out.setdefault(str(holder), []).append((str(role), str(scope), expiry))
    return {holder: tuple(grants) for holder, grants in out.items()}


def make_queries(data: Dataset, count: int, seed: int = 7) -> list[Query]:
    """`count` checks: users drawn uniformly (one in `UNKNOWN_EVERY` unknown), even
    draws on a resource the user holds a scoped assignment on when it holds one, the
    rest on a random resource of the seed's log-uniform id space; actions uniform."""
    rng = random.Random(seed)
    users = sorted(data.active)
    out = []
    for i in range(count):
        user = f"unknown-{i}" if i % UNKNOWN_EVERY == UNKNOWN_EVERY - 1 else rng.choice(users)
        held = data.scoped_resources(user)
        if i % 2 == 0 and held:
            rtype, rid = rng.choice(held)
        else:
            rtype = rng.choice(data.types)
            rid = str(int(data.resource_ids ** rng.random()))
        out.append(Query(user, rtype, rid, rng.choice(data.actions)))
    return out


def paths(data: Dataset, query: Query, expiry: Expiry = "respect") -> list[Path]:
    """Every way the query is granted (empty: denied), by the rule read literally.

    `expiry`: "respect" compares `expires_at > now` as pdp does, "drop" treats
    every expiring assignment as absent, "ignore" as never expiring.
    """
    if not data.active.get(query.user, False):
        return []
    scopes, wanted = set(query.scopes()), query.wanted()
    found: list[Path] = []
    for role, scope, expires, group in data.assignments(query.user):
        if scope not in scopes or not _live(expires, data.now, expiry):
            continue
        found.extend(
            Path(role, scope, group, holder, permission, expires)
            for holder in sorted(data.reach[role])
            for permission in wanted
            if permission in data.grants[holder]
        )
    return found


def _live(expires: float | None, now: float, expiry: Expiry) -> bool:
    if expires is None or expiry == "ignore":
        return True
    return expiry == "respect" and expires > now


def reference(data: Dataset, query: Query) -> bool:
    """The expected decision: some path grants it."""
    return bool(paths(data, query))


def expiry_dependent(data: Dataset, query: Query) -> bool:
    """Whether the answer changes between "no expiring assignment exists" and "none
    ever expires": only then can an engine without expiry answer it wrongly."""
    return bool(paths(data, query, "drop")) != bool(paths(data, query, "ignore"))


def features(data: Dataset, query: Query) -> frozenset[str]:
    """What the grants of an allowed query go through (any of its paths): `group`,
    `inherited`, `scope:*`, `scope:type`, `scope:id`, `wildcard permission`,
    `expiring`; denied queries: `deny` plus `disabled` or `unknown user`."""
    if query.user not in data.active:
        return frozenset({"deny", "unknown user"})
    if not data.active[query.user]:
        return frozenset({"deny", "disabled"})
    found = paths(data, query)
    if not found:
        return frozenset({"deny"})
    tags = set()
    for p in found:
        if p.group is not None:
            tags.add("group")
        if p.holder != p.role:
            tags.add("inherited")
        kind = "scope:type" if p.scope.endswith(":*") else "scope:id"
        tags.add("scope:*" if p.scope == "*" else kind)
        if "*" in p.permission:
            tags.add("wildcard permission")
        if p.expires is not None:
            tags.add("expiring")
    return frozenset(tags)


# --- agreement -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Disagreement:
    index: int
    query: Query
    expected: bool
    answered: bool | str  # a string: the engine raised, this is the error


@dataclass(frozen=True, slots=True)
class Agreement:
    """One engine over the query list: how many it was asked, how many were left
    out (a query set it cannot express), and where it answered differently."""

    engine: str
    asked: int
    excluded: int
    disagreements: tuple[Disagreement, ...]

    @property
    def agreed(self) -> int:
        return self.asked - len(self.disagreements)

    @property
    def ok(self) -> bool:
        return not self.disagreements and self.asked > 0

    def line(self) -> str:
        verdict = "agrees" if self.ok else f"DISAGREES on {len(self.disagreements)}"
        left_out = f" ({self.excluded} excluded)" if self.excluded else ""
        return f"{self.engine}: {verdict}, {self.agreed:,}/{self.asked:,} queries{left_out}"


def check_agreement(
    engine: str,
    answer: Callable[[Query], bool],
    queries: Sequence[Query],
    expected: Sequence[bool],
    excluded: Iterable[int] = (),
) -> Agreement:
    """Ask `answer` every query not in `excluded` and compare with `expected`.

    An exception is a disagreement (its message kept), never skipped."""
    skip = set(excluded)
    wrong = []
    for i, (query, want) in enumerate(zip(queries, expected, strict=True)):
        if i in skip:
            continue
        try:
            got: bool | str = bool(answer(query))
        except Exception as exc:
            got = f"{type(exc).__name__}: {exc}"
        if got is not want:
            wrong.append(Disagreement(i, query, want, got))
    return Agreement(engine, len(queries) - len(skip), len(skip), tuple(wrong))


def query_sets(data: Dataset, queries: Sequence[Query]) -> dict[str, frozenset[int]]:
    """Named subsets of the queries (by index) a peer may be unable to express."""
    return {"expiry": frozenset(i for i, q in enumerate(queries) if expiry_dependent(data, q))}
