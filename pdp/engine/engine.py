"""The engine: every tenant's state, the revision it reflects, and the queries.

Reads (`check` and the reverse queries) and writes (`apply`, `replace_tenant`) are
plain synchronous calls with no awaits, so under asyncio every reader sees the state
before or after a batch, never part of one.
"""

from __future__ import annotations

import gc
from collections.abc import Generator, Iterable, Iterator, Mapping
from contextlib import contextmanager
from itertools import groupby
from operator import itemgetter

from pdp.engine import evaluate
from pdp.engine.bulk import BULK, Shared, Tally, absorb
from pdp.engine.decision import UNKNOWN_TENANT, ActionsResult, Decision, ResourcesResult
from pdp.engine.digest import EMPTY
from pdp.engine.export import TableRows, empty_tables, tenant_tables
from pdp.engine.rows import ENTITIES, Row, RowChange
from pdp.engine.snapshot import Snapshot
from pdp.engine.tenant import TenantState, upserter

Tables = Mapping[str, Iterable[Row]]


@contextmanager
def collector_off() -> Iterator[None]:
    """The cyclic collector off for the block (back on after, if it was on).

    A bulk load allocates millions of acyclic tuples and dicts; the collector would walk
    them again on every generation-2 pass (a third of the load time at 1M users).
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


class Loader:
    """Builds an engine from rows fed in pieces: `add` any number of times, then `finish`.

    What `Engine.build` does in one call, for a reader that streams rows (each piece
    can be freed once added, and the next one fetched meanwhile). Pieces of one entity
    or of different ones may come in any order: every upsert is order-independent. Not
    thread-safe: one `add` at a time (from any thread). `only` restricts the rows to
    one tenant (ValueError otherwise).
    """

    __slots__ = ("_only", "_shared", "_states", "_tallies")

    def __init__(self, only: str | None = None) -> None:
        self._states: dict[str, TenantState] = {}
        self._only = only
        self._shared = Shared()
        self._tallies: dict[str, Tally] = {}
        if only is not None:
            self._states[only] = TenantState(only, loading=True)

    def add(self, entity: str, rows: Iterable[Row]) -> None:
        """Upsert these rows of `entity`, creating tenant states as rows name them."""
        with collector_off():
            if entity in BULK:
                self._add_bulk(entity, rows)
            else:
                _load_rows(self._states, entity, rows, self._only)

    def _add_bulk(self, entity: str, rows: Iterable[Row]) -> None:
        add, shared = BULK[entity], self._shared
        for tenant, run in groupby(rows, _TENANT):  # one run per tenant: usually one
            state = _state(self._states, entity, tenant, self._only)
            add(state, run, shared, self._tally(state.tenant_id))

    def _tally(self, tenant: str) -> Tally:
        """The digest tally of the tenant's user rows (made on first use)."""
        return self._tallies.get(tenant) or self._tallies.setdefault(tenant, Tally())

    def absorb(self, part: Engine) -> None:
        """Add the user rows of a load of other users (`pdp.engine.bulk.absorb`).

        A full load split over processes by user id (`sync.pg_load`) builds each
        part's users, memberships and direct assignments into an engine of their own;
        this takes them into the load, with their share of the digest. `part` is not
        to be used after. ValueError when a part holds anything else, or users this
        load holds too; the load is then to be dropped.
        """
        with collector_off():
            for other in part.states():
                state = _state(self._states, "users", other.tenant_id, self._only)
                absorb(state, other, self._tally(state.tenant_id))

    def finish(self) -> dict[str, TenantState]:
        """The tenant states, settled and with their running digests started."""
        with collector_off():
            for tenant, state in self._states.items():
                state.settle()
                # Here rather than at the first digest() call: a full load runs in a
                # worker thread, the verifier's digest() on the loop.
                state.start_digest(self._user_rows_sum(tenant, state))
        return self._states

    def _user_rows_sum(self, tenant: str, state: TenantState) -> int | None:
        """The tally of the tenant's user rows; None when it does not sum what is held."""
        tally = self._tallies.get(tenant, Tally())
        held = state.count["users"] + state.count["group_members"] + state.count["user_roles"]
        return None if tally.replaced or tally.lines != held else tally.total

    def engine(self, revision: Snapshot) -> Engine:
        """`finish`, as an engine at `revision`."""
        return Engine(self.finish(), revision)


_TENANT = itemgetter(0)


def _state(
    states: dict[str, TenantState], entity: str, tenant: object, only: str | None
) -> TenantState:
    """The loading state of `tenant` (made on first use); ValueError for a bad tenant id."""
    if not isinstance(tenant, str) or (only is not None and tenant != only):
        raise ValueError(f"{entity}: a row of {tenant!r} is not for tenant {only or 'a str id'}")
    state = states.get(tenant)
    if state is None:
        state = states[tenant] = TenantState(tenant, loading=True)
    return state


def _load_rows(
    states: dict[str, TenantState], entity: str, rows: Iterable[Row], only: str | None
) -> None:
    put = upserter(entity)
    state: TenantState | None = None
    for row in rows:
        # Rows come grouped by tenant more often than not: skip the lookup then.
        if state is None or row[0] != state.tenant_id:
            state = _state(states, entity, row[0], only)
        put(state, row)


class Engine:
    """In-memory replica of the RBAC tables with a decision procedure over it."""

    __slots__ = ("_revision", "_tenants", "_version")

    def __init__(self, tenants: dict[str, TenantState], revision: Snapshot) -> None:
        self._tenants = tenants
        self._revision = revision
        self._version = 0

    @property
    def version(self) -> int:
        """Counts the changes to the held rows (not revision moves that changed nothing)."""
        return self._version

    @classmethod
    def build(cls, tables: Tables, revision: Snapshot) -> Engine:
        """An engine holding exactly these rows (all tenants), as of `revision`.

        Missing tables count as empty. Raises ValueError on a row without a str tenant id.
        """
        loader = Loader()
        for entity in ENTITIES:
            loader.add(entity, tables.get(entity, ()))
        return cls(loader.finish(), revision)  # `cls`: a subclass builds its own kind

    @property
    def revision(self) -> Snapshot:
        """The snapshot the held rows reflect."""
        return self._revision

    def apply(self, changes: Iterable[RowChange], revision: Snapshot) -> int:
        """Apply a batch of row changes at once and move to `revision`; never awaits.

        Idempotent per change; a tenant delete drops the tenant's whole state. The
        batch is validated first, so a malformed change (ValueError) applies nothing.
        Cost follows the changed rows. Returns the number of changes applied.
        """
        batch = list(changes)
        for change in batch:
            change.validate()
        touched: dict[int, TenantState] = {}
        for change in batch:
            tenant = change.key[0]
            state = self._tenants.get(tenant)
            if change.row is None:
                if change.entity == "tenants":
                    self._tenants.pop(tenant, None)
                elif state is not None:
                    state.delete(change.entity, change.key)
                    touched[id(state)] = state
                continue
            if state is None:
                state = self._tenants[tenant] = TenantState(tenant)
            state.upsert(change.entity, change.row)
            touched[id(state)] = state
        for state in touched.values():
            state.settle()
        if batch:
            self._version += 1
        self._revision = revision
        return len(batch)

    def forget_user(self, tenant: str, user: str) -> int:
        """Drop one user's rows (users row, memberships, direct assignments); never awaits.

        For on-demand caching: an evicted user holds nothing, so a later load starts
        fresh. Roles, groups and group grants are untouched. Returns the rows dropped.
        """
        state = self._tenants.get(tenant)
        rec = None if state is None else state.users.get(user)
        if state is None or rec is None:
            return 0
        status, grants, groups = rec
        held = grants.values() if isinstance(grants, dict) else (grants,)
        keys: list[tuple[str, tuple[str, ...]]] = [
            ("user_roles", (tenant, user, role, scope)) for part in held for role, scope, _ in part
        ]
        keys += [("group_members", (tenant, gid, user)) for gid in groups]
        if status is not None:
            keys.append(("users", (tenant, user)))
        for entity, key in keys:
            state.delete(entity, key)
        self._version += 1
        return len(keys)

    def replace_tenant(self, tenant_id: str, tables: Tables) -> None:
        """Swap in one tenant's state built from its rows (all rows must be its own).

        With no `tenants` row the tenant is gone. Other tenants are untouched.
        """
        self.install_tenant(self.tenant_state(tenant_id, tables))

    @staticmethod
    def tenant_state(tenant_id: str, tables: Tables) -> TenantState:
        """One tenant's state built from its rows, for `install_tenant`: O(rows) and
        CPU-heavy, but it touches no engine, so it may run in a worker thread while
        the engine answers checks and applies changes."""
        loader = Loader(only=tenant_id)
        for entity in ENTITIES:
            loader.add(entity, tables.get(entity, ()))
        return loader.finish()[tenant_id]

    def install_tenant(self, state: TenantState) -> None:
        """Swap in a state from `tenant_state` (O(1)); without a `tenants` row the
        tenant is gone. Other tenants are untouched."""
        self._version += 1
        if state.exists:
            self._tenants[state.tenant_id] = state
        else:
            self._tenants.pop(state.tenant_id, None)

    def tables(self) -> TableRows:
        """Every held row, by entity, in the row format `build` takes (see `export`).

        Reads only; O(rows). Safe in a worker thread while nothing applies changes.
        """
        out = empty_tables()
        for state in list(self._tenants.values()):
            tenant_tables(state, out)
        return out

    def states(self) -> list[TenantState]:
        """Every tenant state held, rows of tenants whose tenants row is missing too
        (what `pdp.engine.image` writes)."""
        return list(self._tenants.values())

    def tenants(self) -> tuple[str, ...]:
        """Ids of the existing tenants, sorted."""
        return tuple(sorted(t for t, s in self._tenants.items() if s.exists))

    def counts(self) -> dict[str, int]:
        """Rows held by entity, plus `assignments` (user_roles + group_roles)."""
        totals = dict.fromkeys(ENTITIES, 0)
        for state in self._tenants.values():
            for entity, n in state.count.items():
                totals[entity] += n
        totals["assignments"] = totals["user_roles"] + totals["group_roles"]
        return totals

    def _live(self, tenant: str) -> TenantState | None:
        state = self._tenants.get(tenant)
        return state if state is not None and state.exists else None

    def check(  # noqa: PLR0917 -- the request's five parts are positional by contract
        self,
        tenant: str,
        user: str,
        resource_type: str,
        resource_id: str,
        action: str,
        now: float,
        facts: evaluate.FactsSource = None,
    ) -> Decision:
        """May `user` do `action` on the resource at time `now`? (see `evaluate`).

        `facts` (the request's properties and context) feed conditional grants only.
        """
        state = self._tenants.get(tenant)
        if state is None or not state.exists:
            return UNKNOWN_TENANT
        return evaluate.check(state, user, resource_type, resource_id, action, now, facts)

    def batch(self, now: float) -> evaluate.BatchCheck:
        """`check` for many requests at time `now`, sharing one user's work between them
        (see `evaluate.BatchCheck`); valid until the next change is applied."""
        return evaluate.BatchCheck(self._live, now)

    def actions(  # noqa: PLR0917 -- the request's parts
        self,
        tenant: str,
        user: str,
        resource_type: str,
        resource_id: str,
        now: float,
        facts: evaluate.FactsSource = None,
    ) -> ActionsResult:
        """Actions `check` allows the user on the resource (sorted; see ActionsResult)."""
        state = self._live(tenant)
        if state is None:
            return ActionsResult((), False)
        return evaluate.actions(state, user, resource_type, resource_id, now, facts)

    def conditional_subjects(  # noqa: PLR0917 -- the request's parts
        self,
        tenant: str,
        resource_type: str,
        resource_id: str,
        action: str,
        now: float,
        facts: evaluate.FactsSource = None,
    ) -> tuple[list[str], tuple[str, ...]]:
        """Users only a conditional grant allows (unsorted; `subjects` has the others) and
        the conditions that could not be decided with the request's facts."""
        state = self._live(tenant)
        if state is None:
            return [], ()
        return evaluate.conditional_subjects(state, resource_type, resource_id, action, now, facts)

    def subjects(
        self, tenant: str, resource_type: str, resource_id: str, action: str, now: float
    ) -> tuple[str, ...]:
        """Sorted ids of the users `check` allows to do `action` on the resource."""
        state = self._live(tenant)
        if state is None:
            return ()
        return evaluate.subjects(state, resource_type, resource_id, action, now)

    def subject_chunks(
        self, tenant: str, resource_type: str, resource_id: str, action: str, now: float,
        *, size: int = 1000,
    ) -> Iterator[list[str]]:  # fmt: skip
        """`subjects` in unsorted pieces (of `size` candidates examined), so a caller can
        yield between them.

        Only valid while `version` stays the same: stop iterating once it moves.
        """
        state = self._live(tenant)
        if state is None:
            return iter(())
        return evaluate.subject_chunks(state, resource_type, resource_id, action, now, size=size)

    def conditional_subject_chunks(  # noqa: PLR0917 -- the request's parts
        self,
        tenant: str,
        resource_type: str,
        resource_id: str,
        action: str,
        now: float,
        facts: evaluate.FactsSource = None,
    ) -> Iterator[tuple[list[str], set[str]]]:
        """`conditional_subjects` in pieces (allowed users, undecided conditions).

        Only valid while `version` stays the same: stop iterating once it moves.
        """
        state = self._live(tenant)
        if state is None:
            return iter(())
        return evaluate.conditional_subject_chunks(
            state, resource_type, resource_id, action, now, facts
        )

    def resources(  # noqa: PLR0917 -- the request's parts
        self,
        tenant: str,
        user: str,
        resource_type: str,
        action: str,
        now: float,
        facts: evaluate.FactsSource = None,
    ) -> ResourcesResult:
        """Resource ids `check` allows the user `action` on (see ResourcesResult)."""
        state = self._live(tenant)
        if state is None:
            return ResourcesResult((), False)
        return evaluate.resources(state, user, resource_type, action, now, facts)

    def resource_steps(  # noqa: PLR0917 -- the request's parts
        self,
        tenant: str,
        user: str,
        resource_type: str,
        action: str,
        now: float,
        facts: evaluate.FactsSource = None,
    ) -> Generator[None, None, ResourcesResult]:
        """`resources` in steps (see `evaluate.resource_steps`): the generator's return
        value is the result. Only valid while `version` stays the same."""
        state = self._live(tenant)
        if state is None:
            return _no_resources()
        return evaluate.resource_steps(state, user, resource_type, action, now, facts)

    def digest(self, tenant: str) -> str:
        """The digest (`pdp.engine.digest`) of the rows held for the tenant; O(1).

        Kept running by every change, so it can be read right after each batch.
        """
        state = self._tenants.get(tenant)
        return EMPTY if state is None else state.digest()


def _no_resources() -> Generator[None, None, ResourcesResult]:
    return ResourcesResult((), False)
    yield  # a generator that returns at once
