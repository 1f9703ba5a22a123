"""The SQL the sync worker runs, built once from the engine's row format.

Every statement here runs inside one REPEATABLE READ, READ ONLY transaction, so
all of them see the same snapshot: the one `SNAPSHOT` returns.
"""

from __future__ import annotations

from pdp.engine import COLUMNS, KEY_WIDTH

# epoch, purge horizon and the transaction's own snapshot (== what it reads).
SNAPSHOT = (
    "SELECT epoch::text, purged_max_xid::text::bigint, pg_current_snapshot()::text "
    "FROM pdp.sync_meta"
)

# Change rows committed after `prev` ($1) and visible now. `txid >= xmin(prev)` lets
# the index narrow the scan; the visibility test does the rest (a long-running
# transaction elsewhere only widens the range, it never hides a change).
CHANGES = """
SELECT txid::text::bigint AS txid, tenant_id, entity, op, key::text AS key, changed_at
FROM pdp.change_log
WHERE txid >= pg_snapshot_xmin($1::text::pg_snapshot)
  AND NOT pg_visible_in_snapshot(txid, $1::text::pg_snapshot)
ORDER BY id
LIMIT $2
"""


def _column(col: str) -> str:
    """A column as the engine's row format has it: epoch seconds, jsonb as its text."""
    if col == "expires_at":
        return f"extract(epoch FROM t.{col})::float8"
    if col == "attributes":
        return f"t.{col}::text"
    return f"t.{col}"


def _select(entity: str) -> str:
    cols = [_column(col) for col in COLUMNS[entity]]
    return f"SELECT {', '.join(cols)} FROM pdp.{entity} t"


def _tenant_column(entity: str) -> str:
    return "id" if entity == "tenants" else "tenant_id"


# Whole tables, in the engine's column order (expires_at as epoch seconds).
ALL_ROWS: dict[str, str] = {entity: _select(entity) for entity in COLUMNS}

# One tenant's rows of a table ($1 = tenant id).
TENANT_ROWS: dict[str, str] = {
    entity: f"{_select(entity)} WHERE t.{_tenant_column(entity)} = $1" for entity in COLUMNS
}


def _by_keys(entity: str) -> str:
    key_cols = COLUMNS[entity][: KEY_WIDTH[entity]]
    arrays = ", ".join(f"${i + 1}::text[]" for i in range(len(key_cols)))
    match = " AND ".join(f"t.{c} = k.{c}" for c in key_cols)
    return f"{_select(entity)} JOIN unnest({arrays}) AS k({', '.join(key_cols)}) ON {match}"


# Current rows for a set of keys: one text[] parameter per key column.
ROWS_BY_KEYS: dict[str, str] = {entity: _by_keys(entity) for entity in COLUMNS}


def _digest(entity: str) -> str:
    fields = []
    for col in COLUMNS[entity]:
        if col == "expires_at":
            fields.append(
                "coalesce(round(extract(epoch FROM t.expires_at) * 1000000)::bigint::text, '')"
            )
        else:
            fields.append(f"coalesce({_column(col)}, '')")
    line = f"'{entity}|' || " + " || '|' || ".join(fields)
    return f"SELECT {line} AS line FROM pdp.{entity} t WHERE t.{_tenant_column(entity)} = $1"


# The engine's per-tenant digest (see pdp.engine.digest), computed in SQL: the sum of
# the first 64 bits of md5(line) over every row line, mod 2**64, and the line count.
TENANT_DIGEST = (
    "SELECT coalesce(sum(('x' || substr(md5(line), 1, 16))::bit(64)::bigint::numeric "
    "+ CASE WHEN ('x' || substr(md5(line), 1, 16))::bit(64)::bigint < 0 "
    "THEN 18446744073709551616 ELSE 0 END), 0) % 18446744073709551616 AS total, "
    "count(*) AS lines FROM ("
    + " UNION ALL ".join(_digest(entity) for entity in COLUMNS)
    + ") lines"
)


def _json_columns(entity: str) -> str:
    return ", ".join(_column(col) for col in COLUMNS[entity])


def _json_rows(entity: str) -> str:
    key_cols = COLUMNS[entity][: KEY_WIDTH[entity]]
    match = " AND ".join(f"t.{c} = k.key->>'{c}'" for c in key_cols)
    return (
        f"(SELECT json_agg(json_build_array({_json_columns(entity)})) FROM pdp.{entity} t "
        f"JOIN (SELECT DISTINCT key FROM ch WHERE entity = '{entity}') k ON {match})::text"
    )


# The whole common-case catch-up in ONE statement (one snapshot, one round trip): the
# meta row, the change rows after $1 (at most $2), and the current rows of their keys
# per entity as JSON arrays in the engine's column order. The caller falls back to
# the transactional path for reload markers, oversized batches and reload reasons.
FAST_CATCHUP = (
    "WITH ch AS MATERIALIZED ("
    "SELECT txid::text::bigint AS txid, tenant_id, entity, op, key, "
    "extract(epoch FROM changed_at)::float8 AS at FROM pdp.change_log "
    "WHERE txid >= pg_snapshot_xmin($1::text::pg_snapshot) "
    "AND NOT pg_visible_in_snapshot(txid, $1::text::pg_snapshot) ORDER BY id LIMIT $2) "
    "SELECT m.epoch::text, m.purged_max_xid::text::bigint, pg_current_snapshot()::text, "
    "(SELECT json_agg(json_build_array(txid, tenant_id, entity, op, key, at)) FROM ch)::text"
    + "".join(f", {_json_rows(entity)}" for entity in COLUMNS)
    + " FROM pdp.sync_meta m"
)
