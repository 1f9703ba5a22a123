"""GDPR erasure end to end: `pdp erase-subject` against a real database and a running sidecar."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from pdp.admin import erasure
from sync import pg_retention
from tests.sync_harness import MAX_STALENESS, current_xid, horizon_passed, running, settle

T = "acme"
KEY = b"k" * 32


async def _setup(pg: asyncpg.Connection) -> None:
    """alice (with personal attributes) and bob, both editors through a group; alice also directly."""
    await pg.execute("SELECT set_config('pdp.actor', 'hr-sync', false)")
    await pg.execute("INSERT INTO pdp.tenants (id) VALUES ($1), ('other')", T)
    for statement in [
        "INSERT INTO pdp.users (tenant_id, id, attributes) VALUES ($1, 'alice', '{\"email\": \"alice@example.test\"}'), ($1, 'bob', '{}')",
        "INSERT INTO pdp.groups (tenant_id, id) VALUES ($1, 'eng')",
        "INSERT INTO pdp.group_members (tenant_id, group_id, user_id) VALUES ($1, 'eng', 'alice'), ($1, 'eng', 'bob')",
        "INSERT INTO pdp.roles (tenant_id, id) VALUES ($1, 'editor'), ($1, 'owner')",
        "INSERT INTO pdp.role_permissions (tenant_id, role_id, permission) VALUES ($1, 'editor', 'document:write'), ($1, 'owner', 'document:delete')",
        "INSERT INTO pdp.group_roles (tenant_id, group_id, role_id, scope) VALUES ($1, 'eng', 'editor', '*')",
        "INSERT INTO pdp.user_roles (tenant_id, user_id, role_id, scope) VALUES ($1, 'alice', 'owner', 'document:1')",
        "UPDATE pdp.users SET status = 'active', attributes = '{\"email\": \"a@example.test\"}' WHERE tenant_id = $1 AND id = 'alice'",
    ]:
        await pg.execute(statement, T)
    # Something alice did herself (her name as the actor), and a same-named user elsewhere.
    await pg.execute("SELECT set_config('pdp.actor', 'alice', false)")
    await pg.execute("INSERT INTO pdp.roles (tenant_id, id) VALUES ($1, 'set-up-by-her')", T)
    await pg.execute("SELECT set_config('pdp.actor', 'hr-sync', false)")
    await pg.execute("INSERT INTO pdp.users (tenant_id, id) VALUES ('other', 'alice')")


def _erase(url: str, key_file: Path | None, user: str = "alice") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")} | {"PDP_DATABASE_URL": url}
    if key_file is not None:
        env["PDP_PSEUDONYM_KEY_FILE"] = str(key_file)
    return subprocess.run(
        [sys.executable, "-m", "pdp", "erase-subject", "--tenant", T, "--user", user],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


async def _naming(pg: asyncpg.Connection, text: str) -> int:
    """History rows of tenant T whose text contains `text` anywhere."""
    found = await pg.fetchval(
        "SELECT count(*) FROM (SELECT tenant_id, key, old, new, actor FROM pdp.change_log"
        " UNION ALL SELECT tenant_id, key, old, new, actor FROM pdp.audit_archive) h"
        " WHERE tenant_id = $1 AND concat(key::text, old::text, new::text, actor) LIKE '%' || $2 || '%'",
        T, text,
    )  # fmt: skip
    return int(found)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "pseudonym.key"
    path.write_bytes(KEY + b"\n")
    return path


async def test_erasure_removes_access_within_the_staleness_bound_and_pseudonymises_history(
    db_url: str, pg: asyncpg.Connection, key_file: Path
) -> None:
    await _setup(pg)
    # Half the history is already past the sync window: in the archive.
    await horizon_passed(pg, await current_xid(pg) - 1)
    moved = await pg_retention.prune(pg, retention_seconds=0)
    assert moved.removed > 0
    await pg.execute("INSERT INTO pdp.user_roles (tenant_id, user_id, role_id, scope) VALUES ($1, 'alice', 'editor', 'folder:9')", T)
    assert await _naming(pg, "alice") > 0
    assert await _naming(pg, "alice@example.test") > 0
    async with running(db_url) as sidecar:
        await settle(pg, sidecar.replica)
        engine = sidecar.replica.engine
        assert engine is not None
        assert engine.check(T, "alice", "document", "1", "delete", time.time()).allowed
        assert engine.check(T, "alice", "document", "x", "write", time.time()).allowed

        done = await asyncio.to_thread(_erase, db_url, key_file)
        erased_at = time.monotonic()
        assert done.returncode == 0, done.stderr
        alias = erasure.pseudonym(KEY, T, "alice")
        lines = done.stdout.splitlines()
        assert lines[:3] == ["user: deleted", "group memberships deleted: 1", "role assignments deleted: 2"]
        assert f"pseudonym: {alias}" in lines
        # The sidecar stops granting within the staleness bound (it reloads the tenant).
        async with asyncio.timeout(MAX_STALENESS):
            while True:
                engine = sidecar.replica.engine
                assert engine is not None
                if not engine.check(T, "alice", "document", "1", "delete", time.time()).allowed:
                    break
                await sidecar.replica.wait_for_revision(await current_xid(pg), 0.2)
        assert time.monotonic() - erased_at < MAX_STALENESS
        await settle(pg, sidecar.replica)
        engine = sidecar.replica.engine
        assert engine is not None
        assert engine.check(T, "alice", "document", "x", "write", time.time()).reason == "unknown_user"
        assert engine.check(T, "bob", "document", "x", "write", time.time()).allowed
        assert engine.check("other", "alice", "document", "x", "write", time.time()).reason == "no_grant"

    assert await pg.fetchval("SELECT count(*) FROM pdp.users WHERE tenant_id = $1 AND id = 'alice'", T) == 0
    assert await pg.fetchval("SELECT count(*) FROM pdp.group_members WHERE tenant_id = $1 AND user_id = 'alice'", T) == 0
    # No history row of the tenant names her, or keeps her attributes...
    assert await _naming(pg, "alice") == 0
    assert await _naming(pg, "example.test") == 0
    # ...and every one that did now carries the same pseudonym: still linkable.
    linked = await pg.fetch(
        "SELECT entity, op, actor FROM (SELECT * FROM pdp.change_log UNION ALL SELECT * FROM pdp.audit_archive) h"
        " WHERE tenant_id = $1 AND concat(key::text, old::text, new::text, actor) LIKE '%' || $2 || '%' ORDER BY id",
        T, alias,
    )  # fmt: skip
    entities = [(r["entity"], r["op"]) for r in linked]
    assert entities.count(("users", "insert")) == 1
    assert entities.count(("users", "update")) == 1
    assert entities.count(("users", "delete")) == 1
    assert entities.count(("group_members", "delete")) == 1
    assert entities.count(("user_roles", "delete")) == 2
    assert ("roles", "insert", alias) in [(r["entity"], r["op"], r["actor"]) for r in linked]
    # Bob and the other tenant's alice are untouched.
    assert await _naming(pg, "bob") > 0
    assert await pg.fetchval("SELECT count(*) FROM (SELECT * FROM pdp.change_log UNION ALL SELECT * FROM pdp.audit_archive) h WHERE tenant_id = 'other' AND key ->> 'id' = 'alice'") == 1
    # The erasure itself is in the audit trail, under its own actor.
    assert await pg.fetchval("SELECT count(*) FROM pdp.change_log WHERE actor = $1 AND op = 'delete'", erasure.ACTOR) == 4


async def test_erasure_refuses_to_run_without_a_key(db_url: str, pg: asyncpg.Connection, tmp_path: Path) -> None:
    await _setup(pg)
    before = await _naming(pg, "alice")
    done = await asyncio.to_thread(_erase, db_url, None)
    assert done.returncode == 2
    assert "PDP_PSEUDONYM_KEY_FILE" in done.stderr
    short = tmp_path / "short.key"
    short.write_bytes(b"abc")
    done = await asyncio.to_thread(_erase, db_url, short)
    assert done.returncode == 2
    assert "at least 16 bytes" in done.stderr
    assert "Traceback" not in done.stderr
    assert await _naming(pg, "alice") == before
    assert await pg.fetchval("SELECT count(*) FROM pdp.users WHERE tenant_id = $1 AND id = 'alice'", T) == 1


async def test_pseudonyms_are_keyed_stable_and_distinct(db_url: str, pg: asyncpg.Connection, key_file: Path) -> None:
    assert erasure.pseudonym(KEY, T, "alice") == erasure.pseudonym(KEY, T, "alice")
    assert erasure.pseudonym(KEY, T, "alice") != erasure.pseudonym(KEY, T, "bob")
    assert erasure.pseudonym(KEY, T, "alice") != erasure.pseudonym(KEY, "other", "alice")
    assert erasure.pseudonym(KEY, T, "alice") != erasure.pseudonym(b"x" * 32, T, "alice")
    await _setup(pg)
    assert (await asyncio.to_thread(_erase, db_url, key_file, "bob")).returncode == 0
    # Erasing again finds nothing left to change, and says so.
    again = await asyncio.to_thread(_erase, db_url, key_file, "bob")
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == "user: not present (history only)"
    assert "change_log rows pseudonymised: 0" in again.stdout
