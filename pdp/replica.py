"""The seam between sync and web: the replica sync writes and web reads, and the fallback port.

`Replica` is the engine plus what the sync worker knows about its freshness. The
sync worker writes it (install a snapshot, apply a batch, mark it proven current);
request handlers only read it. Every write is one synchronous call, so a reader on
the same event loop sees the state before or after it, never half. No I/O here.

`Fallback` is the other direction: a fully consistent check the web layer may ask
for, implemented by the sync layer (`sync.pg_fallback`) and wired by the sidecar.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from pdp.conditions import Facts
from pdp.engine import Engine, RowChange, Snapshot, bulk


class Fallback(Protocol):
    """A fully consistent check answered by PostgreSQL (`pdp.check`)."""

    async def __call__(  # noqa: PLR0917 -- the request's parts
        self,
        tenant: str,
        user: str,
        rtype: str,
        rid: str,
        action: str,
        facts: Facts | None = None,
    ) -> bool: ...


class UserLoads(Protocol):
    """On-demand mode (`PDP_CACHE_MODE=on_demand`): which users' rows the engine holds.

    Implemented by `sync.user_cache.UserLoader`, wired by the sidecar. The engine holds
    the rows of cached users only; catch-up batches reach it for those users only.
    """

    def cached(self, tenant: str, user: str) -> bool: ...

    async def ensure(self, tenant: str, user: str) -> None:
        """Load the user's rows into the engine unless cached; DependencyError on failure."""

    def clear(self) -> None:
        """Forget every user (a new engine holds none)."""

    def evict_tenant(self, tenant: str) -> None:
        """Forget the tenant's users (its state was replaced without them)."""


USER_ENTITIES = bulk.USER_ENTITIES


def user_of(change: RowChange) -> tuple[str, str] | None:
    """(tenant, user) whose on-demand rows a change is about; None for shared rows."""
    if change.entity == "group_members":
        return change.key[0], change.key[2]
    if change.entity in ("users", "user_roles"):
        return change.key[0], change.key[1]
    return None


class Doorbell(asyncio.Event):
    """The replica's wake event, remembering when it first rang since it was cleared
    (monotonic and wall seconds): the sync worker reports how long a ring waited for its
    catch-up, and how long after a commit it rang."""

    def __init__(self) -> None:
        super().__init__()
        self.rang: tuple[float, float] | None = None  # (monotonic, wall) of the first ring

    def set(self) -> None:
        if not self.is_set():
            self.rang = (time.monotonic(), time.time())
        super().set()

    def clear(self) -> None:
        self.rang = None
        super().clear()


class Replica:
    """Holds the current engine; tracks staleness and lets callers wait for a revision."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._engine: Engine | None = None
        self._epoch: str | None = None
        self._synced_at: float | None = None
        self._advanced = asyncio.Event()
        # Set by anyone who wants a catch-up now (the listener, a consistency wait);
        # the sync worker waits on it.
        self.wake = Doorbell()
        # On-demand mode only (set by the sidecar before sync starts).
        self.users: UserLoads | None = None

    @property
    def engine(self) -> Engine | None:
        return self._engine

    @property
    def ready(self) -> bool:
        """A snapshot has been loaded (fresh or not)."""
        return self._engine is not None

    @property
    def revision(self) -> Snapshot | None:
        return None if self._engine is None else self._engine.revision

    @property
    def epoch(self) -> str | None:
        return self._epoch

    @property
    def synced_at(self) -> float | None:
        """Monotonic time the data was last proven current (None before the first load)."""
        return self._synced_at

    async def advanced(self) -> None:
        """Return at the next install, batch applied or proof of currency."""
        await self._advanced.wait()

    def fresh(self, max_staleness: float) -> Engine | None:
        """The engine if loaded and proven current within `max_staleness` seconds, else
        None (the hot path's one question; `staleness` says by how much)."""
        synced = self._synced_at
        if synced is None or self._clock() - synced > max_staleness:
            return None
        return self._engine

    def staleness(self) -> float:
        """Seconds since the data was last proven current; infinite before the first load."""
        if self._synced_at is None:
            return float("inf")
        return max(0.0, self._clock() - self._synced_at)

    def install(self, engine: Engine, epoch: str, synced_at: float) -> None:
        """Swap in a freshly loaded engine (bootstrap or full reload). Never awaits."""
        self._engine = engine
        if self.users is not None:
            self.users.clear()
        self._epoch = epoch
        self.mark_synced(synced_at)

    def restore(self, engine: Engine, epoch: str) -> None:
        """Swap in an engine restored from a local file: loaded, but not proven current.

        Staleness stays as it was (infinite at start) until a catch-up from the engine's
        revision succeeds, so readiness and the stale gate treat it as stale data.
        Never awaits.
        """
        self._engine = engine
        self._epoch = epoch

    def apply(self, changes: Iterable[RowChange], revision: Snapshot, synced_at: float) -> int:
        """Apply one catch-up batch atomically and move to `revision`. Never awaits."""
        if self._engine is None:
            raise RuntimeError("apply before install")
        users = self.users
        if users is not None:
            # Rows of users not loaded are dropped: a later load reads them fresh.
            changes = [c for c in changes if (who := user_of(c)) is None or users.cached(*who)]
        applied = self._engine.apply(changes, revision)
        self.mark_synced(synced_at)
        return applied

    def tenant_replaced(self, tenant: str) -> None:
        """A tenant's state was rebuilt (without users' rows in on-demand mode)."""
        if self.users is not None:
            self.users.evict_tenant(tenant)

    def mark_synced(self, synced_at: float) -> None:
        """Record that the data was current as of monotonic time `synced_at`."""
        if self._synced_at is None or synced_at > self._synced_at:
            self._synced_at = synced_at
        advanced, self._advanced = self._advanced, asyncio.Event()
        advanced.set()

    def has_revision(self, xid: int) -> bool:
        """Whether transaction `xid` is visible in the replica's snapshot."""
        revision = self.revision
        return revision is not None and revision.visible(xid)

    async def wait_for_revision(self, xid: int, timeout: float) -> bool:
        """Wait until transaction `xid` is visible, at most `timeout` seconds."""
        deadline = self._clock() + timeout
        while not self.has_revision(xid):
            remaining = deadline - self._clock()
            if remaining <= 0:
                return False
            try:
                # Not wait_for: no extra task, so one event-loop turn fewer per wake.
                async with asyncio.timeout(remaining):
                    await self._advanced.wait()
            except TimeoutError:
                return self.has_revision(xid)
        return True
