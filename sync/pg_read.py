"""Reading one catch-up batch from PostgreSQL: everything visible after the cursor.

The cursor is the PostgreSQL snapshot the replica reflects, never an id. Each read
sees one snapshot:
- `read_fast`: the common case in one statement (one round trip): the new snapshot,
  the change-log rows visible now and not in the cursor's snapshot, and the current
  rows of their keys;
- `read`: one REPEATABLE READ, READ ONLY transaction for everything else: the first
  load, reloads (epoch changed, change log purged past the cursor, TRUNCATE,
  oversized batch), per-tenant reloads (bulk-load markers, the verifier's repairs)
  and the snapshot export a verifier probe asks for.
Re-reading current rows makes commit order irrelevant and applying idempotent.
Applying the batch is `sync.apply` (no I/O).
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from pdp.engine import COLUMNS, KEY_WIDTH, Engine, Row, RowChange, Snapshot, TenantState
from pdp.replica import USER_ENTITIES
from sync import pg_load
from sync import pg_queries as q
from sync.options import SyncOptions

_RELOAD_OPS = ("truncate", "bulk_load")


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where the replica stands: its snapshot and epoch (None before the first load)."""

    snapshot: Snapshot | None
    epoch: str | None


@dataclass(slots=True)
class Probe:
    """A verifier's request: share the next catch-up's snapshot, then report digests.

    `attach(snapshot_id)` runs while the catch-up transaction is still open, so the
    verifier can import the exported snapshot; `done` then receives the snapshot and
    the engine's digest of every tenant, taken right after that snapshot was applied.
    """

    attach: Callable[[str], Awaitable[None]]
    done: asyncio.Future[tuple[Snapshot, dict[str, str]]]


@dataclass(slots=True)
class Batch:
    """What one catch-up read, ready to apply without awaiting.

    `full` holds every table when the whole replica is to be replaced (`reload_reason`
    says why), or `engine` the engine built from them when the read was asked to build
    (`read(build=True)`); else `tenants` holds the tenants to replace whole and
    `changes` the current state of every other changed key.
    """

    snapshot: Snapshot
    epoch: str
    started: float
    full: dict[str, list[Row]] | None = None
    engine: Engine | None = None
    reload_reason: str = ""
    tenants: dict[str, dict[str, list[Row]]] = field(default_factory=dict)
    # The states of `tenants` when the read built them (`read(build=True)`); their rows
    # in `tenants` are then left empty.
    built: dict[str, TenantState] = field(default_factory=dict)
    changes: list[RowChange] = field(default_factory=list)
    committed_at: list[float] = field(default_factory=list)  # one wall time per transaction
    # When the data was proven current (monotonic); None: when the read started. A read
    # from a standby proves only what the standby had replayed (-inf: nothing new).
    proven_at: float | None = None

    @property
    def is_full(self) -> bool:
        """Whether the batch replaces the whole replica (`full` rows or a built `engine`)."""
        return self.full is not None or self.engine is not None

    @property
    def synced_at(self) -> float:
        return self.started if self.proven_at is None else self.proven_at


def key_tuple(entity: str, key: dict[str, Any]) -> tuple[str, ...]:
    """A change_log key (the primary key as a JSON object) as the engine's key tuple."""
    return tuple(str(key[col]) for col in COLUMNS[entity][: KEY_WIDTH[entity]])


def reload_reason(cursor: Cursor, epoch: str, purged: int | None) -> str | None:
    """Why the whole replica must be re-read at a snapshot with this epoch and horizon."""
    if cursor.snapshot is None:
        return "bootstrap"
    if epoch != cursor.epoch:
        return "epoch"
    if purged is not None and purged >= cursor.snapshot.xmin:
        return "purged"
    return None


async def read_fast(
    conn: asyncpg.Connection, cursor: Cursor, options: SyncOptions, started: float
) -> Batch | None:
    """The common catch-up in one statement; None when it does not apply.

    It does not apply to the first load, reload reasons, reload markers or an
    oversized batch: the caller then runs `read`.
    """
    if cursor.snapshot is None:
        return None
    limit = options.max_batch_keys
    async with asyncio.timeout(options.read_timeout):
        row = await conn.fetchrow(q.FAST_CATCHUP, str(cursor.snapshot), limit + 1)
    assert row is not None
    epoch, purged, snap_text, changes_json = row[0], row[1], row[2], row[3]
    if reload_reason(cursor, epoch, purged) is not None:
        return None
    changes = json.loads(changes_json) if changes_json else []
    if len(changes) > limit or any(op in _RELOAD_OPS for _, _, _, op, _, _ in changes):
        return None
    batch = Batch(Snapshot.parse(snap_text), epoch, started)
    keys: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    last_change: dict[int, float] = {}
    for txid, _tenant, entity, _op, key, at in changes:
        last_change[txid] = max(last_change.get(txid, 0.0), at)
        if entity in COLUMNS:
            keys[entity].add(key_tuple(entity, key))
    for index, entity in enumerate(COLUMNS, start=4):
        if entity in keys:
            rows = json.loads(row[index]) if row[index] else ()
            batch.changes.extend(current(entity, keys[entity], rows))
    batch.committed_at = list(last_change.values())
    return batch


async def read(
    conn: asyncpg.Connection,
    cursor: Cursor,
    options: SyncOptions,
    started: float,
    *,
    probes: Sequence[Probe] = (),
    reload_tenants: Iterable[str] = (),
    build: bool = False,
    url: str | None = None,
) -> Batch:
    """One catch-up in a REPEATABLE READ transaction (see the module docstring).

    With `build`, a full read builds `batch.engine` as the rows arrive instead of
    holding every table in `batch.full` (`sync.pg_load`), with processes of its own
    reading from `url` (where `conn` reads) when it is given.
    """
    # No `async with transaction`: on failure the caller terminates the connection
    # (which aborts the transaction), never asks to roll back over a link that may be dead.
    tx = conn.transaction(isolation="repeatable_read", readonly=True)
    async with asyncio.timeout(options.read_timeout) as bound:
        await tx.start()
        epoch, purged, snap_text = await conn.fetchrow(q.SNAPSHOT)
        batch = Batch(Snapshot.parse(snap_text), epoch, started)
        if probes:
            exported = await conn.fetchval("SELECT pg_export_snapshot()")
            for probe in probes:
                await probe.attach(exported)
        reason = reload_reason(cursor, epoch, purged)
        if reason is None and cursor.snapshot is not None:
            reason = await _read_changes(
                conn, batch, cursor.snapshot, options, reload_tenants, build=build, bound=bound
            )
        if reason is not None:
            batch.reload_reason = reason
            bound.reschedule(asyncio.get_running_loop().time() + options.full_read_timeout)
            if build:
                batch.engine = await pg_load.build_all(conn, options, batch.snapshot, url)
            else:
                batch.full = await _read_all(conn, options.on_demand)
        await tx.commit()
    return batch


async def _read_changes(
    conn: asyncpg.Connection,
    batch: Batch,
    cursor: Snapshot,
    options: SyncOptions,
    reload_tenants: Iterable[str],
    *,
    build: bool = False,
    bound: asyncio.Timeout | None = None,
) -> str | None:
    """Fill `batch` with the changes after `cursor`; or the reason to reload everything.

    With `build`, a tenant to replace whole is built as its rows arrive (`batch.built`)
    rather than held as rows: a big tenant's rows would cost several times its state.
    Reading tenants whole moves `bound` (the read's timeout) to the full-read timeout,
    as a full read does: a big tenant takes as long as a full load.
    """
    limit = options.max_batch_keys
    rows = await conn.fetch(q.CHANGES, str(cursor), limit + 1)
    if len(rows) > limit:
        return "oversized"
    keys: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    last_change: dict[int, float] = {}
    for row in rows:
        op, entity = row["op"], row["entity"]
        if op == "truncate":
            return "truncate"
        last_change[row["txid"]] = max(
            last_change.get(row["txid"], 0.0), row["changed_at"].timestamp()
        )
        if op == "bulk_load":
            batch.tenants[row["tenant_id"]] = {}
        elif entity in COLUMNS:
            keys[entity].add(key_tuple(entity, json.loads(row["key"])))
    for tenant in reload_tenants:
        batch.tenants[tenant] = {}
    if batch.tenants and bound is not None:
        bound.reschedule(asyncio.get_running_loop().time() + options.full_read_timeout)
    for tenant in batch.tenants:
        if build:
            batch.built[tenant] = await pg_load.build_tenant(conn, tenant, options.on_demand)
        else:
            batch.tenants[tenant] = await _read_tenant(conn, tenant, options.on_demand)
    for entity, entity_keys in keys.items():
        wanted = [k for k in entity_keys if k[0] not in batch.tenants]
        batch.changes.extend(await read_keys(conn, entity, wanted))
    batch.committed_at = list(last_change.values())
    return None


def current(
    entity: str, keys: Iterable[tuple[str, ...]], rows: Iterable[Sequence[Any]]
) -> list[RowChange]:
    """Each key's current state: its row among `rows`, or a delete when it is gone."""
    width = KEY_WIDTH[entity]
    found = {tuple(str(f) for f in row[:width]): tuple(row) for row in rows}
    return [
        RowChange(entity, key, found[key]) if key in found else RowChange.delete(entity, key)
        for key in keys
    ]


async def _read_all(conn: asyncpg.Connection, on_demand: bool) -> dict[str, list[Row]]:
    return {
        entity: list(await conn.fetch(sql))
        for entity, sql in q.ALL_ROWS.items()
        if not (on_demand and entity in USER_ENTITIES)
    }


async def _read_tenant(
    conn: asyncpg.Connection, tenant: str, on_demand: bool
) -> dict[str, list[Row]]:
    return {
        entity: list(await conn.fetch(sql, tenant))
        for entity, sql in q.TENANT_ROWS.items()
        if not (on_demand and entity in USER_ENTITIES)
    }


async def read_keys(
    conn: asyncpg.Connection, entity: str, keys: Sequence[tuple[str, ...]]
) -> list[RowChange]:
    """The current state of each key, read at the transaction's snapshot."""
    if not keys:
        return []
    columns: list[list[str]] = [list(col) for col in zip(*keys, strict=True)]
    return current(entity, keys, await conn.fetch(q.ROWS_BY_KEYS[entity], *columns))
