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

# The change_log rows committed after `prev` ($1) and visible now, as a FROM item.
# Not visible in `prev` means txid >= xmax(prev) or txid in xip(prev) (the definition of
# pg_visible_in_snapshot), so the rows are two narrow ranges of the txid index, and a
# long-running transaction elsewhere neither hides a change nor widens the scan. (The
# range `txid >= xmin(prev)` did widen it: any open transaction in the cluster, a COPY in
# another database, holds xmin back, and every catch-up re-read all changes since.)
# Both bounds of the range are spelled out (`< xmax(now)` is true of every visible row)
# because the driver prepares the statement and PostgreSQL then plans it generically,
# without the values: a range with two ends is estimated at 0.5% of the rows and goes by
# the index, while one open end (1/3 of the rows) under ORDER BY id LIMIT made it walk
# change_log_pkey through the whole retained log (7 days by default) on every catch-up.
# The visibility test stays as the statement of what is wanted.
_CHANGE_COLUMNS = "id, txid, tenant_id, entity, op, key, changed_at"
_NEW_CHANGES = (
    f"(SELECT {_CHANGE_COLUMNS} FROM pdp.change_log "
    "WHERE txid >= pg_snapshot_xmax($1::text::pg_snapshot) "
    "AND txid < pg_snapshot_xmax(pg_current_snapshot()) "
    f"UNION ALL SELECT {_CHANGE_COLUMNS} FROM pdp.change_log "
    "WHERE txid = ANY(ARRAY(SELECT pg_snapshot_xip($1::text::pg_snapshot)))) c "
    "WHERE NOT pg_visible_in_snapshot(c.txid, $1::text::pg_snapshot)"
)

# Change rows committed after `prev` ($1) and visible now, at most $2 of them (any $2
# when there are more: the caller then reloads), in id order.
CHANGES = (
    "WITH ch AS MATERIALIZED ("
    f"SELECT {_CHANGE_COLUMNS} FROM {_NEW_CHANGES} LIMIT $2) "
    "SELECT txid::text::bigint AS txid, tenant_id, entity, op, key::text AS key, changed_at "
    "FROM ch ORDER BY id"
)


# An assignment's expiry as the engine holds it: epoch seconds as a float8. The two
# infinities a timestamptz can hold (asyncpg writes Python's datetime.max and .min as
# them) are held as what they decide: 'infinity' never expires (NULL), '-infinity' has
# always expired (0, the epoch). Taken as they come they broke every full load (the
# digest cannot render an infinite number of microseconds).
EXPIRES = (
    "CASE WHEN t.expires_at = 'infinity' THEN NULL "
    "WHEN t.expires_at = '-infinity' THEN 0::float8 "
    "ELSE extract(epoch FROM t.expires_at)::float8 END"
)


def _column(col: str) -> str:
    """A column as the engine's row format has it: epoch seconds, jsonb as its text."""
    if col == "expires_at":
        return EXPIRES
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

# The user tables (`pdp.engine.bulk.USER_ENTITIES`, nearly all of a big tenant's rows) by
# their user id column, for a full load split over processes (`sync.pg_load`).
_USER_COLUMN = {"users": "id", "group_members": "user_id", "user_roles": "user_id"}

# Part $2 of $1 of a user table's rows: those whose user id hashes to it, so every row of
# a user falls in one part (the parts' users are disjoint, and each part's rows are
# whole users). hashtext is stable for the life of a server, which is all two sessions
# reading one snapshot need; the mask keeps the remainder non-negative.
PART_ROWS: dict[str, str] = {
    entity: f"{_select(entity)} WHERE (hashtext(t.{col}) & 2147483647) % $1 = $2"
    for entity, col in _USER_COLUMN.items()
}

# About how many rows the user tables hold: the planner's estimate (free), or, for a
# table never analyzed (reltuples -1), its size over 64 bytes a row.
USER_ROWS_ESTIMATE = (
    "SELECT coalesce(sum(CASE WHEN c.reltuples >= 0 THEN c.reltuples "
    "ELSE pg_relation_size(c.oid) / 64 END), 0)::bigint FROM pg_class c WHERE c.oid IN ("
    + ", ".join(f"'pdp.{entity}'::regclass" for entity in _USER_COLUMN)
    + ")"
)

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
            # What the engine holds and renders: the epoch seconds as a float8, times
            # 10^6, rounded (half to even, as Python's round). Exact numeric seconds
            # differ past 2^53 microseconds (year ~2255): "never" written as
            # 9999-12-31 23:59:59.999999 would mismatch on every verifier round.
            fields.append(f"coalesce(round(({EXPIRES}) * 1000000)::bigint::text, '')")
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
    "SELECT id, txid::text::bigint AS txid, tenant_id, entity, op, key, "
    f"extract(epoch FROM changed_at)::float8 AS at FROM {_NEW_CHANGES} LIMIT $2) "
    "SELECT m.epoch::text, m.purged_max_xid::text::bigint, pg_current_snapshot()::text, "
    "(SELECT json_agg(json_build_array(txid, tenant_id, entity, op, key, at) ORDER BY id) "
    "FROM ch)::text"
    + "".join(f", {_json_rows(entity)}" for entity in COLUMNS)
    + " FROM pdp.sync_meta m"
)
