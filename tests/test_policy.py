"""Policy as code: positions in errors, plan/apply/export round trips, the effect, the API."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from pdp.admin import policy
from pdp.pg import seed as pg_seed
from pdp.pg.seed_data import SeedSpec, synthetic

TENANT = "pol-1"


def _pdp(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    return subprocess.run(
        [sys.executable, "-m", "pdp", *args], env={**clean, "PDP_DATABASE_URL": url},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _fails(text: str) -> str:
    value, doc = policy.parse(text, "f.yaml")
    with pytest.raises(policy.PolicyError) as caught:
        policy.desired(value, doc)
    return str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tenant: t\nroles:\n  editor:\n    permisions: [document:read]\n", "f.yaml:4:5: roles.editor.permisions: unknown key"),
        ("tenant: t\nroles:\n  editor:\n    permissions: [document:read, nocolon]\n", "f.yaml:4:34: roles.editor.permissions[1]: must be type:action"),
        ("tenant: t\nroles: {}\nusers:\n  a:\n    roles: [{role: r, expires_at: soon}]\n", "f.yaml:5:35: users.a.roles[0].expires_at: not an ISO 8601"),
        ("tenant: t\nroles: {}\nusers:\n  a:\n    status: gone\n", "f.yaml:5:13: users.a.status: must be active or disabled"),
        ("tenant: t\n", "f.yaml:1:1: document: has no 'roles' section"),
        ("roles: {}\n", "f.yaml:1:1: document: names no tenant"),
        ("tenant: t\nroles: []\n", "f.yaml:2:8: roles: must be a mapping"),
        ("tenant: t\nroles: {}\ncolour: red\n", "f.yaml:3:1: colour: unknown key"),
        ("tenant: t\nroles:\n  r:\n    permissions: [{permission: d:read, condition: 'now <'}]\n", "f.yaml:4:51: roles.r.permissions[0].condition: does not compile"),
    ],
)  # fmt: skip
def test_errors_name_the_position(text: str, message: str) -> None:
    assert _fails(text).startswith(message)


def test_syntax_errors_name_the_position() -> None:
    with pytest.raises(policy.PolicyError, match=r"^f\.yaml:\d+:\d+: not YAML"):
        policy.parse("tenant: t\nroles:\n  - [unclosed\n", "f.yaml")


def test_the_tenant_must_match() -> None:
    value, doc = policy.parse("tenant: a\nroles: {}\n", "f.yaml")
    with pytest.raises(policy.PolicyError, match=r"f\.yaml:1:9: tenant: is 'a', not 'b'"):
        policy.desired(value, doc, "b")


@pytest.fixture
async def seeded(db_url: str, pg: asyncpg.Connection) -> asyncpg.Connection:
    await pg_seed.load(db_url, synthetic(SeedSpec(tenants=1, users=150, roles=12, tenant_prefix="pol")))
    return pg


async def test_export_then_apply_changes_nothing(seeded: asyncpg.Connection, db_url: str, tmp_path: Path) -> None:
    exported = _pdp(db_url, "export", "--tenant", TENANT)
    assert exported.returncode == 0, exported.stderr
    document = yaml.safe_load(exported.stdout)
    assert document["tenant"] == TENANT
    assert len(document["users"]) == 150  # positive control: the export holds the data
    assert any(spec.get("roles") for spec in document["users"].values())
    path = tmp_path / "pol.yaml"
    path.write_text(exported.stdout)
    before = await seeded.fetchval("SELECT count(*) FROM pdp.change_log")
    applied = _pdp(db_url, "apply", str(path))
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.strip() == "no changes"
    assert await seeded.fetchval("SELECT count(*) FROM pdp.change_log") == before


async def test_plan_shows_the_diff_and_its_effect_without_writing(seeded: asyncpg.Connection, db_url: str, tmp_path: Path) -> None:
    document = yaml.safe_load(_pdp(db_url, "export", "--tenant", TENANT).stdout)
    holder = await seeded.fetchrow(
        "SELECT ur.user_id, ur.role_id, ur.scope FROM pdp.user_roles ur"
        " JOIN pdp.users u ON (u.tenant_id, u.id) = (ur.tenant_id, ur.user_id)"
        " WHERE ur.tenant_id = $1 AND u.status = 'active' AND (ur.expires_at IS NULL OR ur.expires_at > now())"
        " ORDER BY ur.user_id, ur.role_id, ur.scope LIMIT 1",
        TENANT,
    )
    assert holder is not None, "the seeded tenant has active assignments"
    role, scope = holder["role_id"], holder["scope"]
    rtype = "ledger" if scope == "*" else scope.partition(":")[0]
    rid = "l1" if scope == "*" or scope.endswith(":*") else scope.partition(":")[2]
    document["roles"][role].setdefault("permissions", []).append(f"{rtype}:audit7")
    path = tmp_path / "change.yaml"
    path.write_text(yaml.safe_dump(document))
    before = await seeded.fetchval("SELECT count(*) FROM pdp.change_log")

    planned = _pdp(db_url, "plan", str(path))
    assert planned.returncode == 0, planned.stderr
    lines = planned.stdout.splitlines()
    assert lines[0] == f"+ role_permissions role_id={role!r}, permission='{rtype}:audit7'"
    assert f"  + {holder['user_id']} {rtype}:audit7 on {scope}" in lines
    assert await seeded.fetchval("SELECT count(*) FROM pdp.change_log") == before

    applied = _pdp(db_url, "apply", str(path), "--actor", "ci-pipeline")
    assert applied.returncode == 0, applied.stderr
    revision = applied.stdout.splitlines()[-1].removeprefix("revision ")
    row = await seeded.fetchrow("SELECT txid::text, actor FROM pdp.change_log ORDER BY id DESC LIMIT 1")
    assert (row["txid"], row["actor"]) == (revision, "ci-pipeline")
    assert await seeded.fetchval("SELECT pdp.check($1, $2, $3, $4, 'audit7')", TENANT, holder["user_id"], rtype, rid)


def _allows(pairs: set[tuple[str, str]], rtype: str, rid: str, action: str) -> bool:
    def permits(permission: str) -> bool:
        ptype, _, paction = permission.partition(":")
        return ptype in ("*", rtype) and paction in ("*", action)

    def covers(scope: str) -> bool:
        return scope in ("*", f"{rtype}:*", f"{rtype}:{rid}")

    return any(permits(p) and covers(s) for p, s in pairs)


async def test_the_effect_uses_the_rule_pdp_check_uses(seeded: asyncpg.Connection, db_url: str) -> None:
    """effective() is what plan reports; held against pdp.check on random questions."""
    from pdp.admin import policy_store
    from pdp.admin.store import connect

    conn = await connect(db_url)
    try:
        state = await policy_store.read_state(conn, TENANT)
    finally:
        await conn.close()
    now = await seeded.fetchval("SELECT now()")
    pairs = policy.effective(state, now.isoformat())
    rng = random.Random(3)
    users = sorted(u for (u,) in state["users"])
    types = sorted({p.partition(":")[0] for (_, p) in state["role_permissions"]} - {"*"}) or ["document"]
    agreed = granted = 0
    for _ in range(600):
        user, rtype = rng.choice(users), rng.choice(types)
        rid, action = f"{rtype}-{rng.randrange(40)}", rng.choice(["read", "write", "delete", "approve"])
        expected = await seeded.fetchval("SELECT pdp.check($1, $2, $3, $4, $5, $6)", TENANT, user, rtype, rid, action, now)
        assert _allows(pairs.get(user, set()), rtype, rid, action) == expected, (user, rtype, rid, action)
        agreed += 1
        granted += bool(expected)
    assert agreed == 600
    assert 0 < granted < 600  # both answers were exercised


async def test_a_refused_change_names_itself_and_writes_nothing(seeded: asyncpg.Connection, db_url: str, tmp_path: Path) -> None:
    document = yaml.safe_load(_pdp(db_url, "export", "--tenant", TENANT).stdout)
    group = next(iter(document["groups"]))
    document["groups"][group].setdefault("members", []).append("nobody-here")
    del document["users"]  # users unmanaged: the member must exist already
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(document))
    before = await seeded.fetchval("SELECT count(*) FROM pdp.change_log")
    result = _pdp(db_url, "apply", str(path))
    assert result.returncode == 2, result.stderr
    assert f"cannot apply '+ group_members group_id={group!r}, user_id='nobody-here'': unknown user 'nobody-here'" in result.stderr
    assert await seeded.fetchval("SELECT count(*) FROM pdp.change_log") == before


async def test_concurrent_applies_of_one_tenant_end_in_one_of_them(seeded: asyncpg.Connection, db_url: str) -> None:
    from pdp.admin import policy_store
    from pdp.admin.store import connect

    documents = [
        {"tenant": TENANT, "roles": {f"only-{n}": {"permissions": [f"doc{n}:read"]}}} for n in range(2)
    ]

    async def apply(document: dict[str, Any]) -> None:
        conn = await connect(db_url)
        try:
            async with conn.transaction():
                await policy_store.plan_or_apply(conn, yaml.safe_dump(document), "c.yaml", write=True)
        finally:
            await conn.close()

    await asyncio.gather(*(apply(d) for d in documents))
    roles = {r[0] for r in await seeded.fetch("SELECT id FROM pdp.roles WHERE tenant_id = $1", TENANT)}
    assert roles in ({"only-0"}, {"only-1"})
    grants = {r[0] for r in await seeded.fetch("SELECT permission FROM pdp.role_permissions WHERE tenant_id = $1", TENANT)}
    assert grants == {f"doc{next(iter(roles))[-1]}:read"}


async def test_conditional_grants_round_trip(seeded: asyncpg.Connection, db_url: str, tmp_path: Path) -> None:
    document = yaml.safe_load(_pdp(db_url, "export", "--tenant", TENANT).stdout)
    role = next(iter(document["roles"]))
    condition = 'action.properties.mode == "soft"'
    document["roles"][role].setdefault("permissions", []).append({"permission": "doc:delete", "condition": condition})
    path = tmp_path / "cond.yaml"
    path.write_text(yaml.safe_dump(document))
    applied = _pdp(db_url, "apply", str(path))
    assert applied.returncode == 0, applied.stderr
    assert f"+ role_permissions role_id={role!r}, permission='doc:delete' {{\"condition\": {json.dumps(condition)}}}" in applied.stdout
    stored = await seeded.fetchval("SELECT condition FROM pdp.role_permissions WHERE tenant_id = $1 AND permission = 'doc:delete'", TENANT)
    assert stored == condition
    exported = _pdp(db_url, "export", "--tenant", TENANT).stdout
    assert {"permission": "doc:delete", "condition": condition} in yaml.safe_load(exported)["roles"][role]["permissions"]
    path.write_text(exported)
    again = _pdp(db_url, "apply", str(path))
    assert again.stdout.strip() == "no changes"
