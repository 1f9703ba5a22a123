"""The relay's Redis format: the change stream, its tip, and the per-tenant snapshot.

Written by `sync.relay` (the leader) and read by `sync.redis_follower` (sidecars).

Stream `<stream>` (XADD ... MAXLEN ~ N): one entry per catch-up batch the relay
applied, with fields
- `kind`: `changes` (rows changed), `heartbeat` (nothing changed: proves freshness),
  `reset` (the relay reloaded everything: followers reload the snapshot);
- `epoch`, `from`, `to`: the epoch and the PostgreSQL snapshots the batch goes from
  and to (`from` is empty after an empty stream);
- `at`: wall-clock seconds when the data was proven current (the read began);
- `data`: zlib-compressed JSON of the row changes, the tenants replaced whole and one
  commit time per transaction (`changes` only);
- `digests` (on a `changes` or `heartbeat` entry every `verify_interval`): zlib JSON
  of the relay replica's digest of every tenant (`pdp.engine.digest`) at `from`, the
  state the entry starts from. A follower at `from` compares its own before applying
  the entry (the relay itself is verified against PostgreSQL at the same pace).

Entries form a chain: an entry is appended only if the stream's last entry ends
where it begins (`APPEND`, one Lua script, atomic in Redis). So two relays that both
believe they lead can never fork the stream, and a follower checks `from` against
its own snapshot: any gap (trimmed entries, a restarted Redis) shows as a mismatch.

Snapshot: hash `<stream>:snapshot` (`id`: the stream entry it corresponds to,
`meta`: JSON epoch, snapshot, at, generation, tenants) and one string per tenant
`<stream>:snapshot:<generation>:<tenant>` (zlib JSON of that tenant's rows). A new
generation is written whole before the hash names it; the old one expires later.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from pdp.engine import COLUMNS, Row, RowChange, Snapshot

# What talking to Redis can raise when the server or the link misbehaves.
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.exceptions.RedisError, OSError)

OLD_GENERATION_TTL = 300  # seconds a replaced snapshot generation stays readable

Tables = dict[str, list[Row]]

# KEYS: stream, snapshot hash. ARGV: expected tip ("epoch|to", "" for an empty stream),
# MAXLEN, snapshot meta ("" = leave the snapshot), then the entry's field/value pairs.
# Returns {1, id} when appended, {0, actual tip} when the stream ends elsewhere.
APPEND = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local tip = ''
if #last > 0 then
  local f = last[1][2]
  local epoch, to = '', ''
  for i = 1, #f, 2 do
    if f[i] == 'epoch' then epoch = f[i + 1] elseif f[i] == 'to' then to = f[i + 1] end
  end
  tip = epoch .. '|' .. to
end
if tip ~= ARGV[1] then return {0, tip} end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 4))
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], 'id', id, 'meta', ARGV[3]) end
return {1, id}
"""

# KEYS: stream, snapshot hash. ARGV: the stream id the snapshot is at, its meta.
# Names the snapshot only while that id is still the stream's last entry.
SET_SNAPSHOT = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last == 0 or last[1][1] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], 'id', ARGV[1], 'meta', ARGV[2])
return 1
"""


class Diverged(Exception):
    """The stream does not end where this relay's batch begins (another relay wrote)."""


def tip_text(epoch: str, snapshot: str) -> str:
    return f"{epoch}|{snapshot}"


@dataclass(frozen=True, slots=True)
class Tip:
    """The stream's last entry: its id and where the chain stands."""

    id: str
    epoch: str
    snapshot: str

    @property
    def text(self) -> str:
        return tip_text(self.epoch, self.snapshot)


@dataclass(slots=True)
class Entry:
    """One decoded stream entry."""

    id: str
    kind: str
    epoch: str
    from_: str
    to: str
    at: float
    changes: list[RowChange] = field(default_factory=list)
    tenants: dict[str, Tables] = field(default_factory=dict)
    committed_at: list[float] = field(default_factory=list)
    digests: dict[str, str] | None = None  # the relay's, per tenant, at `from`


@dataclass(slots=True)
class StoredSnapshot:
    """The snapshot the relay keeps in Redis: every tenant's rows at `snapshot`."""

    id: str
    epoch: str
    snapshot: str
    at: float
    blobs: list[bytes]  # one per tenant, decoded by `load_tables`


def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _row(values: Iterable[Any]) -> Row:
    return tuple(v if v is None or isinstance(v, float) else str(v) for v in values)


def pack(data: object) -> bytes:
    return zlib.compress(json.dumps(data, separators=(",", ":")).encode(), 1)


def unpack(blob: bytes) -> Any:
    return json.loads(zlib.decompress(blob))


def entry_fields(  # noqa: PLR0917 -- one field each
    kind: str,
    epoch: str,
    from_: str,
    to: str,
    at: float,
    changes: Iterable[RowChange] = (),
    tenants: Mapping[str, Mapping[str, Iterable[Row]]] | None = None,
    committed_at: Iterable[float] = (),
    digests: Mapping[str, str] | None = None,
) -> list[str | bytes]:
    """The field/value pairs of a stream entry (flat, for the APPEND script)."""
    fields: list[str | bytes] = [
        "kind", kind, "epoch", epoch, "from", from_, "to", to, "at", repr(at),
    ]  # fmt: skip
    if kind == "changes":
        data = {
            "c": [[c.entity, list(c.key), None if c.row is None else list(c.row)] for c in changes],
            "t": {t: {e: [list(r) for r in rows] for e, rows in tables.items()}
                  for t, tables in (tenants or {}).items()},
            "at": list(committed_at),
        }  # fmt: skip
        fields += ["data", pack(data)]
    if digests is not None and kind != "reset":
        fields += ["digests", pack(dict(digests))]
    return fields


def decode_entry(entry_id: Any, fields: Mapping[Any, Any]) -> Entry:
    """An entry as XREAD returns it; ValueError when it is not one of ours."""
    got = {as_text(k): v for k, v in fields.items()}
    try:
        entry = Entry(
            as_text(entry_id), as_text(got["kind"]), as_text(got["epoch"]), as_text(got["from"]),
            as_text(got["to"]), float(as_text(got["at"])),
        )  # fmt: skip
    except KeyError as exc:
        raise ValueError(f"stream entry {as_text(entry_id)} lacks {exc}") from None
    if "data" in got:
        data = unpack(got["data"])
        for entity, key, row in data["c"]:
            if entity not in COLUMNS:
                raise ValueError(f"stream entry {entry.id}: unknown entity {entity!r}")
            key_t = tuple(str(k) for k in key)
            entry.changes.append(RowChange(entity, key_t, None if row is None else _row(row)))
        entry.tenants = {
            t: {e: [_row(r) for r in rows] for e, rows in tables.items()}
            for t, tables in data["t"].items()
        }
        entry.committed_at = [float(x) for x in data["at"]]
    if "digests" in got:
        digests = unpack(got["digests"])
        if not isinstance(digests, dict):
            raise ValueError(f"stream entry {entry.id}: digests are not an object")
        entry.digests = {str(t): str(d) for t, d in digests.items()}
    return entry


async def tip(client: aioredis.Redis, stream: str) -> Tip | None:
    """The stream's last entry, or None when the stream is empty or missing."""
    last = await client.xrevrange(stream, "+", "-", count=1)
    if not last:
        return None
    entry_id, fields = last[0]
    wanted = ("epoch", "to")
    got = {as_text(k): as_text(v) for k, v in (fields or {}).items() if as_text(k) in wanted}
    return Tip(as_text(entry_id), got.get("epoch", ""), got.get("to", ""))


def snapshot_key(stream: str) -> str:
    return f"{stream}:snapshot"


def tenant_key(stream: str, generation: str, tenant: str) -> str:
    return f"{stream}:snapshot:{generation}:{tenant}"


async def read_snapshot(client: aioredis.Redis, stream: str) -> StoredSnapshot | None:
    """The stored snapshot, or None when there is none (or it vanished while read).

    Decompressing and merging happen in the caller's thread: call it off the loop for
    large tenants (see `load_tables`).
    """
    for _ in range(3):  # a new generation may replace the one named between two reads
        head = await client.hgetall(snapshot_key(stream))
        if not head:
            return None
        got = {as_text(k): v for k, v in head.items()}
        meta = json.loads(got["meta"])
        keys = [tenant_key(stream, meta["generation"], t) for t in meta["tenants"]]
        blobs = await client.mget(keys) if keys else []
        if any(b is None for b in blobs):
            continue
        return StoredSnapshot(
            as_text(got["id"]),
            meta["epoch"],
            meta["snapshot"],
            float(meta["at"]),
            [b if isinstance(b, bytes) else b.encode() for b in blobs if b is not None],
        )
    return None


def load_tables(stored: StoredSnapshot) -> Tables:
    """Decode the tenant blobs of `read_snapshot` into one set of tables (CPU only)."""
    tables: Tables = {entity: [] for entity in COLUMNS}
    for blob in stored.blobs:
        for entity, rows in unpack(blob).items():
            tables[entity].extend(_row(r) for r in rows)
    return tables


def snapshot_meta(
    epoch: str, snapshot: str, at: float, generation: str, tenants: Iterable[str]
) -> str:
    return json.dumps(
        {"epoch": epoch, "snapshot": snapshot, "at": at, "generation": generation,
         "tenants": sorted(tenants)}
    )  # fmt: skip


def covers(later: Snapshot, earlier: Snapshot) -> bool:
    """Whether every transaction visible in `earlier` is visible in `later` too."""
    if any(earlier.visible(x) for x in later.xip):
        return False
    if earlier.xmax > later.xmax:
        # xids in [later.xmax, earlier.xmax) are invisible in `later`: one visible in
        # `earlier` (below its xmin, or not in its xip) means `later` misses it.
        if earlier.xmin > later.xmax:
            return False
        in_progress = sum(1 for x in earlier.xip if x >= later.xmax)
        return earlier.xmax - later.xmax <= in_progress
    return True
