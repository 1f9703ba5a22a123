"""The HTTP edge (`pdp.http_edge`) on a real socket: compressed bodies, the read
timeout, what aiohttp refuses itself, client disconnects, NUL ids and the connection cap.

Every answer is a JSON 4xx (or, at the cap, a JSON 503), never a 500 and never a
traceback in the log; after each hostile request a valid check answers correctly.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from pdp.http_edge import EdgeLimits, EdgeRunner, EdgeServer
from pdp.metrics import Metrics
from pdp.web.api_keys import ApiKeys
from pdp.web.app import build_app
from tests.raw_http import Answer, edge_server, exchange, get, post, read_answer
from tests.test_web_support import Clock, evaluation, loaded_replica, make_app, settings

EVALUATION = "/access/v1/evaluation"
READ_TIMEOUT = 1.0
SLACK = 2.0  # seconds a closing may take beyond its bound on a busy shared machine


class Edge:
    def __init__(self, port: int, metrics: Metrics, runner: EdgeRunner) -> None:
        self.port = port
        self.metrics = metrics
        self.runner = runner

    async def busy(self, n: int) -> None:
        """Wait until the server holds `n` connections, none of them idle."""
        server = self.runner.server
        assert isinstance(server, EdgeServer)
        async with asyncio.timeout(10):
            while len(server._live) < n or any(h.idle for h in server._live):  # noqa: ASYNC110 (in-process state, no event)
                await asyncio.sleep(0.005)

    async def send(self, data: bytes, timeout: float = 10.0, close_wait: float = 0.0) -> Answer:
        return await exchange(self.port, data, timeout, close_wait)

    async def check(self) -> None:
        """A valid check answers correctly (alice may read d1)."""
        answer = await self.send(post(EVALUATION, json.dumps(evaluation()).encode()))
        assert answer.status == 200, answer
        assert answer.json()["decision"] is True

    def counted(self, route: str, status: int) -> float:
        value = self.metrics.registry.get_sample_value(
            "pdp_http_requests_total", {"route": route, "status": str(status)}
        )
        return value or 0.0


@pytest.fixture
async def edge() -> AsyncIterator[Edge]:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    app = make_app(loaded_replica(Clock()), registry=registry, metrics=metrics)
    runners: list[EdgeRunner] = []
    async with edge_server(app, EdgeLimits(READ_TIMEOUT, max_connections=8), runners=runners) as port:
        yield Edge(port, metrics, runners[0])


def _no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        assert record.exc_info is None, record.getMessage()
        assert record.levelno < logging.ERROR, record.getMessage()
    assert "Traceback" not in caplog.text


def _is_json_error(answer: Answer, status: int, error: str) -> dict[str, str]:
    assert answer.status == status, answer
    assert answer.headers["content-type"].startswith("application/json"), answer
    body = answer.json()
    assert body["error"] == error, body
    assert body["message"], body
    return dict(body)


# --- compressed bodies ----------------------------------------------------------------


def gzip_bomb(size: int) -> bytes:
    """About `size` bytes of gzip that inflate ~1000-fold (1 MB -> ~1 GiB of zeros):
    concatenated gzip members, each 1 MiB of zeros."""
    member = gzip.compress(b"\0" * (1 << 20), compresslevel=9)
    return member * max(1, size // len(member))


@pytest.mark.parametrize("megabytes", [1, 3])
async def test_a_gzip_bomb_is_refused_unread_with_415(
    edge: Edge, megabytes: int, caplog: pytest.LogCaptureFixture
) -> None:
    bomb = gzip_bomb(megabytes << 20)
    started = time.perf_counter()
    answer = await edge.send(post(EVALUATION, bomb, headers={"Content-Encoding": "gzip"}))
    body = _is_json_error(answer, 415, "unsupported_media_type")
    assert body["field"] == "Content-Encoding"
    assert "'gzip'" in body["message"]
    # Another client is answered at once (timing itself is the benchmark's).
    await edge.check()
    assert time.perf_counter() - started < 30
    _no_traceback(caplog)


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", json.dumps(evaluation()).encode()),  # the header on a plain body
        ("br", b"\x8b\x02\x80garbage that is not brotli"),
        ("deflate", b"not deflate"),
        ("zstd", b"\x28\xb5\x2f\xfdgarbage"),
        ("gzip, identity", gzip.compress(json.dumps(evaluation()).encode())),
        ("x-unknown-encoding", b"{}"),
    ],
)
async def test_any_content_encoding_but_identity_is_415(
    edge: Edge, encoding: str, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    answer = await edge.send(post(EVALUATION, body, headers={"Content-Encoding": encoding}))
    _is_json_error(answer, 415, "unsupported_media_type")
    await edge.check()
    _no_traceback(caplog)


async def test_identity_encoding_is_accepted(edge: Edge) -> None:
    body = json.dumps(evaluation()).encode()
    answer = await edge.send(post(EVALUATION, body, headers={"Content-Encoding": "identity"}))
    assert answer.status == 200, answer
    assert answer.json()["decision"] is True


# --- the read timeout -------------------------------------------------------------------


async def _trickle(edge: Edge, first: bytes, then: bytes) -> tuple[Answer, float]:
    """Send `first`, then `then` one byte a second until the server answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    started = time.monotonic()
    writer.write(first)
    answer_task = asyncio.ensure_future(read_answer(reader, READ_TIMEOUT + SLACK + 5))
    try:
        for byte in then:
            done, _ = await asyncio.wait({answer_task}, timeout=1.0)  # one byte a second
            if done:
                break
            writer.write(bytes([byte]))
        answer = await answer_task
        return answer, time.monotonic() - started
    finally:
        answer_task.cancel()
        writer.close()


async def test_a_body_trickling_one_byte_a_second_gets_408_and_is_closed(
    edge: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    head = post(EVALUATION, b"", length=100_000)
    answer, took = await _trickle(edge, head, b"{" + b" " * 100)
    _is_json_error(answer, 408, "request_timeout")
    assert answer.closed
    assert took < READ_TIMEOUT + SLACK, took
    assert edge.counted(EVALUATION, 408) == 1
    await edge.check()
    _no_traceback(caplog)


async def test_headers_trickling_one_byte_a_second_get_408_and_are_closed(
    edge: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    answer, took = await _trickle(edge, b"POST /access/v1/evaluation HTTP/1.1\r\n", b"X" * 100)
    _is_json_error(answer, 408, "request_timeout")
    assert answer.closed
    assert took < READ_TIMEOUT + SLACK, took
    await edge.check()
    _no_traceback(caplog)


async def test_a_slow_but_timely_request_is_answered(edge: Edge) -> None:
    body = json.dumps(evaluation()).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    try:
        writer.write(post(EVALUATION, body)[:-10])
        await asyncio.sleep(READ_TIMEOUT / 3)  # a pause shorter than the bound, on purpose
        writer.write(body[-10:])
        answer = await read_answer(reader)
    finally:
        writer.close()
    assert answer.status == 200, answer
    assert answer.json()["decision"] is True


# --- what aiohttp refuses itself ------------------------------------------------------

BAD_REQUESTS = {
    "64 KB header": get("/healthz", {"X-Big": "a" * 65536}),
    "1,000 headers": get("/healthz", {f"X-H{i}": "v" for i in range(1000)}),
    "bad request line": b"GARBAGE\r\n\r\n",
    "bad method": b"G\x00T / HTTP/1.1\r\nHost: pdp\r\n\r\n",
    "bad version": b"GET / HTTP/9.9.9\r\nHost: pdp\r\n\r\n",
    "negative Content-Length": post(EVALUATION, b"{}", length=-2),
    "double Content-Length": post(EVALUATION, b"{}", headers={"Content-Length": "2, 2"}),
    "two Content-Length headers": (
        b"POST /access/v1/evaluation HTTP/1.1\r\nHost: pdp\r\nContent-Type: application/json"
        b"\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}"
    ),
    "Content-Length and Transfer-Encoding": post(
        EVALUATION, b"2\r\n{}\r\n0\r\n\r\n", headers={"Transfer-Encoding": "chunked"}
    ),
    "bad chunk size": post(
        EVALUATION, b"zz\r\n{}\r\n0\r\n\r\n", headers={"Transfer-Encoding": "chunked"},
        length=-1,
    ),
    "NUL in a header value": get("/healthz", {"X-A": "a\x00b"}),
    "space before the colon": b"GET / HTTP/1.1\r\nHost : pdp\r\n\r\n",
}  # fmt: skip


def _without_length(data: bytes) -> bytes:
    return data.replace(b"Content-Length: -1\r\n", b"")


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
async def test_a_malformed_request_is_a_json_400_and_one_warning_at_most(
    edge: Edge, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "pdp")
    answer = await edge.send(_without_length(BAD_REQUESTS[name]), close_wait=5)
    assert 400 <= answer.status < 500, answer
    assert answer.headers["content-type"].startswith("application/json"), answer
    assert answer.json()["message"]
    assert answer.closed
    await edge.check()
    _no_traceback(caplog)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) <= 1, [r.getMessage() for r in warnings]


async def test_a_flood_of_malformed_requests_logs_one_line(
    edge: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    for data in BAD_REQUESTS.values():
        answer = await edge.send(_without_length(data))
        assert 400 <= answer.status < 500, answer
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    _no_traceback(caplog)


async def test_a_client_leaving_mid_body_is_no_error(
    edge: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    writer.write(post(EVALUATION, b'{"subject":', length=1000))
    await writer.drain()
    writer.close()
    deadline = time.monotonic() + 10
    while edge.counted(EVALUATION, 499) == 0:  # the handler sees the reset asynchronously
        assert time.monotonic() < deadline, "the disconnect was never counted"
        await asyncio.sleep(0.01)
    assert edge.counted(EVALUATION, 500) == 0
    await edge.check()
    _no_traceback(caplog)


# --- NUL in an id -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "body"),
    [
        ("subject.id", evaluation(user="al\x00ice")),
        ("resource.id", evaluation(rid="d\x001")),
        ("resource.type", evaluation(rtype="doc\x00")),
        ("action.name", evaluation(action="\x00read")),
        ("subject.properties.tenant", evaluation(properties={"tenant": "ac\x00me"})),
    ],
)
@pytest.mark.parametrize("min_revision", [None, "99999999"])
async def test_a_nul_in_an_id_is_400_before_any_database(
    edge: Edge, field: str, body: dict[str, object], min_revision: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    headers = {} if min_revision is None else {"X-PDP-Min-Revision": min_revision}
    answer = await edge.send(post(EVALUATION, json.dumps(body).encode(), headers=headers))
    error = _is_json_error(answer, 400, "bad_request")
    assert error["field"] == field
    assert "NUL" in error["message"]
    _no_traceback(caplog)


# --- the connection cap -------------------------------------------------------------------


async def test_idle_connections_are_closed_oldest_first_to_make_room(
    edge: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    idle = [await asyncio.open_connection("127.0.0.1", edge.port) for _ in range(12)]
    try:
        answer = await edge.send(get("/healthz"))
        assert answer.status == 200, answer
        # The oldest were closed to make room: they read EOF.
        async with asyncio.timeout(10):
            assert await idle[0][0].read() == b""
        assert edge.metrics.registry.get_sample_value("pdp_http_connections_rejected_total") == 0
    finally:
        for _, writer in idle:
            writer.close()
    _no_traceback(caplog)


async def test_at_the_cap_with_every_connection_busy_a_new_one_gets_503(
    edge: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    busy = []
    for _ in range(8):  # each has sent half a request: busy until the read timeout
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        busy.append((reader, writer))
    try:
        await edge.busy(8)  # the server has read every partial request
        answer = await edge.send(get("/healthz"))
        _is_json_error(answer, 503, "unavailable")
        assert answer.closed
        assert edge.metrics.registry.get_sample_value("pdp_http_connections_rejected_total") == 1
        assert any("refused a connection" in r.getMessage() for r in caplog.records)
        # The busy ones time out (408) and make room again.
        async with asyncio.timeout(READ_TIMEOUT + SLACK + 5):
            timed_out = await read_answer(busy[0][0])
        assert timed_out.status == 408
        await edge.check()
    finally:
        for _, writer in busy:
            writer.close()
    _no_traceback(caplog)


# --- the hot routes without the router ----------------------------------------------


@pytest.fixture
def resolves(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths aiohttp's router resolves from now on (in this process)."""
    seen: list[str] = []
    original = web.UrlDispatcher.resolve

    async def counted(self: web.UrlDispatcher, request: web.Request) -> Any:
        seen.append(request.raw_path)
        return await original(self, request)

    monkeypatch.setattr(web.UrlDispatcher, "resolve", counted)
    return seen


async def test_a_check_skips_the_router_and_answers_as_the_routed_one(
    edge: Edge, resolves: list[str]
) -> None:
    body = json.dumps(evaluation()).encode()
    direct = await edge.send(post(EVALUATION, body, headers={"X-Request-ID": "d-1"}))
    assert resolves == []  # straight to the route's handler
    routed = await edge.send(post(EVALUATION + "?via=router", body))  # same route, routed
    assert resolves == [EVALUATION + "?via=router"]
    assert direct.status == routed.status == 200
    assert direct.json() == routed.json()
    assert direct.json()["decision"] is True
    assert direct.headers["x-request-id"] == "d-1"  # the route's guard ran
    assert edge.counted(EVALUATION, 200) == 2


async def test_only_a_plain_post_to_a_hot_path_skips_the_router(
    edge: Edge, resolves: list[str]
) -> None:
    body = json.dumps(evaluation()).encode()
    answer = await edge.send(get(EVALUATION))
    assert answer.status == 405  # the router names the allowed method
    assert answer.headers["allow"] == "POST"
    expect = await edge.send(post(EVALUATION, body, headers={"Expect": "100-continue"}))
    assert expect.status == 100  # aiohttp's router answers Expect first
    batch = {"evaluations": [evaluation()]}
    answer = await edge.send(post("/access/v1/evaluations", json.dumps(batch).encode()))
    assert answer.status == 200
    assert answer.json()["evaluations"][0]["decision"] is True
    assert resolves == [EVALUATION, EVALUATION]  # the GET and the Expect; not the batch


async def test_the_direct_path_asks_for_the_api_key_too(resolves: list[str]) -> None:
    key = "k" * 40
    keys = ApiKeys((("svc", hashlib.sha256(key.encode()).digest()),))
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    app = make_app(loaded_replica(Clock()), registry=registry, metrics=metrics, api_keys=keys)
    body = json.dumps(evaluation()).encode()
    async with edge_server(app, EdgeLimits(READ_TIMEOUT, max_connections=8)) as port:
        refused = await exchange(port, post(EVALUATION, body))
        allowed = await exchange(port, post(EVALUATION, body, headers={"X-PDP-API-Key": key}))
    assert refused.status == 401
    assert refused.json()["error"] == "unauthorized"
    assert allowed.status == 200
    assert allowed.json()["decision"] is True
    assert resolves == []


async def test_after_drain_every_answer_closes_its_connection(edge: Edge) -> None:
    body = json.dumps(evaluation()).encode()
    before = await edge.send(post(EVALUATION, body), close_wait=0.2)
    assert before.status == 200
    assert not before.closed
    server = edge.runner.server
    assert isinstance(server, EdgeServer)
    server.drain()
    direct = await edge.send(post(EVALUATION, body))
    routed = await edge.send(get("/healthz"))
    for answer in (direct, routed):
        assert answer.headers["connection"].lower() == "close", answer
        assert answer.closed


async def test_an_app_with_a_prepare_signal_is_served_through_the_router(
    resolves: list[str],
) -> None:
    app = make_app(loaded_replica(Clock()))

    async def mark(_request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Signal"] = "ran"

    app.on_response_prepare.append(mark)
    body = json.dumps(evaluation()).encode()
    async with edge_server(app, EdgeLimits(READ_TIMEOUT, max_connections=8)) as port:
        answer = await exchange(port, post(EVALUATION, body))
    assert answer.status == 200
    assert answer.headers["x-signal"] == "ran"  # not skipped with the router
    assert resolves == [EVALUATION]


async def test_the_apps_headers_are_on_direct_and_routed_answers(resolves: list[str]) -> None:
    registry = CollectorRegistry()
    app = build_app(
        settings(), replica=loaded_replica(Clock()), registry=registry,
        headers={"X-PDP-Worker": "3"},
    )  # fmt: skip
    body = json.dumps(evaluation()).encode()
    async with edge_server(app, EdgeLimits(READ_TIMEOUT, max_connections=8)) as port:
        direct = await exchange(port, post(EVALUATION, body))
        routed = await exchange(port, get("/nothing/here"))
    assert direct.status == 200
    assert routed.status == 404
    assert direct.headers["x-pdp-worker"] == routed.headers["x-pdp-worker"] == "3"
    assert resolves == ["/nothing/here"]


async def test_forward_auth_skips_the_router_at_and_under_its_path(
    edge: Edge, resolves: list[str]
) -> None:
    asked = {"X-Original-Method": "GET", "X-Original-URI": "/api/x", "X-User-Id": "alice"}
    under = await edge.send(get("/forward-auth/api/x", asked))
    at = await edge.send(get("/forward-auth", asked))
    assert resolves == []
    query = await edge.send(get("/forward-auth/api/x?q=1", asked))  # still under the path
    assert resolves == []
    assert under.status == query.status == at.status == 403  # no route table: fail closed
    assert under.json() == query.json() == at.json()
    other = await edge.send(get("/forward-authx", asked))  # not under the path: the router
    assert other.status == 404
    assert resolves == ["/forward-authx"]
    assert edge.counted("/forward-auth/{tail:.*}", under.status) == 2  # same route labels
    assert edge.counted("/forward-auth", at.status) == 1
