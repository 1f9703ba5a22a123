"""The database enforces the contract whoever writes: each bad row is rejected, nothing written."""

from __future__ import annotations

import asyncpg
import pytest

LONG = "x" * 257


async def _seed_minimal(pg: asyncpg.Connection) -> None:
    await pg.execute(
        """
        INSERT INTO pdp.tenants (id) VALUES ('t');
        INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'u');
        INSERT INTO pdp.groups (tenant_id, id) VALUES ('t', 'g');
        INSERT INTO pdp.roles (tenant_id, id) VALUES ('t', 'a'), ('t', 'b'), ('t', 'c');
        """
    )


async def _counts(pg: asyncpg.Connection) -> tuple[int, ...]:
    row = await pg.fetchrow(
        """SELECT (SELECT count(*) FROM pdp.tenants), (SELECT count(*) FROM pdp.users),
                  (SELECT count(*) FROM pdp.roles), (SELECT count(*) FROM pdp.role_inherits),
                  (SELECT count(*) FROM pdp.role_permissions),
                  (SELECT count(*) FROM pdp.user_roles), (SELECT count(*) FROM pdp.group_roles),
                  (SELECT count(*) FROM pdp.group_members), (SELECT count(*) FROM pdp.change_log)"""
    )
    assert row is not None
    return tuple(row)


REJECTED = [
    # (statement, exception, words the message must contain)
    ("INSERT INTO pdp.tenants (id) VALUES ('')", asyncpg.CheckViolationError, "tenants_id_check"),
    (f"INSERT INTO pdp.tenants (id) VALUES ('{LONG}')", asyncpg.CheckViolationError,
     "tenants_id_check"),
    ("INSERT INTO pdp.users (tenant_id, id) VALUES ('t', '')", asyncpg.CheckViolationError,
     "users_id_check"),
    (f"INSERT INTO pdp.roles (tenant_id, id) VALUES ('t', '{LONG}')",
     asyncpg.CheckViolationError, "roles_id_check"),
    ("INSERT INTO pdp.groups (tenant_id, id) VALUES ('t', '')", asyncpg.CheckViolationError,
     "groups_id_check"),
    ("INSERT INTO pdp.users (tenant_id, id, status) VALUES ('t', 'v', 'banned')",
     asyncpg.CheckViolationError, "users_status_check"),
    ("UPDATE pdp.users SET status = 'Active'", asyncpg.CheckViolationError, "users_status_check"),
    ("INSERT INTO pdp.users (tenant_id, id) VALUES ('nope', 'v')",
     asyncpg.ForeignKeyViolationError, "users_tenant_id_fkey"),
    ("INSERT INTO pdp.group_members VALUES ('t', 'g', 'ghost')",
     asyncpg.ForeignKeyViolationError, "group_members_tenant_id_user_id_fkey"),
    ("INSERT INTO pdp.user_roles (tenant_id, user_id, role_id) VALUES ('t', 'u', 'ghost')",
     asyncpg.ForeignKeyViolationError, "user_roles_tenant_id_role_id_fkey"),
    ("INSERT INTO pdp.users (tenant_id, id) VALUES ('t', NULL)",
     asyncpg.NotNullViolationError, "id"),
    *[
        (f"INSERT INTO pdp.role_permissions VALUES ('t', 'a', '{perm}')",
         asyncpg.CheckViolationError, "role_permissions_permission_check")
        for perm in ("read", "doc:", ":read", "doc:read:x", "doc :read", "*", "doc:**", "-x:read",
                     "", f"{LONG}:read")
    ],
    *[
        (f"INSERT INTO pdp.user_roles (tenant_id, user_id, role_id, scope) "
         f"VALUES ('t', 'u', 'a', '{scope}')",
         asyncpg.CheckViolationError, "user_roles_scope_check")
        for scope in ("", "doc", "doc:", "*:*", ":x", "**", f"doc:{LONG}{LONG}")
    ],
    ("INSERT INTO pdp.group_roles (tenant_id, group_id, role_id, scope) VALUES ('t', 'g', 'a', 'x')",
     asyncpg.CheckViolationError, "group_roles_scope_check"),
]


@pytest.mark.parametrize(("statement", "error", "words"), REJECTED)
async def test_bad_rows_are_rejected_and_nothing_is_written(
    pg: asyncpg.Connection, statement: str, error: type[Exception], words: str
) -> None:
    await _seed_minimal(pg)
    before = await _counts(pg)
    with pytest.raises(error) as info:
        await pg.execute(statement)
    assert words in str(info.value) or words in str(getattr(info.value, "constraint_name", ""))
    assert await _counts(pg) == before


@pytest.mark.parametrize(
    ("permission", "scope"),
    [("doc:read", "*"), ("doc:*", "doc:*"), ("*:read", "doc:42"), ("*:*", "doc:a:b/c"),
     ("api.v2/route:GET", "project:p-1")],
)
async def test_good_grammar_is_accepted(pg: asyncpg.Connection, permission: str, scope: str) -> None:
    await _seed_minimal(pg)
    await pg.execute("INSERT INTO pdp.role_permissions VALUES ('t', 'a', $1)", permission)
    await pg.execute(
        "INSERT INTO pdp.user_roles (tenant_id, user_id, role_id, scope) VALUES ('t', 'u', 'a', $1)",
        scope,
    )
    assert await pg.fetchval("SELECT count(*) FROM pdp.user_roles") == 1


CYCLES = [
    # (edges already there, the edge that closes a cycle, the path the error names)
    ([], ("a", "a"), "a -> a"),
    ([("a", "b")], ("b", "a"), "b -> a -> b"),
    ([("a", "b"), ("b", "c")], ("c", "a"), "c -> a -> b -> c"),
]


@pytest.mark.parametrize(("existing", "edge", "path"), CYCLES)
async def test_role_inheritance_cycles_are_rejected(
    pg: asyncpg.Connection, existing: list[tuple[str, str]], edge: tuple[str, str], path: str
) -> None:
    await _seed_minimal(pg)
    await pg.executemany("INSERT INTO pdp.role_inherits VALUES ('t', $1, $2)", existing)
    before = await _counts(pg)
    with pytest.raises(asyncpg.CheckViolationError) as info:
        await pg.execute("INSERT INTO pdp.role_inherits VALUES ('t', $1, $2)", *edge)
    assert f'role inheritance cycle in tenant "t": {path}' in str(info.value)
    assert await _counts(pg) == before


async def test_cycle_made_by_an_update_is_rejected(pg: asyncpg.Connection) -> None:
    await _seed_minimal(pg)
    await pg.execute("INSERT INTO pdp.role_inherits VALUES ('t', 'a', 'b'), ('t', 'b', 'c')")
    with pytest.raises(asyncpg.CheckViolationError, match="cycle"):
        await pg.execute("UPDATE pdp.role_inherits SET inherits_id = 'a' WHERE role_id = 'b'")
    rows = await pg.fetch("SELECT role_id, inherits_id FROM pdp.role_inherits ORDER BY 1")
    assert [tuple(r) for r in rows] == [("a", "b"), ("b", "c")]


async def test_cycle_in_one_multi_row_statement_is_rejected(pg: asyncpg.Connection) -> None:
    await _seed_minimal(pg)
    with pytest.raises(asyncpg.CheckViolationError, match="cycle"):
        await pg.execute("INSERT INTO pdp.role_inherits VALUES ('t', 'a', 'b'), ('t', 'b', 'a')")
    assert await pg.fetchval("SELECT count(*) FROM pdp.role_inherits") == 0


async def test_diamond_is_not_a_cycle(pg: asyncpg.Connection) -> None:
    await _seed_minimal(pg)
    await pg.execute("INSERT INTO pdp.roles (tenant_id, id) VALUES ('t', 'd')")
    await pg.execute(
        "INSERT INTO pdp.role_inherits VALUES ('t','a','b'), ('t','a','c'), ('t','b','d'), ('t','c','d')"
    )
    assert await pg.fetchval("SELECT count(*) FROM pdp.role_inherits") == 4


async def test_concurrent_halves_of_a_cycle_cannot_both_commit(db_url: str) -> None:
    """Two transactions each add one edge of a 2-cycle; the per-tenant lock stops the second."""
    setup = await asyncpg.connect(db_url)
    one = await asyncpg.connect(db_url)
    two = await asyncpg.connect(db_url)
    try:
        await _seed_minimal(setup)
        tx1 = one.transaction()
        await tx1.start()
        await one.execute("INSERT INTO pdp.role_inherits VALUES ('t', 'a', 'b')")
        blocked = two.execute("INSERT INTO pdp.role_inherits VALUES ('t', 'b', 'a')")
        import asyncio

        task = asyncio.ensure_future(blocked)
        # The second writer must wait on the first's lock, not pass its check.
        done, _ = await asyncio.wait({task}, timeout=0.5)
        assert not done
        await tx1.commit()
        with pytest.raises(asyncpg.CheckViolationError, match="cycle"):
            await task
        assert await setup.fetchval("SELECT count(*) FROM pdp.role_inherits") == 1
    finally:
        for conn in (setup, one, two):
            await conn.close()
