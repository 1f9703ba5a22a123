"""Conditional grants: the evaluator, the engine's rule, the SQL side and the HTTP API.

The ownership scenario runs end to end: rows written to a real PostgreSQL, a sidecar
kept in sync, decisions asked over HTTP.
"""

from __future__ import annotations

import asyncio
import itertools
import textwrap
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient

from pdp import conditions
from pdp.conditions import Facts
from pdp.config import Settings
from pdp.engine import Engine, Row, Snapshot
from pdp.sidecar import sidecar_app
from sync.pg_fallback import PgFallback
from tests.test_engine_property import (
    ACTIONS,
    NOWS,
    RESOURCES,
    TENANTS,
    USERS,
    model_of,
    rows,
    tables_of,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC).timestamp()
REV = Snapshot(1, 1)
OWNER = "resource.properties.ownerID == subject.attributes.email"


def _engine(perms: list[tuple[str | None, ...]], **extra: list[tuple[Any, ...]]) -> Engine:
    rows: dict[str, list[tuple[Any, ...]]] = {
        "tenants": [("t",)],
        "users": [
            ("t", "alice", "active", '{"email": "alice@t", "region": "eu"}'),
            ("t", "bob", "active", '{"email": "bob@t"}'),
        ],
        "roles": [("t", "editor"), ("t", "admin"), ("t", "base")],
        "role_inherits": [("t", "editor", "base")],
        "role_permissions": [("t", *p) for p in perms],
        "user_roles": [("t", "alice", "editor", "*", None), ("t", "bob", "editor", "*", None)],
    }
    rows.update(extra)
    return Engine.build(rows, REV)


def test_evaluator_outcomes() -> None:
    values = conditions.activation(
        Facts(resource={"n": 3}), "u", '{"email": "u@t"}', "doc", "1", None, "read", NOW
    )
    cases = {
        "resource.properties.n > 2": conditions.TRUE,
        "resource.properties.n > 5": conditions.FALSE,
        "resource.properties.missing == 1": conditions.ERROR,  # missing key
        "resource.properties.n == 'x' || resource.properties.n > 'a'": conditions.ERROR,
        "dyn(resource.properties.n)": conditions.ERROR,  # not a bool at run time
        "subject.attributes.email == 'u@t' && now < timestamp('2026-06-02T00:00:00Z')": conditions.TRUE,
    }
    for text, expected in cases.items():
        assert conditions.evaluate(conditions.compile_condition(text), values)[0] == expected, text
    assert conditions.compile_condition(OWNER) is conditions.compile_condition(OWNER)  # cached


def test_invalid_expressions_are_rejected_counted_once_and_never_grant() -> None:
    assert conditions.validate(OWNER) is None
    assert conditions.validate("") == "the condition is empty"
    assert "returns INT" in (conditions.validate("1 + 1") or "")
    assert "undeclared reference" in (conditions.validate("user.id == 'x'") or "")
    before = conditions.compile_errors()
    text = f"resource.properties.x == {before} &&"  # unique per run
    engine = _engine([("base", "doc:edit", text)])
    engine = _engine([("base", "doc:edit", text)])  # compiled again: counted once
    assert conditions.compile_errors() == before + 1
    decision = engine.check("t", "alice", "doc", "1", "edit", NOW, Facts(resource={"x": 1}))
    assert (decision.allowed, decision.reason, decision.role, decision.permission) == (
        False, "condition_error", "editor", "doc:edit"
    )  # fmt: skip
    assert decision.condition == text
    assert decision.error


def test_ownership_and_reasons() -> None:
    engine = _engine(
        [("base", "doc:edit", OWNER), ("admin", "doc:edit"), ("editor", "doc:read")],
        resources=[("t", "doc", "d1", '{"ownerID": "alice@t"}')],
    )
    alice = engine.check("t", "alice", "doc", "d1", "edit", NOW)
    assert alice.allowed
    assert alice.condition == OWNER
    assert alice.path == ("editor", "base")
    bob = engine.check("t", "bob", "doc", "d1", "edit", NOW)
    assert (bob.allowed, bob.reason, bob.role, bob.permission) == (
        False, "condition_false", "editor", "doc:edit"
    )  # fmt: skip
    # Request properties win over the inventory's attributes.
    stolen = engine.check(
        "t", "bob", "doc", "d1", "edit", NOW, Facts(resource={"ownerID": "bob@t"})
    )
    assert stolen.allowed
    # Not in the inventory and no property given: the condition errs, fail closed.
    unknown = engine.check("t", "alice", "doc", "d9", "edit", NOW)
    assert unknown.reason == "condition_error"
    assert "ownerID" in (unknown.error or "")
    # An unconditional grant decides without a condition.
    read = engine.check("t", "bob", "doc", "d1", "read", NOW)
    assert read.allowed
    assert read.condition is None


def test_action_properties_context_and_now_windows() -> None:
    soft = "action.properties.mode == 'soft'"
    window = "now < timestamp('2026-06-01T12:30:00Z')"
    expired = "now >= timestamp('2026-07-01T00:00:00Z')"
    engine = _engine(
        [
            ("base", "doc:delete", soft),
            ("base", "doc:share", window),
            ("base", "doc:print", expired),
        ]
    )
    assert engine.check(
        "t", "alice", "doc", "1", "delete", NOW, Facts(action={"mode": "soft"})
    ).allowed
    hard = engine.check("t", "alice", "doc", "1", "delete", NOW, Facts(action={"mode": "hard"}))
    assert hard.reason == "condition_false"
    assert engine.check("t", "alice", "doc", "1", "share", NOW).allowed
    assert engine.check("t", "alice", "doc", "1", "share", NOW + 3600).reason == "condition_false"
    assert engine.check("t", "alice", "doc", "1", "print", NOW).reason == "condition_false"


def test_three_candidates_first_true_wins_and_errors_are_reported() -> None:
    engine = _engine(
        [
            ("base", "doc:edit", "resource.properties.a == 1"),
            ("base", "doc:*", "resource.properties.b == 1"),
            ("base", "*:edit", "context.c == 1"),
        ]
    )
    only_c = engine.check(
        "t", "alice", "doc", "1", "edit", NOW, Facts(resource={"a": 0, "b": 0}, context={"c": 1})
    )
    assert only_c.allowed
    assert only_c.permission == "*:edit"
    none = engine.check("t", "alice", "doc", "1", "edit", NOW, Facts(resource={"a": 0, "b": 0}))
    assert none.reason == "condition_error"
    assert none.permission == "*:edit"


# --- PostgreSQL and HTTP ---------------------------------------------------------------

SCENARIO = f"""
INSERT INTO pdp.tenants (id) VALUES ('t');
INSERT INTO pdp.users (tenant_id, id, attributes) VALUES
  ('t', 'alice', '{{"email": "alice@t"}}'), ('t', 'bob', '{{"email": "bob@t"}}'),
  ('t', 'carol', '{{"email": "carol@t"}}'), ('t', 'root', '{{}}');
INSERT INTO pdp.roles (tenant_id, id) VALUES ('t', 'editor'), ('t', 'admin');
INSERT INTO pdp.role_permissions VALUES
  ('t', 'editor', 'document:edit', '{OWNER}'), ('t', 'admin', 'document:edit', NULL);
INSERT INTO pdp.user_roles (tenant_id, user_id, role_id) VALUES
  ('t', 'alice', 'editor'), ('t', 'bob', 'editor'), ('t', 'root', 'admin');
INSERT INTO pdp.resources VALUES
  ('t', 'document', 'd1', '{{"ownerID": "alice@t"}}'),
  ('t', 'document', 'd2', '{{"ownerID": "carol@t"}}');
"""


async def test_sql_check_is_undecided_and_the_fallback_evaluates(
    db_url: str, pg: asyncpg.Connection
) -> None:
    await pg.execute(SCENARIO)
    check = "SELECT pdp.check('t', $1, 'document', $2, 'edit')"
    assert await pg.fetchval(check, "root", "d1") is True
    assert await pg.fetchval(check, "alice", "d1") is None  # only a conditional grant
    assert await pg.fetchval(check, "carol", "d2") is False
    explain = await pg.fetch(
        "SELECT role_id, condition FROM pdp.explain('t', 'alice', 'document', 'd1', 'edit')"
    )
    assert [tuple(r) for r in explain] == [("editor", OWNER)]
    fallback = PgFallback(db_url)
    async with fallback.running():
        assert await fallback("t", "alice", "document", "d1", "edit") is True
        assert await fallback("t", "bob", "document", "d1", "edit") is False
        assert (
            await fallback(
                "t", "bob", "document", "d9", "edit", Facts(resource={"ownerID": "bob@t"})
            )
            is True
        )
        assert await fallback("t", "carol", "document", "d2", "edit") is False
        assert await fallback("t", "root", "document", "d2", "edit") is True


def _ask(user: str, rid: str, **props: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {"type": "document", "id": rid}
    if props:
        resource["properties"] = props
    return {
        "subject": {"type": "user", "id": user, "properties": {"tenant": "t"}},
        "action": {"name": "edit"},
        "resource": resource,
    }


async def test_ownership_end_to_end_over_http(
    db_url: str, pg: asyncpg.Connection, aiohttp_client: AiohttpClient
) -> None:
    await pg.execute(SCENARIO)
    client = await aiohttp_client(sidecar_app(Settings(verify_interval_seconds=3600), db_url))
    async with asyncio.timeout(15):
        while (await client.get("/readyz")).status != 200:  # noqa: ASYNC110 -- behind HTTP
            await asyncio.sleep(0.05)

    async def decide(body: dict[str, Any]) -> dict[str, Any]:
        response = await client.post("/access/v1/evaluation", json=body)
        assert response.status == 200
        result: dict[str, Any] = await response.json()
        return result

    owner = await decide(_ask("alice", "d1"))
    assert owner["decision"] is True
    assert owner["context"]["condition"] == OWNER
    no_role = await decide(_ask("carol", "d2"))
    assert (no_role["decision"], no_role["context"]["reason"]) == (False, "no_grant")
    other = await decide(_ask("bob", "d1"))
    assert other["decision"] is False
    assert other["context"] | {"revision": None} == {
        "reason": "condition_false", "role": "editor", "path": ["editor"],
        "permission": "document:edit", "scope": "*", "condition": OWNER, "revision": None,
    }  # fmt: skip
    assert (await decide(_ask("root", "d2")))["decision"] is True
    # Properties the request gives win over the inventory.
    assert (await decide(_ask("bob", "d1", ownerID="bob@t")))["decision"] is True
    batch = await client.post(
        "/access/v1/evaluations",
        json={"evaluations": [_ask("alice", "d1"), _ask("bob", "d1")]},
    )
    assert (await batch.json())["evaluations"] == [{"decision": True}, {"decision": False}]

    # A condition change propagates like any grant change.
    await pg.execute("UPDATE pdp.role_permissions SET condition = 'true' WHERE role_id = 'editor'")
    async with asyncio.timeout(10):
        while not (await decide(_ask("bob", "d1")))["decision"]:  # noqa: ASYNC110 -- behind HTTP
            await asyncio.sleep(0.02)

    # An expression written by raw SQL that does not compile never grants and is counted.
    before = conditions.compile_errors()
    await pg.execute(
        "UPDATE pdp.role_permissions SET condition = 'resource.properties.ownerID ==' WHERE role_id = 'editor'"
    )
    async with asyncio.timeout(10):
        while (answer := await decide(_ask("alice", "d1")))["decision"]:  # noqa: ASYNC110 -- behind HTTP
            await asyncio.sleep(0.02)
    assert answer["context"]["reason"] == "condition_error"
    assert conditions.compile_errors() == before + 1
    metrics = await (await client.get("/metrics")).text()
    assert f"pdp_condition_errors_total {float(before + 1)}" in metrics


@pytest.mark.parametrize("condition", ["1 +", "nobody.knows == 1"])
def test_cli_grant_rejects_a_condition_that_does_not_compile(
    condition: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from pdp.cli import main

    code = main(["grant", "--tenant", "t", "editor", "doc:edit", "--condition", condition])
    assert code == 2
    assert "--condition does not compile" in capsys.readouterr().err


# --- search ------------------------------------------------------------------------------


def test_searches_decide_conditions_like_check() -> None:
    inventory = [
        ("t", "doc", "d1", '{"ownerID": "alice@t"}'),
        ("t", "doc", "d2", '{"ownerID": "bob@t"}'),
        ("t", "doc", "d3", "{}"),
    ]
    engine = _engine(
        [("base", "doc:edit", OWNER), ("base", "doc:read", None), ("base", "doc:*", "context.ok")],
        resources=inventory,
    )
    mine = engine.resources("t", "alice", "doc", "edit", NOW)
    assert mine.ids == ("d1",)
    assert not mine.all_resources
    assert OWNER in mine.undecided  # d3 has no owner: undecided, left out
    # An unconditional wildcard grant lists the inventory and keeps all_resources.
    everything = engine.resources("t", "alice", "doc", "read", NOW)
    assert everything.ids == ("d1", "d2", "d3")
    assert everything.all_resources
    # Without an inventory a wildcard-scoped conditional grant cannot be listed: said so.
    bare = _engine([("base", "doc:edit", OWNER)])
    assert bare.resources("t", "alice", "doc", "edit", NOW).undecided == (OWNER,)
    assert bare.resources("t", "alice", "doc", "edit", NOW).ids == ()
    # Subject search: who only a condition allows.
    extra, undecided = engine.conditional_subjects("t", "doc", "d2", "edit", NOW)
    assert extra == ["bob"]
    assert undecided == ("context.ok",)  # alice's other candidate: no context given
    assert engine.conditional_subjects("t", "doc", "d3", "edit", NOW)[1] == (OWNER,)
    # Action search: named conditional actions decided; a conditional `doc:*` is undecided.
    acts = engine.actions("t", "alice", "doc", "d1", NOW)
    assert acts.actions == ("edit", "read")
    assert acts.undecided == ("context.ok",)
    assert engine.actions("t", "bob", "doc", "d1", NOW).actions == ("read",)


async def test_inventory_backed_resource_search_over_http(
    db_url: str, pg: asyncpg.Connection, aiohttp_client: AiohttpClient
) -> None:
    await pg.execute(SCENARIO)
    client = await aiohttp_client(sidecar_app(Settings(verify_interval_seconds=3600), db_url))
    async with asyncio.timeout(15):
        while (await client.get("/readyz")).status != 200:  # noqa: ASYNC110 -- behind HTTP
            await asyncio.sleep(0.05)

    async def search(kind: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await client.post(f"/access/v1/search/{kind}", json=body)
        assert response.status == 200
        result: dict[str, Any] = await response.json()
        return result

    subject = {"type": "user", "id": "alice", "properties": {"tenant": "t"}}
    found = await search(
        "resource",
        {"subject": subject, "action": {"name": "edit"}, "resource": {"type": "document"}},
    )
    assert found["results"] == [{"type": "document", "id": "d1"}]
    assert "all_resources" not in found["context"]
    admin = await search(
        "resource",
        {
            "subject": {**subject, "id": "root"},
            "action": {"name": "edit"},
            "resource": {"type": "document"},
        },
    )
    assert [r["id"] for r in admin["results"]] == ["d1", "d2"]
    assert admin["context"]["all_resources"] is True
    who = await search(
        "subject",
        {
            "subject": {"type": "user", "properties": {"tenant": "t"}},
            "action": {"name": "edit"},
            "resource": {"type": "document", "id": "d9", "properties": {"ownerID": "bob@t"}},
        },
    )
    assert [r["id"] for r in who["results"]] == ["bob", "root"]
    unknown = await search(
        "subject",
        {
            "subject": {"type": "user", "properties": {"tenant": "t"}},
            "action": {"name": "edit"},
            "resource": {"type": "document", "id": "d9"},
        },
    )
    assert [r["id"] for r in unknown["results"]] == ["root"]
    assert unknown["context"]["undecided_conditions"] == [OWNER]


# --- forward-auth ---------------------------------------------------------------------------

ROUTES = """
routes:
  - method: PUT
    path: /teams/{team}/docs/{id}
    resource: {type: doc, id: "{id}"}
    action: edit
"""


async def test_forward_auth_requests_go_through_conditions(aiohttp_client: AiohttpClient) -> None:
    from prometheus_client import CollectorRegistry

    from pdp.gateway import parse_routes
    from pdp.replica import Replica
    from pdp.web.app import build_app
    from pdp.web.forward_auth import Gateway, RouteBox
    from tests.test_web_support import Clock, settings

    # The path parameter `team` is a resource property; the method an action property.
    team = (
        "resource.properties.team == subject.attributes.team && action.properties.method == 'PUT'"
    )
    engine = Engine.build(
        {
            "tenants": [("acme",)],
            "users": [("acme", "alice", "active", '{"team": "red"}')],
            "roles": [("acme", "editor")],
            "role_permissions": [("acme", "editor", "doc:edit", team)],
            "user_roles": [("acme", "alice", "editor", "*", None)],
        },
        REV,
    )
    clock = Clock()
    replica = Replica(clock=clock)
    replica.install(engine, epoch="e", synced_at=clock())
    app = build_app(
        settings(forward_auth_mode="traefik"),
        replica=replica,
        registry=CollectorRegistry(),
        gateway=Gateway(RouteBox(parse_routes(ROUTES))),
    )
    client = await aiohttp_client(app)

    async def ask(uri: str) -> tuple[int, Any]:
        headers = {"X-Forwarded-Method": "PUT", "X-Forwarded-Uri": uri, "X-User-Id": "alice"}
        response = await client.get("/forward-auth", headers=headers)
        body = await response.read()
        return response.status, (await response.json()) if body else None

    assert (await ask("/teams/red/docs/d1"))[0] == 200
    status, body = await ask("/teams/blue/docs/d1")
    assert status == 403
    assert body["reason"] == "condition_false"


# --- README: the worked examples, as written ---------------------------------------------


def _readme_sql() -> list[str]:
    from pathlib import Path

    text = Path(__file__).parent.parent.joinpath("README.md").read_text(encoding="utf-8")
    section = text.split("\n## Conditions\n", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```sql\n")[1:]]
    return [textwrap.dedent(b) for b in blocks]


async def test_the_readme_examples_work_as_written(pg: asyncpg.Connection) -> None:
    from sync import pg_queries as q

    await pg.execute("""
        INSERT INTO pdp.tenants (id) VALUES ('acme');
        INSERT INTO pdp.users (tenant_id, id) VALUES ('acme', 'alice'), ('acme', 'bob'), ('acme', 'root');
        INSERT INTO pdp.roles (tenant_id, id) VALUES ('acme', 'editor'), ('acme', 'admin'), ('acme', 'contractor');
        INSERT INTO pdp.role_permissions VALUES ('acme', 'admin', 'document:edit', NULL);
        INSERT INTO pdp.user_roles (tenant_id, user_id, role_id) VALUES
          ('acme', 'alice', 'editor'), ('acme', 'bob', 'editor'), ('acme', 'root', 'admin'),
          ('acme', 'bob', 'contractor');
    """)
    blocks = _readme_sql()
    assert len(blocks) == 3
    for sql in blocks:
        await pg.execute(sql)
    rows = {e: [tuple(r) for r in await pg.fetch(sql, "acme")] for e, sql in q.TENANT_ROWS.items()}
    engine = Engine.build(rows, REV)
    at = datetime(2026, 12, 1, tzinfo=UTC).timestamp()

    def allowed(user: str, rtype: str, action: str, facts: Facts | None = None) -> str:
        decision = engine.check("acme", user, rtype, "d1", action, at, facts)
        return "granted" if decision.allowed else decision.reason

    assert allowed("alice", "document", "edit") == "granted"
    assert allowed("bob", "document", "edit") == "condition_false"
    assert allowed("root", "document", "edit") == "granted"
    assert allowed("alice", "document", "delete", Facts(action={"mode": "soft"})) == "granted"
    assert (
        allowed("alice", "document", "delete", Facts(action={"mode": "hard"})) == "condition_false"
    )
    assert allowed("alice", "document", "delete") == "condition_error"
    assert allowed("bob", "report", "read") == "granted"
    later = engine.check(
        "acme", "bob", "report", "r1", "read", datetime(2027, 2, 1, tzinfo=UTC).timestamp()
    )
    assert later.reason == "condition_false"


def test_a_wildcard_condition_that_reads_nothing_of_the_resource_covers_every_one() -> None:
    window = "now < timestamp('2026-06-01T12:30:00Z')"
    engine = _engine([("base", "doc:edit", window), ("base", "img:*", window)])
    found = engine.resources("t", "alice", "doc", "edit", NOW)
    assert found.all_resources
    assert found.undecided == ()
    assert not engine.resources("t", "alice", "doc", "edit", NOW + 3600).all_resources
    acts = engine.actions("t", "alice", "img", "1", NOW)
    assert acts.all_actions
    assert acts.undecided == ()
    later = engine.actions("t", "alice", "img", "1", NOW + 3600)
    assert not later.all_actions
    assert later.undecided == ()  # false for every action alike: decided


def test_a_search_flags_wildcard_conditions_that_may_pass_outside_the_inventory() -> None:
    inventory = {"resources": [("t", "doc", "2", '{"owner": "bob"}')]}
    by_id = _engine([("base", "doc:read", "resource.id == '1'")], **inventory)
    found = by_id.resources("t", "alice", "doc", "read", NOW)
    assert by_id.check("t", "alice", "doc", "1", "read", NOW).allowed  # not in the inventory
    assert found.ids == ()
    assert found.undecided == ("resource.id == '1'",)  # so the answer says it may be short
    absent = _engine([("base", "doc:read", "!has(resource.attributes.owner)")], **inventory)
    found = absent.resources("t", "alice", "doc", "read", NOW)
    assert absent.check("t", "alice", "doc", "9", "read", NOW).allowed
    assert found.undecided == ("!has(resource.attributes.owner)",)
    owner = _engine([("base", "doc:read", "resource.attributes.owner == subject.id")], **inventory)
    found = owner.resources("t", "bob", "doc", "read", NOW)
    assert found.ids == ("2",)
    assert found.undecided == ()  # an unlisted resource has no owner: decided, and complete


# --- reverse queries agree with check, conditions included (property test) ----------------

REVERSE_CONDITIONS = [
    None,
    None,
    "resource.properties.a == 1",  # from the inventory (`{"a": 1}`)
    "resource.id == '1'",
    "subject.id == 'u1'",
    "action.name == 'read'",
    "now < timestamp('1970-01-01T00:00:12Z')",  # open at 10, closed at 15
    "context.flag",  # never given: an error
]


@settings(deadline=None, max_examples=80)
@given(rows(), st.lists(st.sampled_from(REVERSE_CONDITIONS), min_size=30, max_size=30))
def test_reverse_queries_agree_with_check_under_conditions(
    data: list[tuple[str, Row]], picks: list[str | None]
) -> None:
    conditioned = []
    for i, (entity, row) in enumerate(data):
        pick = picks[i % len(picks)]
        conditioned.append((entity, (*row[:3], pick) if entity == "role_permissions" else row))
    engine = Engine.build(tables_of(model_of(conditioned)), REV)
    for tenant, now in itertools.product((*TENANTS, "t9"), NOWS):
        for (rtype, rid), action in itertools.product(RESOURCES, ACTIONS):
            allowed = {u for u in USERS if engine.check(tenant, u, rtype, rid, action, now).allowed}
            found = set(engine.subjects(tenant, rtype, rid, action, now))
            found |= set(engine.conditional_subjects(tenant, rtype, rid, action, now)[0])
            assert found == allowed, (tenant, rtype, rid, action, now)
        for user, (rtype, rid) in itertools.product(USERS, RESOURCES):
            result = engine.actions(tenant, user, rtype, rid, now)
            for action in (*ACTIONS, "zzz"):
                ok = engine.check(tenant, user, rtype, rid, action, now).allowed
                listed = action in result.actions or result.all_actions
                assert listed <= ok, (tenant, user, rtype, rid, action)  # never more than check
                assert ok <= listed or bool(result.undecided), (tenant, user, rtype, rid, action)
        for user, rtype, action in itertools.product(USERS, ("doc", "img"), ACTIONS):
            found_r = engine.resources(tenant, user, rtype, action, now)
            for rid in ("1", "2", "zzz"):
                ok = engine.check(tenant, user, rtype, rid, action, now).allowed
                assert (rid in found_r.ids) <= ok, (tenant, user, rtype, rid, action)
                covered = rid in found_r.ids or found_r.all_resources
                assert ok <= covered or bool(found_r.undecided), (tenant, user, rtype, rid, action)


def test_conditional_subjects_come_in_pieces_that_add_up() -> None:
    users = [(f"u{i:03d}", "active", f'{{"n": {i}}}') for i in range(450)]
    engine = Engine.build(
        {
            "tenants": [("t",)],
            "users": [("t", *u) for u in users],
            "roles": [("t", "r")],
            "role_permissions": [("t", "r", "doc:read", "subject.attributes.n % 3 == 0")],
            "user_roles": [("t", u[0], "r", "*", None) for u in users],
        },
        REV,
    )
    pieces = list(engine.conditional_subject_chunks("t", "doc", "1", "read", NOW))
    assert len(pieces) == 9  # 50 candidates a piece
    ids = sorted(uid for allowed, _ in pieces for uid in allowed)
    assert ids == sorted(engine.conditional_subjects("t", "doc", "1", "read", NOW)[0])
    assert ids == [f"u{i:03d}" for i in range(0, 450, 3)]


def test_resource_search_pauses_between_pieces_of_inventory() -> None:
    inventory = [("t", "doc", f"d{i:03d}", f'{{"n": {i}}}') for i in range(450)]
    engine = _engine([("base", "doc:read", "resource.attributes.n % 2 == 0")], resources=inventory)
    steps = engine.resource_steps("t", "alice", "doc", "read", NOW)
    pauses = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result = done.value
            break
        pauses += 1
    assert pauses == 9  # after every 50 resources
    assert result == engine.resources("t", "alice", "doc", "read", NOW)
    assert result.ids == tuple(f"d{i:03d}" for i in range(0, 450, 2))
    assert list(engine.resource_steps("t9", "alice", "doc", "read", NOW)) == []  # no tenant
