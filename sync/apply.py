"""Applying a read batch to the replica: no I/O and no awaits.

Each function here is one synchronous step, so a request on the same event loop
sees the replica before or after a batch, never part of one. Building a whole new
engine (`build`) and the states of the tenants a batch replaces whole
(`build_tenants`) are the slow steps; the loop runs them in a thread, then swaps
the results in with `install` and `apply_changes`.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Mapping

from pdp.engine import Engine, Tables, TenantState
from pdp.replica import Replica
from sync.metrics import SyncMetrics
from sync.pg_read import Batch

log = logging.getLogger(__name__)


def build(batch: Batch) -> Engine:
    """A new engine from a full batch (CPU only; safe to run in a worker thread).

    The one the read built already (`batch.engine`), if it did.
    """
    if batch.engine is not None:
        return batch.engine
    assert batch.full is not None
    return Engine.build(batch.full, batch.snapshot)


def install(
    replica: Replica, engine: Engine, batch: Batch, metrics: SyncMetrics, seconds: float
) -> None:
    """Swap in the engine built from a full batch that took `seconds` to read and build."""
    replica.install(engine, batch.epoch, batch.synced_at)
    # Millions of long-lived engine objects: keep the cyclic collector from walking
    # them on every full collection (a p99 spike each time). The old engine is
    # acyclic and still freed by reference counting.
    gc.collect()
    gc.freeze()
    metrics.full_reload(batch.reload_reason)
    metrics.snapshot_loaded(seconds)
    log.info(
        "loaded snapshot %s (%s) in %.0f ms: %s",
        batch.snapshot,
        batch.reload_reason,
        seconds * 1000,
        engine.counts(),
    )


def build_tenants(tenants: Mapping[str, Tables]) -> dict[str, TenantState]:
    """The state of each tenant a batch replaces whole (`Batch.tenants`), built from
    its rows: CPU-heavy (a 100,000-user tenant takes seconds), and it touches no
    engine, so call it in a worker thread and pass the result to `apply_changes`."""
    return {tenant: Engine.tenant_state(tenant, tables) for tenant, tables in tenants.items()}


def apply_changes(
    replica: Replica,
    batch: Batch,
    metrics: SyncMetrics,
    wall: Callable[[], float],
    built: Mapping[str, TenantState] | None = None,
) -> int:
    """Replace the batch's tenants, apply its row changes and move to its snapshot.

    `built`: the tenants' states from `build_tenants(batch.tenants)`; a tenant missing
    there is built here, on the caller's thread. Returns the number of row changes
    applied. Propagation (commit to applied) is observed once per transaction,
    against the wall clock `wall`.
    """
    engine = replica.engine
    assert engine is not None, "a batch of changes needs a loaded replica"
    for tenant, tables in batch.tenants.items():
        state = (built or {}).get(tenant)
        engine.install_tenant(state if state is not None else Engine.tenant_state(tenant, tables))
        replica.tenant_replaced(tenant)
        metrics.tenant_reloaded()
    applied = replica.apply(batch.changes, batch.snapshot, batch.synced_at)
    now = wall()
    for committed in batch.committed_at:
        metrics.observe_propagation(max(0.0, now - committed))
    if applied or batch.tenants:
        metrics.changes_applied(applied)
        log.debug(
            "caught up to %s: %d rows, %d tenants reloaded",
            batch.snapshot,
            applied,
            len(batch.tenants),
        )
    return applied


def digests(replica: Replica) -> dict[str, str]:
    """The engine's digest of every tenant it holds (what a verifier probe compares)."""
    engine = replica.engine
    if engine is None:
        return {}
    return {tenant: engine.digest(tenant) for tenant in engine.tenants()}
