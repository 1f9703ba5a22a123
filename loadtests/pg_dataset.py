"""The load test's database: which server, the seeded dataset, and the Locust manifest.

`ensure_dataset` makes database `Profile.database` hold exactly the profile's
synthetic dataset (migrate; seed only when the recorded spec differs). The spec is
recorded in `public.pdp_loadtest_dataset`, outside the captured `pdp` schema.

`build_manifest` draws what the Locust users ask from the seeded rows, labelled by
PostgreSQL's `pdp.check` (the reference implementation), so a wrong answer from the
sidecar under load is a Locust failure:
- subjects ranked by a seeded shuffle, drawn with Zipf weights 1/rank^s;
- "scoped" probes name a resource the subject holds a `type:id` assignment on
  (directly or through a group); "tenant-wide" probes name a random resource of the
  tenant, which only a `*` or `type:*` assignment reaches;
- writer targets: active users with no access to `type:lt-<n>`, and a role whose
  own grant is exactly `type:action`, so one user_roles row flips one decision.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Iterator
from datetime import date
from itertools import accumulate
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from loadtests.profiles import Profile
from pdp.config import Settings
from pdp.pg import migrate
from pdp.pg import seed as pg_seed
from pdp.pg.embedded import database_url
from pdp.pg.seed_data import ACTIONS, RESOURCE_TYPES, SeedSpec, synthetic

AS_OF = date(2026, 1, 1)  # fixed: the same spec on any day, so a seeded database is reused
ZIPF_S = 1.0
WRITER_PREFIX = "lt-"  # writer resource ids; the locustfile deletes `%:lt-%` scopes

_SCOPES = """
WITH s(tenant_id, user_id) AS (SELECT * FROM unnest($1::text[], $2::text[]))
SELECT ur.tenant_id, ur.user_id, ur.scope
FROM pdp.user_roles ur JOIN s USING (tenant_id, user_id)
WHERE ur.scope NOT LIKE '%*' AND ur.scope NOT LIKE '%:lt-%'
UNION
SELECT gm.tenant_id, gm.user_id, gr.scope
FROM pdp.group_members gm JOIN s USING (tenant_id, user_id)
JOIN pdp.group_roles gr ON gr.tenant_id = gm.tenant_id AND gr.group_id = gm.group_id
WHERE gr.scope NOT LIKE '%*'
ORDER BY 1, 2, 3
"""
_LABEL = """
SELECT pdp.check(t, u, rt, rid, a)
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
     WITH ORDINALITY AS q(t, u, rt, rid, a, n)
ORDER BY n
"""


@contextlib.contextmanager
def server_url() -> Iterator[str]:
    """PDP_DATABASE_URL, or the embedded server's URL (kept running meanwhile)."""
    with database_url(Settings.from_env(os.environ)) as url:
        yield url


def with_database(url: str, name: str) -> str:
    """`url` pointed at database `name` (a `?host=` socket query is kept)."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def seed_spec(profile: Profile) -> SeedSpec:
    return SeedSpec(tenants=profile.tenants, users=profile.users, as_of=AS_OF)


def _spec_text(spec: SeedSpec) -> str:
    fields = {
        "tenants": spec.tenants, "users": spec.users, "groups": spec.group_count,
        "roles": spec.roles, "seed": spec.seed, "prefix": spec.tenant_prefix,
        "as_of": spec.as_of.isoformat(),
    }  # fmt: skip
    return json.dumps(fields, sort_keys=True)


async def ensure_dataset(admin_url: str, profile: Profile) -> tuple[str, bool]:
    """(URL of the profile's database, whether it was seeded now)."""
    name = profile.database
    admin = await asyncpg.connect(admin_url)
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = with_database(admin_url, name)
    await migrate.upgrade(url)
    spec = seed_spec(profile)
    if await _recorded_spec(url, spec):
        return url, False
    await pg_seed.load(url, synthetic(spec), replace=True)
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.execute("DELETE FROM public.pdp_loadtest_dataset")
            await conn.execute(
                "INSERT INTO public.pdp_loadtest_dataset (spec) VALUES ($1)", _spec_text(spec)
            )
    finally:
        await conn.close()
    return url, True


async def _recorded_spec(url: str, spec: SeedSpec) -> bool:
    """Whether the database holds `spec` (recorded, and the user count agrees).
    Removes rows a crashed writer left behind."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS public.pdp_loadtest_dataset"
            " (spec text NOT NULL, seeded_at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.execute(f"DELETE FROM pdp.user_roles WHERE scope LIKE '%:{WRITER_PREFIX}%'")
        recorded = await conn.fetchval("SELECT spec FROM public.pdp_loadtest_dataset LIMIT 1")
        users = await conn.fetchval("SELECT count(*) FROM pdp.users")
    finally:
        await conn.close()
    return bool(recorded == _spec_text(spec) and users == spec.tenants * spec.users)


# --- the manifest ------------------------------------------------------------------------


async def build_manifest(
    url: str,
    profile: Profile,
    *,
    probes: int = 3000,
    subjects: int = 1000,
    writer_targets: int = 25,
    seed: int = 7,
) -> dict[str, Any]:
    """What the locustfile needs, as JSON-ready values (no URL, no secret)."""
    rng = random.Random(seed)
    conn = await asyncpg.connect(url)
    try:
        tenants = [r[0] for r in await conn.fetch("SELECT id FROM pdp.tenants ORDER BY id")]
        population = [
            (r[0], r[1])
            for r in await conn.fetch("SELECT tenant_id, id FROM pdp.users ORDER BY 1, 2")
        ]
        rng.shuffle(population)  # the shuffled order is the Zipf rank
        weights = [1 / rank**ZIPF_S for rank in range(1, len(population) + 1)]
        drawn = rng.choices(population, cum_weights=list(accumulate(weights)), k=2 * probes)
        scopes = await _scoped_resources(conn, sorted(set(drawn)))
        candidates = _candidates(rng, drawn, scopes, max(100, profile.users // 5))
        labelled = await _label(conn, [c[1:] for c in candidates])
        writer = await _writer_targets(conn, rng, tenants[0], writer_targets)
    finally:
        await conn.close()
    pools: dict[str, dict[str, list[list[str]]]] = {
        kind: {"allow": [], "deny": []} for kind in ("scoped", "tenant-wide")
    }
    for (kind, *probe), allowed in zip(candidates, labelled, strict=True):
        pools[kind]["allow" if allowed else "deny"].append(probe)
    resources = sorted({(c[1], c[3], c[4]) for c in candidates if c[0] == "scoped"})
    return {
        "tenants": tenants,
        "types": list(RESOURCE_TYPES),
        "actions": list(ACTIONS),
        "zipf_s": ZIPF_S,
        "subjects": [[t, u, round(w, 9)] for (t, u), w in zip(population, weights, strict=False)][
            :subjects
        ],
        "probes": pools,
        "resources": [list(r) for r in resources[:1000]],
        "writer": writer,
    }


async def _scoped_resources(
    conn: asyncpg.Connection, subjects: list[tuple[str, str]]
) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(tenant, user) -> the (type, id) resources its scoped assignments name."""
    rows = await conn.fetch(_SCOPES, [s[0] for s in subjects], [s[1] for s in subjects])
    scopes: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for tenant, user, scope in rows:
        rtype, _, rid = scope.partition(":")
        scopes.setdefault((tenant, user), []).append((rtype, rid))
    return scopes


def _candidates(
    rng: random.Random,
    drawn: list[tuple[str, str]],
    scopes: dict[tuple[str, str], list[tuple[str, str]]],
    id_space: int,
) -> list[tuple[str, str, str, str, str, str]]:
    """(kind, tenant, user, type, id, action): even draws scoped when the subject holds
    a scoped assignment, the rest tenant-wide."""
    out = []
    for i, (tenant, user) in enumerate(drawn):
        held = scopes.get((tenant, user))
        if i % 2 == 0 and held:
            kind, (rtype, rid) = "scoped", rng.choice(held)
        else:
            kind, rtype, rid = (
                "tenant-wide",
                rng.choice(RESOURCE_TYPES),
                str(rng.randrange(1, id_space)),
            )
        out.append((kind, tenant, user, rtype, rid, rng.choice(ACTIONS)))
    return out


async def _label(conn: asyncpg.Connection, queries: list[tuple[str, ...]]) -> list[bool]:
    """pdp.check of each (tenant, user, type, id, action), in order."""
    columns = [list(column) for column in zip(*queries, strict=True)] if queries else [[]] * 5
    return [bool(r[0]) for r in await conn.fetch(_LABEL, *columns)]


async def _writer_targets(
    conn: asyncpg.Connection, rng: random.Random, tenant: str, wanted: int
) -> list[list[str]]:
    """[tenant, user, role, type, id, action] rows whose insertion flips deny to allow."""
    grant = await conn.fetchrow(
        "SELECT role_id, permission FROM pdp.role_permissions"
        " WHERE tenant_id = $1 AND permission NOT LIKE '%*%' ORDER BY 1, 2 LIMIT 1",
        tenant,
    )
    if grant is None:
        return []
    role, (rtype, _, action) = grant[0], grant[1].partition(":")
    active = [
        r[0]
        for r in await conn.fetch(
            "SELECT id FROM pdp.users WHERE tenant_id = $1 AND status = 'active' ORDER BY id",
            tenant,
        )
    ]
    users = rng.sample(active, min(len(active), 4 * wanted))
    rows = [[tenant, u, role, rtype, f"{WRITER_PREFIX}{i}", action] for i, u in enumerate(users)]
    labels = await _label(conn, [(t, u, rt, rid, a) for t, u, _, rt, rid, a in rows])
    return [row for row, allowed in zip(rows, labels, strict=True) if not allowed][:wanted]
