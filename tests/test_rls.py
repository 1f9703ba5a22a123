"""Tenant isolation enforced by PostgreSQL: the pdp_admin and pdp_sidecar roles under RLS.

Raw SQL in the role the admin API uses, with the tenant setting for A, sees and
changes no row of B; with no setting it sees nothing. The sidecar's role reads
everything sync needs and writes nothing; neither reads the admin tokens.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from pdp.pg import seed as pg_seed
from pdp.pg.seed_data import SeedSpec, synthetic
from tests import sync_harness

A, B = "iso-1", "iso-2"
TENANT_TABLES = (
    "users", "groups", "group_members", "roles", "role_inherits",
    "role_permissions", "user_roles", "group_roles", "resources", "change_log",
)  # fmt: skip


@pytest.fixture
async def two_tenants(db_url: str, pg: asyncpg.Connection) -> asyncpg.Connection:
    await pg_seed.load(
        db_url, synthetic(SeedSpec(tenants=2, users=60, roles=8, tenant_prefix="iso"))
    )
    # Captured changes of both tenants, so change_log holds rows of each as well.
    for tenant in (A, B):
        await pg.execute("INSERT INTO pdp.resources (tenant_id, type, id) VALUES ($1, 'document', 'd1')", tenant)
        await pg.execute(
            "UPDATE pdp.users SET status = 'disabled' WHERE tenant_id = $1 AND id = (SELECT min(id) FROM pdp.users WHERE tenant_id = $1)",
            tenant,
        )
    for table in TENANT_TABLES:
        for tenant in (A, B):
            n = await pg.fetchval(f"SELECT count(*) FROM pdp.{table} WHERE tenant_id = $1", tenant)
            assert n > 0, (table, tenant)  # the matrix below needs rows of both on each side
    return pg


@contextlib.asynccontextmanager
async def acting(
    pg: asyncpg.Connection, role: str, **settings: str
) -> AsyncIterator[asyncpg.Connection]:
    """One transaction in `role` (SET LOCAL ROLE), with pdp.* settings as the admin API sets them."""
    async with pg.transaction():
        await pg.execute(f"SET LOCAL ROLE {role}")
        for name, value in settings.items():
            await pg.execute("SELECT set_config($1, $2, true)", f"pdp.{name}", value)
        yield pg


async def owner_count(pg: asyncpg.Connection, table: str, tenant: str) -> int:
    column = "id" if table == "tenants" else "tenant_id"
    return int(await pg.fetchval(f"SELECT count(*) FROM pdp.{table} WHERE {column} = $1", tenant))


@pytest.mark.parametrize("table", TENANT_TABLES)
async def test_the_admin_role_sees_and_changes_only_its_tenant(
    two_tenants: asyncpg.Connection, table: str
) -> None:
    pg = two_tenants
    mine, theirs = await owner_count(pg, table, A), await owner_count(pg, table, B)
    async with acting(pg, "pdp_admin", tenant=A):
        assert await pg.fetchval(f"SELECT count(*) FROM pdp.{table}") == mine
        assert await pg.fetchval(f"SELECT count(*) FROM pdp.{table} WHERE tenant_id = $1", B) == 0
        assert await pg.fetchval(f"SELECT count(DISTINCT tenant_id) FROM pdp.{table}") == 1
        if table != "change_log":  # the change log is append-only for the admin role
            assert (
                await pg.execute(
                    f"UPDATE pdp.{table} SET tenant_id = tenant_id WHERE tenant_id = $1", B
                )
                == "UPDATE 0"
            )
            assert (
                await pg.execute(f"DELETE FROM pdp.{table} WHERE tenant_id = $1", B) == "DELETE 0"
            )
    assert await owner_count(pg, table, B) == theirs
    # Positive control: the same statements do reach the rows of the tenant that is set.
    if table not in ("change_log", "users"):
        async with acting(pg, "pdp_admin", tenant=B):
            assert (
                await pg.execute(
                    f"UPDATE pdp.{table} SET tenant_id = tenant_id WHERE tenant_id = $1", B
                )
                == f"UPDATE {theirs}"
            )


async def test_rows_cannot_be_written_into_or_moved_to_another_tenant(
    two_tenants: asyncpg.Connection,
) -> None:
    pg = two_tenants
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with acting(pg, "pdp_admin", tenant=A):
            await pg.execute("INSERT INTO pdp.roles (tenant_id, id) VALUES ($1, 'intruder')", B)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with acting(pg, "pdp_admin", tenant=A):
            await pg.execute("UPDATE pdp.roles SET tenant_id = $1 WHERE tenant_id = $2", B, A)
    assert await pg.fetchval("SELECT count(*) FROM pdp.roles WHERE id = 'intruder'") == 0
    # Positive control: its own tenant takes the same insert (captured, with the actor).
    async with acting(pg, "pdp_admin", tenant=A, actor="admin-token-a"):
        await pg.execute("INSERT INTO pdp.roles (tenant_id, id) VALUES ($1, 'newcomer')", A)
    row = await pg.fetchrow(
        "SELECT tenant_id, actor FROM pdp.change_log WHERE entity = 'roles' AND key->>'id' = 'newcomer'"
    )
    assert (row["tenant_id"], row["actor"]) == (A, "admin-token-a")


async def test_no_setting_sees_nothing_and_platform_sees_only_tenants(
    two_tenants: asyncpg.Connection,
) -> None:
    pg = two_tenants
    async with acting(pg, "pdp_admin"):
        for table in (*TENANT_TABLES, "tenants"):
            assert await pg.fetchval(f"SELECT count(*) FROM pdp.{table}") == 0, table
        assert await pg.execute("DELETE FROM pdp.tenants") == "DELETE 0"
    async with acting(pg, "pdp_admin", platform="on"):
        assert {r[0] for r in await pg.fetch("SELECT id FROM pdp.tenants")} == {A, B}
        assert await pg.fetchval("SELECT count(*) FROM pdp.users") == 0
    async with acting(pg, "pdp_admin", tenant=A):
        assert [r[0] for r in await pg.fetch("SELECT id FROM pdp.tenants")] == [A]
    assert await pg.fetchval("SELECT count(*) FROM pdp.tenants") == 2


@pytest.mark.parametrize(
    "statement",
    ["TRUNCATE pdp.users CASCADE", "SELECT * FROM pdp.admin_tokens", "SELECT * FROM pdp.sync_meta"],
)
async def test_what_the_admin_role_may_not_do(
    two_tenants: asyncpg.Connection, statement: str
) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
        async with acting(two_tenants, "pdp_admin", tenant=A):
            await two_tenants.execute(statement)


@pytest.mark.parametrize("table", [*TENANT_TABLES, "tenants"])
async def test_the_sidecar_role_reads_everything(
    two_tenants: asyncpg.Connection, table: str
) -> None:
    pg = two_tenants
    total = await pg.fetchval(f"SELECT count(*) FROM pdp.{table}")
    async with acting(pg, "pdp_sidecar"):
        assert await pg.fetchval(f"SELECT count(*) FROM pdp.{table}") == total > 0


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO pdp.roles (tenant_id, id) VALUES ('iso-1', 'x')",
        "UPDATE pdp.users SET status = 'active'",
        "DELETE FROM pdp.change_log",
        "TRUNCATE pdp.roles CASCADE",
        "SELECT * FROM pdp.admin_tokens",
        "SELECT * FROM pdp.admin_token_lookup('000000000000')",
    ],
)
async def test_the_sidecar_role_writes_nothing(
    two_tenants: asyncpg.Connection, statement: str
) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
        async with acting(two_tenants, "pdp_sidecar"):
            await two_tenants.execute(statement)


def _as_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


async def test_a_sidecar_logged_in_as_a_pdp_sidecar_member_loads_and_follows(
    two_tenants: asyncpg.Connection, db_url: str
) -> None:
    pg = two_tenants
    login = f"pdp_sidecar_test_{uuid.uuid4().hex[:8]}"  # roles are cluster-wide: unique per test
    await pg.execute(f"CREATE ROLE {login} LOGIN IN ROLE pdp_sidecar")
    try:
        async with sync_harness.running(_as_user(db_url, login)) as sidecar:
            await sync_harness.assert_equal(pg, sidecar.replica, checks=500)
            user = await pg.fetchval(
                "SELECT min(id) FROM pdp.users WHERE tenant_id = $1 AND status = 'active'", A
            )
            await pg.execute(
                "UPDATE pdp.users SET status = 'disabled' WHERE tenant_id = $1 AND id = $2", A, user
            )
            await sync_harness.assert_equal(pg, sidecar.replica, checks=500)
            engine = sidecar.replica.engine
            assert engine is not None
            assert (
                engine.check(A, user, "document", "d1", "read", time.time()).reason
                == "user_disabled"
            )
    finally:
        await pg.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", login
        )
        await pg.execute(f"DROP ROLE {login}")
