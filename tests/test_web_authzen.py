"""The AuthZEN endpoints over a real aiohttp server and a hand-written tenant."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from pdp.engine import Snapshot
from pdp.replica import Replica
from tests.test_web_support import (
    PAGER_DOCS,
    READERS,
    TENANT,
    Clock,
    RecordingFallback,
    engine,
    evaluation,
    ids,
    loaded_replica,
    make_app,
    settings,
)

EVALUATION = "/access/v1/evaluation"
EVALUATIONS = "/access/v1/evaluations"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def replica(clock: Clock) -> Replica:
    return loaded_replica(clock)


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, replica: Replica) -> TestClient[Any, Any]:
    return await aiohttp_client(make_app(replica))


async def post(
    client: TestClient[Any, Any], path: str, body: Any, **headers: str
) -> tuple[int, Any, ClientResponse]:
    """(status, the JSON answer, the response) of a POST of `body` as JSON."""
    response = await client.post(path, json=body, headers=headers)
    assert response.content_type == "application/json"
    assert response.headers["X-Request-ID"]
    return response.status, await response.json(), response


# --- evaluation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "action", "rid", "allowed", "reason"),
    [
        ("alice", "read", "d1", True, "granted"),
        ("bob", "read", "d1", True, "granted"),
        ("bob", "write", "d1", False, "no_grant"),
        ("bob", "write", "d2", True, "granted"),
        ("carol", "read", "d1", False, "user_disabled"),
        ("erin", "read", "d3", False, "expired"),
        ("nobody", "read", "d1", False, "unknown_user"),
        ("dave", "write", "d9", True, "granted"),
    ],
)
async def test_evaluation_decisions(
    client: TestClient[Any, Any], user: str, action: str, rid: str, allowed: bool, reason: str
) -> None:
    status, body, _ = await post(client, EVALUATION, evaluation(user, action, rid=rid))
    assert status == 200
    assert body["decision"] is allowed
    assert body["context"]["reason"] == reason
    assert body["context"]["revision"] == "100:105:102"


async def test_grant_context_names_role_scope_and_group(client: TestClient[Any, Any]) -> None:
    _, body, _ = await post(client, EVALUATION, evaluation("dave", "read", rid="d9"))
    assert body["context"] == {
        "reason": "granted",
        "role": "editor",
        "path": ["editor", "viewer"],
        "permission": "document:read",
        "via_group": "eng",
        "scope": "document:*",
        "revision": "100:105:102",
    }


async def test_tenant_from_subject_properties(client: TestClient[Any, Any]) -> None:
    body = evaluation("zed", "anything", "invoice", "i1", properties={"tenant": "globex"})
    _, answer, _ = await post(client, EVALUATION, body)
    assert answer["decision"] is True
    _, answer, _ = await post(client, EVALUATION, evaluation("zed", "read"))  # default: acme
    assert answer["context"]["reason"] == "unknown_user"
    body = evaluation("zed", properties={"tenant": "initech"})
    _, answer, _ = await post(client, EVALUATION, body)
    assert answer["context"]["reason"] == "unknown_tenant"


async def test_no_tenant_anywhere_is_400(aiohttp_client: AiohttpClient, replica: Replica) -> None:
    client = await aiohttp_client(make_app(replica, settings(default_tenant=None)))
    status, body, _ = await post(client, EVALUATION, evaluation())
    assert status == 400
    assert body["field"] == "subject.properties.tenant"
    body = evaluation("alice", properties={"tenant": TENANT})
    status, answer, _ = await post(client, EVALUATION, body)
    assert (status, answer["decision"]) == (200, True)


async def test_subject_types_that_are_not_users_are_a_deny(client: TestClient[Any, Any]) -> None:
    body = evaluation()
    body["subject"]["type"] = "robot"
    status, answer, _ = await post(client, EVALUATION, body)
    assert status == 200
    assert answer == {"decision": False, "context": {"reason": "unsupported_subject_type", "revision": "100:105:102"}}
    # `identity` (what gateways send) names pdp users by default, like `user`.
    body["subject"]["type"] = "identity"
    status, answer, _ = await post(client, EVALUATION, body)
    assert (status, answer["decision"], answer["context"]["reason"]) == (200, True, "granted")


async def test_accepted_subject_types_are_configured(aiohttp_client: AiohttpClient, replica: Replica) -> None:
    client = await aiohttp_client(make_app(replica, settings(subject_types=("principal",))))
    body = evaluation()
    for stype, allowed in (("principal", True), ("user", False), ("identity", False)):
        body["subject"]["type"] = stype
        _, answer, _ = await post(client, EVALUATION, body)
        assert answer["decision"] is allowed, stype
    search = {**SUBJECT_SEARCH, "subject": {"type": "principal"}}
    _, answer, _ = await post(client, "/access/v1/search/subject", search)
    assert answer["results"]
    assert {r["type"] for r in answer["results"]} == {"principal"}


async def test_unknown_members_are_ignored(client: TestClient[Any, Any]) -> None:
    body = evaluation(properties={"department": "x", "nested": {"a": [1]}})
    body["extra"] = {"anything": True}
    body["context"] = {"time": "now"}
    body["action"]["properties"] = {"soft": True}
    status, answer, _ = await post(client, EVALUATION, body)
    assert (status, answer["decision"]) == (200, True)


async def test_request_id_echoed_or_generated(client: TestClient[Any, Any]) -> None:
    _, _, response = await post(client, EVALUATION, evaluation(), **{"X-Request-ID": "req-42"})
    assert response.headers["X-Request-ID"] == "req-42"
    _, _, first = await post(client, EVALUATION, evaluation())
    _, _, second = await post(client, EVALUATION, evaluation())
    generated = {first.headers["X-Request-ID"], second.headers["X-Request-ID"]}
    assert len(generated) == 2
    assert all(re.fullmatch(r"[0-9a-f]{32}", g) for g in generated), generated
    response = await client.post(EVALUATION, data=b"{", headers={"X-Request-ID": "bad-1"})
    assert response.status == 400
    assert response.headers["X-Request-ID"] == "bad-1"


async def test_same_request_same_answer(client: TestClient[Any, Any]) -> None:
    answers = [(await post(client, EVALUATION, evaluation("bob", rid="d1")))[1] for _ in range(3)]
    expected = {
        "decision": True,
        "context": {
            "reason": "granted",
            "role": "viewer",
            "path": ["viewer"],
            "permission": "document:read",
            "scope": "document:d1",
            "revision": "100:105:102",
        },
    }
    assert answers == [expected] * 3


# --- evaluations --------------------------------------------------------------------


async def test_batch_defaults_are_replaced_per_whole_entity(client: TestClient[Any, Any]) -> None:
    body = {
        "subject": {"type": "user", "id": "bob"},
        "action": {"name": "read"},
        "resource": {"type": "document", "id": "d1"},
        "evaluations": [
            {},
            {"resource": {"type": "document", "id": "d2"}, "action": {"name": "write"}},
            {"subject": {"type": "user", "id": "alice"}, "action": {"name": "delete"}},
            # `subject` replaces the default as a whole: no id is inherited from it.
            {"subject": {"type": "user"}},
            {"action": {"name": "write"}},
        ],
        "options": {"include_reasons": True},
    }
    status, answer, _ = await post(client, EVALUATIONS, body)
    assert status == 200
    decisions = [e["decision"] for e in answer["evaluations"]]
    assert decisions == [True, True, True, False, False]
    assert [e["context"]["reason"] for e in answer["evaluations"]] == [
        "granted", "granted", "granted", "bad_request", "no_grant",
    ]  # fmt: skip
    assert answer["evaluations"][3]["context"]["error"] == {
        "status": 400,
        "message": "evaluations[3].subject.id is required",
        "field": "evaluations[3].subject.id",
    }
    assert answer["context"]["revision"] == "100:105:102"


async def test_batch_entries_are_bare_decisions_by_default(client: TestClient[Any, Any]) -> None:
    """AuthZEN clients compare batch entries as JSON: exactly {"decision": ...}. A malformed
    entry still says what is wrong with it (a report, not a decision's reason)."""
    body = {
        "action": {"name": "read"},
        "resource": {"type": "document", "id": "d1"},
        "evaluations": [
            {"subject": {"type": "user", "id": "alice"}},
            {"subject": {"type": "user", "id": "carol"}},
            {"subject": {"type": "robot", "id": "r2"}},
            {"subject": {"type": "user"}},
        ],
    }
    status, answer, _ = await post(client, EVALUATIONS, body)
    assert status == 200
    assert answer["evaluations"][:3] == [{"decision": True}, {"decision": False}, {"decision": False}]
    assert answer["evaluations"][3]["context"]["reason"] == "bad_request"
    assert answer["context"] == {"revision": "100:105:102"}
    body["options"] = {"include_reasons": False}
    assert (await post(client, EVALUATIONS, body))[1]["evaluations"][:3] == answer["evaluations"][:3]
    body["options"] = {"include_reasons": True}
    _, explained, _ = await post(client, EVALUATIONS, body)
    assert [e["context"]["reason"] for e in explained["evaluations"]] == [
        "granted", "user_disabled", "unsupported_subject_type", "bad_request",
    ]  # fmt: skip
    body["options"] = {"include_reasons": "yes"}
    status, error, _ = await post(client, EVALUATIONS, body)
    assert (status, error["field"]) == (400, "options.include_reasons")


async def test_batch_entry_missing_resource_after_defaults(client: TestClient[Any, Any]) -> None:
    body = {
        "subject": {"type": "user", "id": "alice"},
        "action": {"name": "read"},
        "evaluations": [{"resource": {"type": "document", "id": "x"}}, {}],
    }
    status, answer, _ = await post(client, EVALUATIONS, body)
    assert status == 200
    assert [e["decision"] for e in answer["evaluations"]] == [True, False]
    assert answer["evaluations"][1]["context"]["error"]["field"] == "evaluations[1].resource"


def _batch(*pairs: tuple[str, str], semantic: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "action": {"name": "read"},
        "resource": {"type": "document", "id": "d1"},
        "evaluations": [
            {"subject": {"type": "user", "id": user}, "action": {"name": action}}
            for user, action in pairs
        ],
    }
    if semantic is not None:
        body["options"] = {"evaluations_semantic": semantic, "other_option": 1}
    return body


@pytest.mark.parametrize(
    ("semantic", "expected"),
    [
        (None, [True, False, True, False]),
        ("execute_all", [True, False, True, False]),
        ("deny_on_first_deny", [True, False]),
        ("permit_on_first_permit", [True]),
    ],
)
async def test_batch_semantics(
    client: TestClient[Any, Any], semantic: str | None, expected: list[bool]
) -> None:
    pairs = [("bob", "read"), ("bob", "write"), ("alice", "read"), ("carol", "read")]
    status, answer, _ = await post(client, EVALUATIONS, _batch(*pairs, semantic=semantic))
    assert status == 200
    assert [e["decision"] for e in answer["evaluations"]] == expected


async def test_permit_on_first_permit_scans_past_denies(client: TestClient[Any, Any]) -> None:
    pairs = [("carol", "read"), ("bob", "write"), ("alice", "read"), ("bob", "read")]
    body = _batch(*pairs, semantic="permit_on_first_permit")
    _, answer, _ = await post(client, EVALUATIONS, body)
    assert [e["decision"] for e in answer["evaluations"]] == [False, False, True]


@pytest.mark.parametrize("evaluations", [None, []])
async def test_batch_without_entries_is_a_single_evaluation(
    client: TestClient[Any, Any], evaluations: list[Any] | None
) -> None:
    body: dict[str, Any] = evaluation("bob", "read", rid="d1")
    if evaluations is not None:
        body["evaluations"] = evaluations
    status, answer, _ = await post(client, EVALUATIONS, body)
    assert status == 200
    assert "evaluations" not in answer
    assert answer["decision"] is True
    assert answer["context"]["reason"] == "granted"
    del body["resource"]
    status, answer, _ = await post(client, EVALUATIONS, body)
    assert (status, answer["field"]) == (400, "resource")


async def test_batch_over_the_limit_is_400(client: TestClient[Any, Any]) -> None:
    body = _batch(*[("alice", "read")] * 51)
    status, answer, _ = await post(client, EVALUATIONS, body)
    assert (status, answer["field"]) == (400, "evaluations")
    status, answer, _ = await post(client, EVALUATIONS, _batch(*[("alice", "read")] * 50))
    assert status == 200
    assert len(answer["evaluations"]) == 50


async def test_unknown_semantic_is_400(client: TestClient[Any, Any]) -> None:
    status, answer, _ = await post(client, EVALUATIONS, _batch(("a", "b"), semantic="majority"))
    assert (status, answer["field"]) == (400, "options.evaluations_semantic")


# --- search -------------------------------------------------------------------------


async def _walk(
    client: TestClient[Any, Any], path: str, body: dict[str, Any], limit: int
) -> list[list[Any]]:
    """Every page of a search, following next_token to the end."""
    pages: list[list[Any]] = []
    token = None
    for _ in range(100):
        page: dict[str, Any] = {"limit": limit}
        if token is not None:
            page["token"] = token
        status, answer, _ = await post(client, path, {**body, "page": page})
        assert status == 200, answer
        assert answer["page"]["count"] == len(answer["results"]) <= limit
        pages.append(answer["results"])
        token = answer["page"]["next_token"]
        if token == "":
            return pages
    raise AssertionError("paging never ended")


SUBJECT_SEARCH = {
    "subject": {"type": "user"},
    "action": {"name": "read"},
    "resource": {"type": "document", "id": "d1"},
}
RESOURCE_SEARCH = {
    "subject": {"type": "user", "id": "pager"},
    "action": {"name": "read"},
    "resource": {"type": "document"},
}


async def test_subject_search_pages_cover_the_full_answer(client: TestClient[Any, Any]) -> None:
    status, full, _ = await post(client, "/access/v1/search/subject", SUBJECT_SEARCH)
    assert status == 200
    expected = sorted(["alice", "bob", "dave", *READERS])
    assert ids(full["results"]) == expected
    assert all(r["type"] == "user" for r in full["results"])
    assert full["page"]["next_token"] == ""
    pages = await _walk(client, "/access/v1/search/subject", SUBJECT_SEARCH, limit=4)
    assert len(pages) == 7
    assert [i for page in pages for i in ids(page)] == expected


async def test_subject_search_ignores_subject_id_and_other_types(
    client: TestClient[Any, Any],
) -> None:
    with_id = {**SUBJECT_SEARCH, "subject": {"type": "user", "id": "whoever"}}
    _, a, _ = await post(client, "/access/v1/search/subject", SUBJECT_SEARCH)
    _, b, _ = await post(client, "/access/v1/search/subject", with_id)
    assert ids(a["results"]) == sorted(["alice", "bob", "dave", *READERS])
    assert a["results"] == b["results"]
    other = {**SUBJECT_SEARCH, "subject": {"type": "service"}}
    status, answer, _ = await post(client, "/access/v1/search/subject", other)
    assert (status, answer["results"]) == (200, [])


async def test_resource_search_pages_and_all_resources(client: TestClient[Any, Any]) -> None:
    pages = await _walk(client, "/access/v1/search/resource", RESOURCE_SEARCH, limit=5)
    assert [len(p) for p in pages] == [5, 5, 2]
    flat = [r for page in pages for r in page]
    assert flat == [{"type": "document", "id": d} for d in PAGER_DOCS]
    _, answer, _ = await post(client, "/access/v1/search/resource", RESOURCE_SEARCH)
    assert "all_resources" not in answer["context"]
    alice = {**RESOURCE_SEARCH, "subject": {"type": "user", "id": "alice"}}
    _, answer, _ = await post(client, "/access/v1/search/resource", alice)
    assert answer["context"]["all_resources"] is True
    assert answer["results"] == []


async def test_action_search(client: TestClient[Any, Any]) -> None:
    body = {"subject": {"type": "user", "id": "bob"}, "resource": {"type": "document", "id": "d2"}}
    status, answer, _ = await post(client, "/access/v1/search/action", body)
    assert status == 200
    assert answer["results"] == [{"name": "read"}, {"name": "write"}]
    assert "all_actions" not in answer["context"]
    pages = await _walk(client, "/access/v1/search/action", body, limit=1)
    assert pages == [[{"name": "read"}], [{"name": "write"}]]
    body["subject"]["id"] = "alice"
    _, answer, _ = await post(client, "/access/v1/search/action", body)
    assert answer["context"]["all_actions"] is True


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/access/v1/search/subject", {**SUBJECT_SEARCH, "resource": {"type": "x", "id": "y"}}),
        ("/access/v1/search/resource", {**RESOURCE_SEARCH, "subject": {"type": "user", "id": "?"}}),
        (
            "/access/v1/search/action",
            {"subject": {"type": "user", "id": "?"}, "resource": {"type": "a", "id": "b"}},
        ),
        (
            "/access/v1/search/resource",
            {
                **RESOURCE_SEARCH,
                "subject": {"type": "user", "id": "pager", "properties": {"tenant": "nope"}},
            },
        ),
    ],
)
async def test_search_unknown_ids_are_empty(
    client: TestClient[Any, Any], path: str, body: dict[str, Any]
) -> None:
    status, answer, _ = await post(client, path, body)
    assert status == 200
    assert answer["results"] == []
    assert answer["page"]["next_token"] == ""


async def test_page_token_bound_to_its_request(client: TestClient[Any, Any]) -> None:
    path = "/access/v1/search/resource"
    _, first, _ = await post(client, path, {**RESOURCE_SEARCH, "page": {"limit": 5}})
    token = first["page"]["next_token"]
    assert token
    # Same request, another limit: fine. A changed member: refused.
    status, _, _ = await post(client, path, {**RESOURCE_SEARCH, "page": {"token": token}})
    assert status == 200
    changed = {**RESOURCE_SEARCH, "action": {"name": "write"}, "page": {"token": token}}
    status, answer, _ = await post(client, path, changed)
    assert (status, answer["field"]) == (400, "page.token")
    tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    status, answer, _ = await post(client, path, {**RESOURCE_SEARCH, "page": {"token": tampered}})
    assert (status, answer["field"]) == (400, "page.token")
    other_endpoint = "/access/v1/search/subject"
    body = {**SUBJECT_SEARCH, "page": {"token": token}}
    status, answer, _ = await post(client, other_endpoint, body)
    assert (status, answer["field"]) == (400, "page.token")


async def test_page_limit_is_capped(client: TestClient[Any, Any]) -> None:
    body = {**SUBJECT_SEARCH, "page": {"limit": 10**9}}
    status, answer, _ = await post(client, "/access/v1/search/subject", body)
    assert status == 200
    assert answer["page"] == {"next_token": "", "count": 28, "total": 28}


# --- discovery ----------------------------------------------------------------------


async def test_well_known_configuration(aiohttp_client: AiohttpClient, replica: Replica) -> None:
    client = await aiohttp_client(make_app(replica, settings(host="10.0.0.1", port=9000)))
    response = await client.get("/.well-known/authzen-configuration")
    assert response.status == 200
    assert response.headers["X-Request-ID"]
    meta = await response.json()
    base = "http://10.0.0.1:9000"
    assert meta == {
        "policy_decision_point": base,
        "access_evaluation_endpoint": f"{base}/access/v1/evaluation",
        "access_evaluations_endpoint": f"{base}/access/v1/evaluations",
        "search_subject_endpoint": f"{base}/access/v1/search/subject",
        "search_resource_endpoint": f"{base}/access/v1/search/resource",
        "search_action_endpoint": f"{base}/access/v1/search/action",
    }
    client = await aiohttp_client(make_app(replica, settings(base_url="https://pdp.example/")))
    meta = await (await client.get("/.well-known/authzen-configuration")).json()
    base = "https://pdp.example"
    assert meta == {
        "policy_decision_point": base,
        "access_evaluation_endpoint": f"{base}/access/v1/evaluation",
        "access_evaluations_endpoint": f"{base}/access/v1/evaluations",
        "search_subject_endpoint": f"{base}/access/v1/search/subject",
        "search_resource_endpoint": f"{base}/access/v1/search/resource",
        "search_action_endpoint": f"{base}/access/v1/search/action",
    }


# --- readiness and staleness --------------------------------------------------------


async def test_not_ready_denies_and_searches_are_empty(aiohttp_client: AiohttpClient, clock: Clock) -> None:
    client = await aiohttp_client(make_app(Replica(clock=clock)))
    status, answer, _ = await post(client, EVALUATION, evaluation())
    assert status == 200
    assert answer == {"decision": False, "context": {"reason": "not_ready"}}
    status, answer, _ = await post(client, EVALUATIONS, _batch(("alice", "read"), ("bob", "read")))
    assert answer == {"evaluations": [{"decision": False}] * 2, "context": {"reason": "not_ready"}}
    explained = {**_batch(("alice", "read")), "options": {"include_reasons": True}}
    status, answer, _ = await post(client, EVALUATIONS, explained)
    assert answer["evaluations"] == [{"decision": False, "context": {"reason": "not_ready"}}]
    status, answer, _ = await post(client, "/access/v1/search/subject", SUBJECT_SEARCH)
    assert status == 200
    assert answer == {
        "page": {"next_token": "", "count": 0, "total": 0},
        "context": {"reason": "not_ready"},
        "results": [],
    }


async def test_stale_deny_mode(client: TestClient[Any, Any], clock: Clock) -> None:
    clock.advance(5.0)  # at the bound: still fresh
    _, answer, _ = await post(client, EVALUATION, evaluation())
    assert answer["decision"] is True
    clock.advance(7.25)
    _, answer, _ = await post(client, EVALUATION, evaluation())
    assert answer == {
        "decision": False,
        "context": {"reason": "stale", "staleness_seconds": 12.25, "revision": "100:105:102"},
    }
    _, answer, _ = await post(client, EVALUATIONS, _batch(("alice", "read")))
    assert answer["evaluations"] == [{"decision": False}]
    assert answer["context"]["reason"] == "stale"
    assert answer["context"]["staleness_seconds"] == 12.25
    explained = {**_batch(("alice", "read")), "options": {"include_reasons": True}}
    _, answer, _ = await post(client, EVALUATIONS, explained)
    assert answer["evaluations"] == [{"decision": False, "context": {"reason": "stale"}}]
    status, answer, _ = await post(client, "/access/v1/search/resource", RESOURCE_SEARCH)
    assert (status, answer["results"]) == (200, [])
    assert answer["context"] == {
        "reason": "stale", "staleness_seconds": 12.25, "revision": "100:105:102",
    }  # fmt: skip


async def test_stale_serve_mode(aiohttp_client: AiohttpClient, replica: Replica, clock: Clock) -> None:
    client = await aiohttp_client(make_app(replica, settings(stale_mode="serve")))
    clock.advance(5.0)  # at the bound: still fresh, so not marked stale
    _, answer, response = await post(client, EVALUATION, evaluation())
    assert answer["decision"] is True
    assert "X-PDP-Stale" not in response.headers
    clock.advance(7.3456)
    _, answer, response = await post(client, EVALUATION, evaluation())
    assert answer["decision"] is True
    assert response.headers["X-PDP-Stale"] == "12.346"
    _, answer, response = await post(client, "/access/v1/search/subject", SUBJECT_SEARCH)
    assert response.headers["X-PDP-Stale"] == "12.346"
    assert answer["results"]
    replica.mark_synced(clock())
    _, answer, response = await post(client, EVALUATION, evaluation())
    assert "X-PDP-Stale" not in response.headers


# --- read-your-writes ---------------------------------------------------------------

MIN_REV = "X-PDP-Min-Revision"


async def test_min_revision_already_visible(client: TestClient[Any, Any], replica: Replica) -> None:
    _, answer, _ = await post(client, EVALUATION, evaluation(), **{MIN_REV: "101"})
    assert answer["decision"] is True
    assert answer["context"]["revision"] == "100:105:102"
    assert not replica.wake.is_set()


async def test_min_revision_arrives_while_waiting(
    aiohttp_client: AiohttpClient, replica: Replica, clock: Clock
) -> None:
    client = await aiohttp_client(make_app(replica, settings(consistency_wait_ms=30_000)))

    async def sync_worker() -> None:
        await replica.wake.wait()  # the handler asks for a catch-up
        replica.install(engine(Snapshot(111, 111)), epoch="e", synced_at=clock())

    worker = asyncio.create_task(sync_worker())
    _, answer, _ = await post(client, EVALUATION, evaluation(), **{MIN_REV: "110"})
    await worker
    assert answer["decision"] is True
    assert answer["context"]["reason"] == "granted"
    assert answer["context"]["revision"] == "111:111:"


@pytest.mark.parametrize("xid", ["102", "105", "999"])
async def test_min_revision_never_visible_uses_fallback(
    aiohttp_client: AiohttpClient, replica: Replica, xid: str
) -> None:
    fallback = RecordingFallback(allowed=True)
    app = make_app(replica, settings(consistency_wait_ms=1), fallback=fallback)
    client = await aiohttp_client(app)
    body = evaluation("bob", "write", rid="d1")  # memory would say no_grant
    _, answer, _ = await post(client, EVALUATION, body, **{MIN_REV: xid})
    assert answer == {
        "decision": True,
        "context": {"reason": "consistent_fallback", "revision": "sql"},
    }
    assert fallback.calls == [(TENANT, "bob", "document", "d1", "write")]
    assert replica.wake.is_set()


async def test_min_revision_never_visible_without_fallback(
    aiohttp_client: AiohttpClient, replica: Replica
) -> None:
    client = await aiohttp_client(make_app(replica, settings(consistency_wait_ms=1)))
    _, answer, _ = await post(client, EVALUATION, evaluation(), **{MIN_REV: "500"})
    assert answer == {
        "decision": False,
        "context": {"reason": "revision_unavailable", "revision": "100:105:102"},
    }
    status, answer, _ = await post(
        client, "/access/v1/search/subject", SUBJECT_SEARCH, **{MIN_REV: "500"}
    )
    assert (status, answer["results"]) == (200, [])
    assert answer["context"] == {"reason": "revision_unavailable", "revision": "100:105:102"}


async def test_min_revision_batch_falls_back_per_entry(
    aiohttp_client: AiohttpClient, replica: Replica
) -> None:
    fallback = RecordingFallback(allowed=False)
    app = make_app(replica, settings(consistency_wait_ms=1), fallback=fallback)
    client = await aiohttp_client(app)
    body = _batch(("alice", "read"), ("bob", "read"), semantic="deny_on_first_deny")
    body["evaluations"].append({})
    body["options"]["include_reasons"] = True
    _, answer, _ = await post(client, EVALUATIONS, body, **{MIN_REV: "700"})
    assert answer["evaluations"] == [
        {"decision": False, "context": {"reason": "consistent_fallback", "revision": "sql"}}
    ]
    assert fallback.calls == [(TENANT, "alice", "document", "d1", "read")]
    body["options"] = {}
    _, answer, _ = await post(client, EVALUATIONS, body, **{MIN_REV: "700"})
    assert len(answer["evaluations"]) == 3
    assert len(fallback.calls) == 3


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "+7", "1_0", "1" * 21, "١٢"])
async def test_min_revision_bad_value_is_400(client: TestClient[Any, Any], value: str) -> None:
    response = await client.post(EVALUATION, json=evaluation(), headers={MIN_REV: value})
    assert response.status == 400
    assert (await response.json())["field"] == "X-PDP-Min-Revision"
