"""Synthetic RBAC data for `pdp seed`: pure, deterministic and lazy.

No I/O and no clock: the reference time (`SeedSpec.as_of`) is a parameter. Each
table of each tenant is an independent generator with its own random stream,
seeded from (seed, tenant, table), so tables can be produced in any order, one row
at a time, in bounded memory, and the same spec always yields the same rows.

The shape aims at what real deployments look like:
- roles in levels 0..4; a role of level L inherits one role of level L-1 and maybe
  one more of a lower level, so inheritance is acyclic and at most `MAX_DEPTH` hops;
- grants `type:action` over `RESOURCE_TYPES` x `ACTIONS`, some `type:*` and `*:read`,
  and `*:*` on a few top-level roles;
- users hold 0-3 direct assignments (tenant-wide `*`, type-wide `type:*`, mostly
  scoped `type:id`) and sit in 0-3 groups of Zipf-like sizes; groups hold
  assignments too; about 5% of assignments expire (most in the future) and about 3%
  of users are disabled.
"""

from __future__ import annotations

import json
import random
from bisect import bisect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from itertools import accumulate

from pdp.errors import UserError
from pdp.pg.schema import MAX_ID_LENGTH

Value = str | datetime | None
Row = tuple[Value, ...]
TableRows = dict[str, Iterator[Row]]

# The columns each table is loaded with (created_at/updated_at take their defaults).
COLUMNS: dict[str, tuple[str, ...]] = {
    "tenants": ("id", "name"),
    "users": ("tenant_id", "id", "status", "attributes"),
    "groups": ("tenant_id", "id", "description"),
    "group_members": ("tenant_id", "group_id", "user_id"),
    "roles": ("tenant_id", "id", "description"),
    "role_inherits": ("tenant_id", "role_id", "inherits_id"),
    "role_permissions": ("tenant_id", "role_id", "permission"),
    "user_roles": ("tenant_id", "user_id", "role_id", "scope", "expires_at"),
    "group_roles": ("tenant_id", "group_id", "role_id", "scope", "expires_at"),
}
TABLES: tuple[str, ...] = tuple(COLUMNS)

RESOURCE_TYPES = ("document", "folder", "project", "invoice", "report")
ACTIONS = ("read", "write", "delete", "share", "approve")
_ACTION_NOUNS = {
    "read": "viewer",
    "write": "editor",
    "delete": "owner",
    "share": "sharer",
    "approve": "approver",
}
# Level names (level = inheritance depth) and the share of roles in each level.
LEVELS = ("base", "member", "lead", "manager", "admin")
MAX_DEPTH = len(LEVELS) - 1
_LEVEL_SHARE = (0.40, 0.25, 0.15, 0.12, 0.08)
# How likely an assignment picks a role of each level: mostly low-level roles.
_USER_LEVEL_WEIGHT = (0.45, 0.30, 0.15, 0.08, 0.02)
_GROUP_LEVEL_WEIGHT = (0.30, 0.35, 0.20, 0.12, 0.03)
# Cumulative probabilities of holding 0, 1, 2, 3 of something.
_USER_ROLE_COUNTS = (0.08, 0.63, 0.88, 1.0)
_GROUP_ROLE_COUNTS = (0.0, 0.55, 0.85, 1.0)
_MEMBERSHIP_COUNTS = (0.30, 0.70, 0.90, 1.0)

DISABLED_SHARE = 0.03
EXPIRING_SHARE = 0.05
EXPIRED_SHARE = 0.3  # of the expiring ones: already in the past at `as_of`
SUPERADMIN_EVERY = 40  # one `*:*` role per this many roles (at least one)

DEPARTMENTS = (
    "engineering",
    "sales",
    "finance",
    "marketing",
    "support",
    "legal",
    "operations",
    "hr",
)
_LOCATIONS = ("berlin", "london", "new-york", "singapore", "sao-paulo")
# Every `attributes` value, serialized once: half the users have none.
_ATTRIBUTES = ("{}",) * 48 + tuple(
    json.dumps({"department": d, **({"location": loc} if loc else {})})
    for d in DEPARTMENTS
    for loc in (None, *_LOCATIONS)
)

DEFAULT_AS_OF = date(2026, 1, 1)


@dataclass(frozen=True, slots=True)
class SeedSpec:
    """Sizes and seed of a synthetic dataset; validated on construction (UserError)."""

    tenants: int = 1
    users: int = 1000
    groups: int | None = None  # None: users // 50, at least 1
    roles: int = 40
    seed: int = 1
    tenant_prefix: str = "tenant"
    as_of: date = DEFAULT_AS_OF  # "now" for expiry dates: some before, most after

    def __post_init__(self) -> None:
        for name in ("tenants", "users", "groups", "roles"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name} must be at least 1, got {value}")
        longest = len(f"{self.tenant_prefix}-{self.tenants}")
        if not self.tenant_prefix or longest > MAX_ID_LENGTH:
            raise UserError(
                f"--tenant-prefix must be non-empty and give ids of at most {MAX_ID_LENGTH}"
                " characters"
            )

    @property
    def group_count(self) -> int:
        return self.groups if self.groups is not None else max(1, self.users // 50)

    def tenant_ids(self) -> tuple[str, ...]:
        return tuple(f"{self.tenant_prefix}-{i}" for i in range(1, self.tenants + 1))


@dataclass(frozen=True, slots=True)
class Dataset:
    """What the loader needs: tenant ids and, per tenant, one lazy iterator per table.

    `tables(tenant_id)` yields the tables in `TABLES` order (parents before children).
    """

    tenant_ids: tuple[str, ...]
    _tables: Callable[[str], TableRows] = field(repr=False)

    def tables(self, tenant_id: str) -> TableRows:
        return self._tables(tenant_id)


def synthetic(spec: SeedSpec) -> Dataset:
    """The synthetic dataset of `spec`."""
    return Dataset(spec.tenant_ids(), lambda tenant_id: tenant_tables(spec, tenant_id))


def user_id(index: int) -> str:
    return f"user-{index:06d}"


def group_id(index: int) -> str:
    return f"group-{index:05d}"


# --- roles ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RolePlan:
    """One tenant's roles: small, so built eagerly. Parallel tuples indexed by role."""

    ids: tuple[str, ...]
    levels: tuple[int, ...]
    types: tuple[str, ...]  # the resource type scoped assignments of the role favour
    inherits: tuple[tuple[str, str], ...]
    permissions: tuple[tuple[str, str], ...]


def _level_sizes(roles: int) -> list[int]:
    levels = min(len(LEVELS), roles)
    sizes = [1] * levels
    spare = roles - levels
    for level in range(1, levels):
        sizes[level] += int(spare * _LEVEL_SHARE[level])
    sizes[0] += roles - sum(sizes)
    return sizes


def _role_name(level: int, index: int) -> str:
    if level > 0:
        return f"{LEVELS[level]}-{index + 1:02d}"
    kind = RESOURCE_TYPES[index % len(RESOURCE_TYPES)]
    action = ACTIONS[(index // len(RESOURCE_TYPES)) % len(ACTIONS)]
    rounds = index // (len(RESOURCE_TYPES) * len(ACTIONS))
    suffix = f"-{rounds + 1}" if rounds else ""
    return f"{kind}-{_ACTION_NOUNS[action]}{suffix}"


def _grants(rng: random.Random, level: int, index: int) -> set[str]:
    if level == 0:
        kind = RESOURCE_TYPES[index % len(RESOURCE_TYPES)]
        action = ACTIONS[(index // len(RESOURCE_TYPES)) % len(ACTIONS)]
        grants = {f"{kind}:{action}"}
        if rng.random() < 0.5:
            grants.add(f"{kind}:{rng.choice(ACTIONS)}")
    else:
        grants = {
            f"{rng.choice(RESOURCE_TYPES)}:{rng.choice(ACTIONS)}" for _ in range(rng.randint(0, 2))
        }
    if rng.random() < 0.10 + 0.05 * level:
        grants.add(f"{rng.choice(RESOURCE_TYPES)}:*")
    if rng.random() < 0.08:
        grants.add("*:read")
    return grants


def role_plan(spec: SeedSpec, tenant_id: str) -> RolePlan:
    """The roles of `tenant_id`: levels, inheritance (only towards lower levels), grants."""
    rng = _rng(spec, tenant_id, "roles")
    by_level: list[list[str]] = [
        [_role_name(level, i) for i in range(size)]
        for level, size in enumerate(_level_sizes(spec.roles))
    ]
    ids, levels, types = [], [], []
    inherits: list[tuple[str, str]] = []
    permissions: list[tuple[str, str]] = []
    for level, names in enumerate(by_level):
        for index, name in enumerate(names):
            ids.append(name)
            levels.append(level)
            types.append(name.split("-")[0] if level == 0 else rng.choice(("document", "project")))
            permissions.extend((name, grant) for grant in sorted(_grants(rng, level, index)))
            if level > 0:
                parents = {rng.choice(by_level[level - 1])}
                if rng.random() < 0.4:
                    parents.add(rng.choice(by_level[rng.randrange(level)]))
                inherits.extend((name, parent) for parent in sorted(parents))
    top = by_level[-1]
    permissions.extend((name, "*:*") for name in top[: max(1, spec.roles // SUPERADMIN_EVERY)])
    return RolePlan(tuple(ids), tuple(levels), tuple(types), tuple(inherits), tuple(permissions))


# --- tables --------------------------------------------------------------------------


def tenant_tables(spec: SeedSpec, tenant_id: str) -> TableRows:
    """One lazy row iterator per table (in `TABLES` order) for one tenant of `spec`.

    Deterministic in (spec, tenant_id); each iterator is independent of the others.
    """
    plan = role_plan(spec, tenant_id)
    return {
        "tenants": iter([(tenant_id, f"Synthetic tenant {tenant_id}")]),
        "users": _users(spec, tenant_id),
        "groups": _groups(spec, tenant_id),
        "group_members": _group_members(spec, tenant_id),
        "roles": (
            (tenant_id, role, f"{LEVELS[level]} role {role}")
            for role, level in zip(plan.ids, plan.levels, strict=True)
        ),
        "role_inherits": ((tenant_id, role, parent) for role, parent in plan.inherits),
        "role_permissions": ((tenant_id, role, grant) for role, grant in plan.permissions),
        "user_roles": _assignments(spec, tenant_id, plan, "user_roles"),
        "group_roles": _assignments(spec, tenant_id, plan, "group_roles"),
    }


def _rng(spec: SeedSpec, tenant_id: str, table: str) -> random.Random:
    # A str seed is hashed with SHA-512: stable across runs and PYTHONHASHSEED.
    return random.Random(f"pdp-seed/{spec.seed}/{tenant_id}/{table}")


def _users(spec: SeedSpec, tenant_id: str) -> Iterator[Row]:
    rng = _rng(spec, tenant_id, "users")
    rand, attributes = rng.random, _ATTRIBUTES
    for i in range(1, spec.users + 1):
        status = "disabled" if rand() < DISABLED_SHARE else "active"
        yield (tenant_id, user_id(i), status, attributes[int(rand() * len(attributes))])


def _groups(spec: SeedSpec, tenant_id: str) -> Iterator[Row]:
    for i in range(1, spec.group_count + 1):
        department = DEPARTMENTS[(i - 1) % len(DEPARTMENTS)]
        yield (tenant_id, group_id(i), f"{department.capitalize()}, team {i}")


def _group_members(spec: SeedSpec, tenant_id: str) -> Iterator[Row]:
    # Zipf-like sizes: group i is chosen with weight 1/i, so a few groups are large
    # ("all staff") and most are small teams.
    rng = _rng(spec, tenant_id, "group_members")
    rand, groups = rng.random, spec.group_count
    cumulative = list(accumulate(1.0 / i for i in range(1, groups + 1)))
    total = cumulative[-1]
    for i in range(1, spec.users + 1):
        wanted = min(bisect(_MEMBERSHIP_COUNTS, rand()), groups)
        chosen: set[int] = set()
        while len(chosen) < wanted:
            chosen.add(min(bisect(cumulative, rand() * total), groups - 1))
        member = user_id(i)
        for g in sorted(chosen):
            yield (tenant_id, group_id(g + 1), member)


def _assignments(spec: SeedSpec, tenant_id: str, plan: RolePlan, table: str) -> Iterator[Row]:
    rng = _rng(spec, tenant_id, table)
    rand = rng.random
    as_of = datetime.combine(spec.as_of, time(), UTC)
    if table == "user_roles":
        holders, counts = spec.users, _USER_ROLE_COUNTS
        holder, level_weight, tenant_wide, type_wide = user_id, _USER_LEVEL_WEIGHT, 0.12, 0.27
    else:
        holders, counts = spec.group_count, _GROUP_ROLE_COUNTS
        holder, level_weight, tenant_wide, type_wide = group_id, _GROUP_LEVEL_WEIGHT, 0.35, 0.65
    cumulative = _role_weights(plan, level_weight)
    total = cumulative[-1]
    resources = max(100, spec.users // 5)
    for i in range(1, holders + 1):
        name = holder(i)
        seen: set[tuple[str, str]] = set()
        for _ in range(bisect(counts, rand())):
            role = min(bisect(cumulative, rand() * total), len(plan.ids) - 1)
            r = rand()
            if r < tenant_wide:
                scope = "*"
            elif r < type_wide:
                scope = f"{rng.choice(RESOURCE_TYPES)}:*"
            else:
                kind = plan.types[role] if rand() < 0.7 else rng.choice(RESOURCE_TYPES)
                # Log-uniform ids: a few resources are shared widely, most rarely.
                scope = f"{kind}:{int(resources ** rand())}"
            key = (plan.ids[role], scope)
            if key in seen:
                continue
            seen.add(key)
            yield (tenant_id, name, key[0], scope, _expiry(rng, as_of))


def _role_weights(plan: RolePlan, level_weight: Sequence[float]) -> list[float]:
    per_level = [plan.levels.count(level) for level in range(len(LEVELS))]
    return list(accumulate(level_weight[level] / per_level[level] for level in plan.levels))


def _expiry(rng: random.Random, as_of: datetime) -> datetime | None:
    if rng.random() >= EXPIRING_SHARE:
        return None
    if rng.random() < EXPIRED_SHARE:
        return as_of - timedelta(seconds=rng.randrange(3600, 90 * 86400))
    return as_of + timedelta(seconds=rng.randrange(86400, 365 * 86400))


# --- the demo tenant -----------------------------------------------------------------

DEMO_TENANT = "demo"
DEMO_EXPIRED_AT = datetime(2025, 1, 1, tzinfo=UTC)

DEMO_HELP = """\
--demo loads one small tenant, 'demo', instead of synthetic data:
  roles   viewer: document:read, folder:read
          editor (inherits viewer): document:write, folder:write
          admin  (inherits editor): document:*, folder:*, *:read
  alice   admin on the whole tenant
  bob     editor through group 'engineering'
  carol   viewer on document:roadmap only
  dave    disabled (holds admin, denied everything)
  erin    editor, assignment expired on 2025-01-01
e.g. bob may write document:roadmap, carol may read it but not write it."""

_DEMO: Mapping[str, Sequence[Row]] = {
    "tenants": [(DEMO_TENANT, "Demo tenant")],
    "users": [
        (DEMO_TENANT, "alice", "active", '{"department": "it"}'),
        (DEMO_TENANT, "bob", "active", '{"department": "engineering"}'),
        (DEMO_TENANT, "carol", "active", '{"department": "product"}'),
        (DEMO_TENANT, "dave", "disabled", '{"department": "engineering"}'),
        (DEMO_TENANT, "erin", "active", "{}"),
    ],
    "groups": [(DEMO_TENANT, "engineering", "Engineering")],
    "group_members": [(DEMO_TENANT, "engineering", "bob")],
    "roles": [
        (DEMO_TENANT, "viewer", "Read documents and folders"),
        (DEMO_TENANT, "editor", "Viewer, and write documents and folders"),
        (DEMO_TENANT, "admin", "Everything on documents and folders, read everything"),
    ],
    "role_inherits": [(DEMO_TENANT, "editor", "viewer"), (DEMO_TENANT, "admin", "editor")],
    "role_permissions": [
        (DEMO_TENANT, role, grant)
        for role, grants in (
            ("viewer", ("document:read", "folder:read")),
            ("editor", ("document:write", "folder:write")),
            ("admin", ("document:*", "folder:*", "*:read")),
        )
        for grant in grants
    ],
    "user_roles": [
        (DEMO_TENANT, "alice", "admin", "*", None),
        (DEMO_TENANT, "carol", "viewer", "document:roadmap", None),
        (DEMO_TENANT, "dave", "admin", "*", None),
        (DEMO_TENANT, "erin", "editor", "*", DEMO_EXPIRED_AT),
    ],
    "group_roles": [(DEMO_TENANT, "engineering", "editor", "*", None)],
}


def demo() -> Dataset:
    """The hand-written `demo` tenant (see `DEMO_HELP`)."""
    return Dataset((DEMO_TENANT,), lambda _tenant: {t: iter(_DEMO[t]) for t in TABLES})
