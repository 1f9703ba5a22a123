"""Applying a read batch to the replica: no I/O and no awaits.

Each function here is one synchronous step, so a request on the same event loop
sees the replica before or after a batch, never part of one. Building a whole new
engine (`build`) is the one slow step; the loop runs it in a thread, then swaps the
result in with `install`.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

from pdp.engine import Engine
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


def apply_changes(
    replica: Replica, batch: Batch, metrics: SyncMetrics, wall: Callable[[], float]
) -> int:
    """Replace the batch's tenants, apply its row changes and move to its snapshot.

    Returns the number of row changes applied. Propagation (commit to applied) is
    observed once per transaction, against the wall clock `wall`.
    """
    engine = replica.engine
    assert engine is not None, "a batch of changes needs a loaded replica"
    for tenant, tables in batch.tenants.items():
        engine.replace_tenant(tenant, tables)
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
