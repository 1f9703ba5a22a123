"""Bad input: every AuthZEN certification case is a 400 JSON error naming the field.

Never a 500, never a hang: the body's shape is `{"error", "message", "field"?}` and
every answer carries `X-Request-ID`.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from pdp.protocol import codec
from tests.test_web_support import Clock, evaluation, loaded_replica, make_app, settings

EVALUATION = "/access/v1/evaluation"
EVALUATIONS = "/access/v1/evaluations"
SUBJECT = "/access/v1/search/subject"
RESOURCE = "/access/v1/search/resource"
ACTION = "/access/v1/search/action"
LONG = "x" * 257


def _without(path: str) -> dict[str, Any]:
    """A valid evaluation with the member at dotted `path` removed."""
    body = evaluation()
    *parents, last = path.split(".")
    node = body
    for key in parents:
        node = node[key]
    del node[last]
    return body


def _with(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A valid evaluation (or `base`) with the member at dotted `path` set to `value`."""
    body: dict[str, Any] = json.loads(json.dumps(base or evaluation()))
    *parents, last = path.split(".")
    node = body
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return body


JSON = "application/json"
SUBJECT_SEARCH = {
    "subject": {"type": "user"},
    "action": {"name": "read"},
    "resource": {"type": "document", "id": "d1"},
}
RESOURCE_SEARCH = {
    "subject": {"type": "user", "id": "bob"},
    "action": {"name": "read"},
    "resource": {"type": "document"},
}
ACTION_SEARCH = {"subject": {"type": "user", "id": "bob"}, "resource": {"type": "d", "id": "1"}}

# (endpoint, raw body or JSON value, content type, expected field)
CASES: list[tuple[str, Any, str | None, str | None]] = [
    # missing entities and members
    (EVALUATION, _without("subject"), JSON, "subject"),
    (EVALUATION, _without("action"), JSON, "action"),
    (EVALUATION, _without("resource"), JSON, "resource"),
    (EVALUATION, _without("subject.type"), JSON, "subject.type"),
    (EVALUATION, _without("subject.id"), JSON, "subject.id"),
    (EVALUATION, _without("action.name"), JSON, "action.name"),
    (EVALUATION, _without("resource.type"), JSON, "resource.type"),
    (EVALUATION, _without("resource.id"), JSON, "resource.id"),
    # wrong JSON types
    (EVALUATION, _with("subject", "user:alice"), JSON, "subject"),
    (EVALUATION, _with("action", ["read"]), JSON, "action"),
    (EVALUATION, _with("resource", None), JSON, "resource"),
    (EVALUATION, _with("action.name", 7), JSON, "action.name"),
    (EVALUATION, _with("subject.id", 42), JSON, "subject.id"),
    (EVALUATION, _with("subject.id", True), JSON, "subject.id"),
    (EVALUATION, _with("resource.id", {"id": "d1"}), JSON, "resource.id"),
    (EVALUATION, _with("subject.type", None), JSON, "subject.type"),
    (EVALUATION, _with("subject.properties", "acme"), JSON, "subject.properties"),
    (EVALUATION, _with("subject.properties.tenant", 1), JSON, "subject.properties.tenant"),
    (EVALUATION, _with("action.properties", [1]), JSON, "action.properties"),
    (EVALUATION, _with("resource.properties", 1), JSON, "resource.properties"),
    (EVALUATION, _with("context", "now"), JSON, "context"),
    # lengths
    (EVALUATION, _with("subject.id", ""), JSON, "subject.id"),
    (EVALUATION, _with("subject.id", LONG), JSON, "subject.id"),
    (EVALUATION, _with("resource.id", LONG), JSON, "resource.id"),
    (EVALUATION, _with("resource.type", LONG), JSON, "resource.type"),
    (EVALUATION, _with("action.name", LONG), JSON, "action.name"),
    (EVALUATION, _with("subject.properties.tenant", LONG), JSON, "subject.properties.tenant"),
    # the body itself
    (EVALUATION, [evaluation()], JSON, None),
    (EVALUATION, "a string", JSON, None),
    (EVALUATION, 12, JSON, None),
    (EVALUATION, None, JSON, None),
    (EVALUATION, b"", JSON, None),
    (EVALUATION, b"{", JSON, None),
    (EVALUATION, b'{"subject": }', JSON, None),
    (EVALUATION, b"\xff\xfe{}", JSON, None),
    (EVALUATION, b"[" * 20_000 + b"]" * 20_000, JSON, None),
    (EVALUATION, json.dumps(evaluation()).encode(), "text/plain", "Content-Type"),
    (
        EVALUATION,
        json.dumps(evaluation()).encode(),
        "application/x-www-form-urlencoded",
        "Content-Type",
    ),
    (EVALUATION, json.dumps(evaluation()).encode(), None, "Content-Type"),
    (EVALUATION, b"", None, "Content-Type"),
    # batches: payload-level errors
    (EVALUATIONS, {"evaluations": "all"}, JSON, "evaluations"),
    (EVALUATIONS, {"evaluations": None}, JSON, "evaluations"),
    (EVALUATIONS, {"evaluations": [evaluation(), "x"]}, JSON, "evaluations[1]"),
    (EVALUATIONS, {"evaluations": [{"subject": "alice"}]}, JSON, "evaluations[0].subject"),
    (EVALUATIONS, {"subject": 5, "evaluations": [evaluation()]}, JSON, "subject"),
    (EVALUATIONS, {"evaluations": [{}] * 51}, JSON, "evaluations"),
    (EVALUATIONS, _with("options", "fast"), JSON, "options"),
    (
        EVALUATIONS,
        _with("options.evaluations_semantic", "all"),
        JSON,
        "options.evaluations_semantic",
    ),
    (EVALUATIONS, _with("options.evaluations_semantic", 1), JSON, "options.evaluations_semantic"),
    (EVALUATIONS, {"evaluations": []}, JSON, "subject"),
    (EVALUATIONS, b"[]", JSON, None),
    # searches: inputs need ids
    (
        SUBJECT,
        _with("resource.id", None, SUBJECT_SEARCH) | {"resource": {"type": "d"}},
        JSON,
        "resource.id",
    ),
    (SUBJECT, {k: v for k, v in SUBJECT_SEARCH.items() if k != "action"}, JSON, "action"),
    (SUBJECT, _with("subject.type", 3, SUBJECT_SEARCH), JSON, "subject.type"),
    (
        RESOURCE,
        _with("subject.id", None, RESOURCE_SEARCH) | {"subject": {"type": "user"}},
        JSON,
        "subject.id",
    ),
    (RESOURCE, {k: v for k, v in RESOURCE_SEARCH.items() if k != "resource"}, JSON, "resource"),
    (RESOURCE, _with("resource.type", "", RESOURCE_SEARCH), JSON, "resource.type"),
    (
        ACTION,
        {"subject": {"type": "user", "id": "bob"}, "resource": {"type": "d"}},
        JSON,
        "resource.id",
    ),
    (ACTION, {"resource": {"type": "d", "id": "1"}}, JSON, "subject"),
    # paging
    (RESOURCE, _with("page", "next", RESOURCE_SEARCH), JSON, "page"),
    (RESOURCE, _with("page.limit", -1, RESOURCE_SEARCH), JSON, "page.limit"),
    (RESOURCE, _with("page.limit", 0, RESOURCE_SEARCH), JSON, "page.limit"),
    (SUBJECT, _with("page.limit", 0, SUBJECT_SEARCH), JSON, "page.limit"),
    (ACTION, _with("page.limit", 0.0, ACTION_SEARCH), JSON, "page.limit"),
    (ACTION, _with("page.limit", True, ACTION_SEARCH), JSON, "page.limit"),
    (RESOURCE, _with("page.limit", "10", RESOURCE_SEARCH), JSON, "page.limit"),
    (RESOURCE, _with("page.limit", 2.5, RESOURCE_SEARCH), JSON, "page.limit"),
    (RESOURCE, _with("page.token", 3, RESOURCE_SEARCH), JSON, "page.token"),
    (ACTION, _with("page.token", "not-a-token", ACTION_SEARCH), JSON, "page.token"),
    (SUBJECT, _with("page.token", "e30", SUBJECT_SEARCH), JSON, "page.token"),
]


@pytest.fixture
async def client(aiohttp_client: AiohttpClient) -> TestClient[Any, Any]:
    return await aiohttp_client(make_app(loaded_replica(Clock())))


def _ident(case: tuple[str, Any, str | None, str | None]) -> str:
    path, _, ctype, field = case
    return f"{path.rsplit('/', 1)[-1]}-{field or 'body'}-{ctype or 'none'}"


@pytest.mark.parametrize("case", CASES, ids=[_ident(c) for c in CASES])
async def test_bad_input_is_400(
    client: TestClient[Any, Any], case: tuple[str, Any, str | None, str | None]
) -> None:
    path, body, ctype, field = case
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"X-Request-ID": "rid-1"}
    if ctype is not None:
        headers["Content-Type"] = ctype
    response = await client.post(
        path, data=data, headers=headers, skip_auto_headers=["Content-Type"]
    )
    answer = await response.json()
    assert response.status == 400, answer
    assert response.content_type == "application/json"
    assert response.headers["X-Request-ID"] == "rid-1"
    assert answer["error"] == "bad_request"
    assert isinstance(answer["message"], str)
    assert answer["message"]
    assert answer.get("field") == field


async def test_body_too_large_is_413(aiohttp_client: AiohttpClient) -> None:
    app = make_app(loaded_replica(Clock()), settings(max_body_bytes=1024))
    client = await aiohttp_client(app)
    body = evaluation()
    body["context"] = {"padding": "x" * 2000}
    response = await client.post(EVALUATION, json=body)
    assert response.status == 413
    answer = await response.json()
    assert answer["error"] == "payload_too_large"
    assert response.headers["X-Request-ID"]
    body["context"] = {"padding": "x" * 100}
    response = await client.post(EVALUATION, json=body)
    assert response.status == 200


async def test_unknown_path_is_404_json(client: TestClient[Any, Any]) -> None:
    response = await client.post("/access/v1/evaluatio", json=evaluation())
    assert response.status == 404
    assert (await response.json())["error"] == "not_found"
    assert response.headers["X-Request-ID"]
    response = await client.get("/nothing/here", headers={"X-Request-ID": "r404"})
    assert response.status == 404
    assert response.headers["X-Request-ID"] == "r404"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", EVALUATION, "POST"),
        ("PUT", EVALUATIONS, "POST"),
        ("DELETE", SUBJECT, "POST"),
        ("POST", "/healthz", "GET,HEAD"),
        ("PATCH", "/.well-known/authzen-configuration", "GET,HEAD"),
    ],
)
async def test_wrong_method_is_405_json(
    client: TestClient[Any, Any], method: str, path: str, allow: str
) -> None:
    response = await client.request(method, path)
    assert response.status == 405
    assert (await response.json())["error"] == "method_not_allowed"
    assert set(response.headers["Allow"].split(",")) == set(allow.split(","))
    assert response.headers["X-Request-ID"]


async def test_content_type_with_parameters_is_json(client: TestClient[Any, Any]) -> None:
    for ctype in ("application/json; charset=utf-8", "Application/JSON"):
        response = await client.post(
            EVALUATION, data=json.dumps(evaluation()), headers={"Content-Type": ctype}
        )
        assert response.status == 200, ctype


async def test_handler_bug_is_500_json(
    client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Our own bug still answers JSON (and is logged), never a bare traceback page."""
    from pdp import protocol

    def broken(*_: object) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(protocol, "parse_evaluation", broken)
    monkeypatch.setattr(protocol, "decode_evaluation", broken)  # the typed fast path too
    response = await client.post(EVALUATION, json=evaluation(), headers={"X-Request-ID": "b"})
    assert response.status == 500
    assert await response.json() == {"error": "internal", "message": "internal error"}
    assert response.headers["X-Request-ID"] == "b"
    assert "unhandled error on POST /access/v1/evaluation" in caplog.text


NOT_NUMBERS = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1" * 400 + b".0e9999"]


@pytest.fixture(params=["orjson", "json"])
def decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both decoding paths in one install: orjson (the `fast` extra) and the standard
    library's (a plain `pip install pdp`), swapped in where `loads` looks them up."""
    assert codec.FAST, "the test install has the fast extra"
    if request.param == "json":
        monkeypatch.setattr(codec, "_loads", codec.plain_loads)
        monkeypatch.setattr(codec, "_DECODE_ERRORS", codec.PLAIN_DECODE_ERRORS)
    return str(request.param)


@pytest.mark.parametrize("number", NOT_NUMBERS, ids=lambda n: n.decode()[:12])
async def test_a_number_json_cannot_carry_is_400_on_both_paths(
    client: TestClient[Any, Any], decoder: str, number: bytes
) -> None:
    body = json.dumps(evaluation() | {"context": {"limit": "N"}}).encode()
    raw = body.replace(b'"N"', number)
    response = await client.post(EVALUATION, data=raw, headers={"Content-Type": JSON})
    answer = await response.json()
    assert response.status == 400, (decoder, answer)
    assert answer["error"] == "bad_request"
    assert "not valid JSON" in answer["message"]
    # The same document with a finite number is a decision on both paths.
    ok = await client.post(EVALUATION, data=body.replace(b'"N"', b"1e308"),
                           headers={"Content-Type": JSON})  # fmt: skip
    assert ok.status == 200, await ok.text()


def test_both_decoders_read_the_same_numbers() -> None:
    assert codec.FAST
    for raw in [b"1e308", b"18446744073709551615", b"18446744073709551616",
                b"-9223372036854775809", b"1.5e-400", b"[0.1, -0, 2]"]:  # fmt: skip
        assert codec.plain_loads(raw) == orjson.loads(raw), raw
