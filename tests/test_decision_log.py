"""Decision logs end to end: a whole sidecar (real PostgreSQL, HTTP) writing its decisions.

The rows match the answers (the id in `context.decision_id` and `X-PDP-Decision-Id` is
the row's), sampling keeps every deny, a full buffer drops and counts while checks go on
(the writer blocked behind a lock this test holds on the table), stdout mode writes
JSON lines (a real `pdp serve`), partitions are created ahead and dropped past retention (as the sidecar
role), a writer whose connection is killed is restarted, and erasure pseudonymises.
"""

from __future__ import annotations

import asyncio
import datetime
import http.client
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient

from loadtests.gateway_harness import Pdp, poll, request
from pdp.admin import erasure
from pdp.config import Settings
from pdp.decision_log import DecisionLog, StdoutSink
from pdp.errors import ConfigError
from pdp.sidecar import sidecar_app
from sync.pg_decision_log import APP_NAME, PgDecisionLog
from tests.waiting import until_true as _until

T = "t"
BASE = """
INSERT INTO pdp.tenants (id) VALUES ('t'), ('other');
INSERT INTO pdp.users (tenant_id, id) VALUES ('t', 'alice'), ('t', 'bob'), ('other', 'alice');
INSERT INTO pdp.roles (tenant_id, id) VALUES ('t', 'viewer');
INSERT INTO pdp.role_permissions VALUES ('t', 'viewer', 'doc:read');
INSERT INTO pdp.user_roles (tenant_id, user_id, role_id) VALUES ('t', 'alice', 'viewer');
"""
ROUTES = """
routes:
  - method: GET
    path: /docs/{id}
    resource: {type: doc, id: "{id}"}
    action: read
"""
Client = TestClient[Any, Any]


def _settings(tmp_path: Path, **changes: Any) -> Settings:
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES)
    values: dict[str, Any] = {
        "poll_interval_seconds": 0.2, "heartbeat_seconds": 1.0, "verify_interval_seconds": 3600,
        "decision_log": "postgres", "routes_path": routes, "default_tenant": T,
        "forward_auth_mode": "traefik",
    }  # fmt: skip
    return Settings(**(values | changes))


async def _client(aiohttp_client: AiohttpClient, settings: Settings, url: str) -> Client:
    client = await aiohttp_client(sidecar_app(settings, url, restart_backoff=(0.1, 0.2)))

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200

    await _until(ready)
    return client


async def _evaluate(client: Client, user: str, action: str = "read") -> dict[str, Any]:
    body = {
        "subject": {"type": "user", "id": user},
        "action": {"name": action},
        "resource": {"type": "doc", "id": "1"},
    }
    response = await client.post("/access/v1/evaluation", json=body)
    assert response.status == 200
    answer: dict[str, Any] = await response.json()
    return answer


async def _forward(client: Client, user: str) -> tuple[int, str | None]:
    headers = {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/docs/7", "X-User-Id": user}
    response = await client.get("/forward-auth", headers=headers)
    return response.status, response.headers.get("X-PDP-Decision-Id")


async def _metric(client: Client, name: str, **labels: str) -> float:
    text = await (await client.get("/metrics")).text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def _rows(pg: asyncpg.Connection) -> dict[str, asyncpg.Record]:
    return {r["id"]: r for r in await pg.fetch("SELECT * FROM pdp.decision_log")}


async def _count_at_least(pg: asyncpg.Connection, n: int) -> None:
    async def enough() -> bool:
        return int(await pg.fetchval("SELECT count(*) FROM pdp.decision_log")) >= n

    await _until(enough)


async def test_rows_match_the_decisions_and_carry_the_answers_ids(
    db_url: str, pg: asyncpg.Connection, aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    await pg.execute(BASE)
    client = await _client(aiohttp_client, _settings(tmp_path), db_url)
    before = time.time()
    allow, deny = await _evaluate(client, "alice"), await _evaluate(client, "bob")
    batch_body = {
        "subject": {"type": "user", "id": "alice"},
        "resource": {"type": "doc", "id": "2"},
        "evaluations": [{"action": {"name": "read"}}, {"action": {"name": "write"}}],
    }
    bare = await (await client.post("/access/v1/evaluations", json=batch_body)).json()
    batch_body["options"] = {"include_reasons": True}
    reasoned = await (await client.post("/access/v1/evaluations", json=batch_body)).json()
    fa_allow, fa_deny = await _forward(client, "alice"), await _forward(client, "bob")
    assert fa_allow[0] == 200
    assert fa_deny[0] == 403
    await _count_at_least(pg, 8)
    rows = await _rows(pg)
    assert len(rows) == 8

    row = rows[allow["context"]["decision_id"]]
    assert (row["endpoint"], row["tenant_id"], row["subject_type"], row["subject_id"]) == (
        "evaluation", T, "user", "alice",
    )  # fmt: skip
    assert (row["action"], row["resource_type"], row["resource_id"]) == ("read", "doc", "1")
    assert (row["decision"], row["reason"]) == (True, "granted")
    assert row["revision"] == allow["context"]["revision"]
    assert 0 <= row["latency_ms"] < 10_000
    assert before - 1 <= row["time"].timestamp() <= time.time() + 1
    row = rows[deny["context"]["decision_id"]]
    assert (row["subject_id"], row["decision"], row["reason"]) == ("bob", False, "no_grant")

    # A batch: the top context names the batch, entry i's row is `<batch>.<i>`; bare
    # entries stay bare, entries with reasons carry their own id.
    assert bare["evaluations"] == [{"decision": True}, {"decision": False}]
    batch_id = bare["context"]["decision_id"]
    assert [rows[f"{batch_id}.{i}"]["reason"] for i in (0, 1)] == ["granted", "no_grant"]
    assert [rows[f"{batch_id}.{i}"]["endpoint"] for i in (0, 1)] == ["evaluations"] * 2
    entry_ids = [e["context"]["decision_id"] for e in reasoned["evaluations"]]
    assert entry_ids == [f"{reasoned['context']['decision_id']}.{i}" for i in (0, 1)]
    assert [rows[i]["action"] for i in entry_ids] == ["read", "write"]

    # Forward-auth: the header's id is the row's, on the deny too.
    row = rows[fa_allow[1]]  # type: ignore[index]
    assert (row["endpoint"], row["subject_id"], row["resource_id"]) == (
        "forward_auth",
        "alice",
        "7",
    )
    assert (row["decision"], row["reason"]) == (True, "granted")
    row = rows[fa_deny[1]]  # type: ignore[index]
    assert (row["subject_id"], row["decision"], row["reason"]) == ("bob", False, "no_grant")


async def test_sampling_keeps_every_deny_unless_told_otherwise(
    db_url: str, pg: asyncpg.Connection, aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    await pg.execute(BASE)
    client = await _client(aiohttp_client, _settings(tmp_path, decision_log_sample=0.0), db_url)
    allowed = [await _evaluate(client, "alice") for _ in range(20)]
    denied = [await _evaluate(client, "bob") for _ in range(5)]
    assert all("decision_id" not in a["context"] for a in allowed)  # not kept: no id
    ids = {d["context"]["decision_id"] for d in denied}
    await _count_at_least(pg, 5)
    assert set(await _rows(pg)) == ids

    # PDP_DECISION_LOG_DENIES=sampled: denies are sampled like the rest (here: none).
    log = DecisionLog(_Dropped(), sample=0.0, always_denies=False)
    assert (
        log.record(None, 0.0, "evaluation", T, "user", "b", "r", "doc", "1", False, "x", None, 0.0)
        is None
    )
    log = DecisionLog(_Dropped(), sample=1.0, always_denies=False)
    assert log.record(
        None, 0.0, "evaluation", T, "user", "b", "r", "doc", "1", True, "x", None, 0.0
    )


class _Dropped:
    def __init__(self) -> None:
        self.n = 0

    def decision_log_dropped(self, n: int = 1) -> None:
        self.n += n


async def test_a_full_queue_drops_and_counts_while_checks_go_on(
    db_url: str, pg: asyncpg.Connection, aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    await pg.execute(BASE)
    settings = _settings(tmp_path, decision_log_queue_size=5, decision_log_batch_size=2)
    client = await _client(aiohttp_client, settings, db_url)
    locker = await asyncpg.connect(db_url)

    async def writer_waits_on_the_lock() -> bool:
        waiting = await pg.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 "
            "AND wait_event_type = 'Lock'",
            APP_NAME,
        )
        return bool(waiting == 1)

    try:
        tx = locker.transaction()
        await tx.start()
        await locker.execute("LOCK TABLE pdp.decision_log IN ACCESS EXCLUSIVE MODE")
        first = (await _evaluate(client, "alice"))["context"]["decision_id"]
        await _until(writer_waits_on_the_lock)  # its COPY (of `first`) waits on our lock
        answers = [await _evaluate(client, "alice" if i % 2 else "bob") for i in range(200)]
        # Every check was answered, right, while the writer still waits.
        assert [a["decision"] for a in answers] == [i % 2 == 1 for i in range(200)]
        assert await writer_waits_on_the_lock()
        kept = [a["context"]["decision_id"] for a in answers if "decision_id" in a["context"]]
        assert len(kept) == 5  # the queue's size; the rest dropped and counted
        assert await _metric(client, "pdp_decision_log_dropped_total") == 195
        await tx.rollback()
    finally:
        await locker.close()
    await _count_at_least(pg, 6)
    assert set(await _rows(pg)) == {first, *kept}
    # Room again: new decisions are kept.
    assert "decision_id" in (await _evaluate(client, "alice"))["context"]


def _post(port: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        answer: dict[str, Any] = json.loads(conn.getresponse().read())
        return answer
    finally:
        conn.close()


async def test_stdout_mode_writes_json_lines(
    db_url: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """`pdp serve` with PDP_DECISION_LOG=stdout: one JSON line per decision on its stdout
    (its log lines go to stderr; the harness writes both to one file)."""
    await pg.execute(BASE)
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES)
    env = {"PDP_DECISION_LOG": "stdout", "PDP_DEFAULT_TENANT": T, "PDP_ROUTES": str(routes),
           "PDP_FORWARD_AUTH_MODE": "traefik"}  # fmt: skip
    pdp = await asyncio.to_thread(Pdp, db_url, tmp_path, env)
    try:
        ids = []
        for user in ("alice", "bob"):
            body = {"subject": {"type": "user", "id": user}, "action": {"name": "read"},
                    "resource": {"type": "doc", "id": "1"}}  # fmt: skip
            answer = await asyncio.to_thread(_post, pdp.port, "/access/v1/evaluation", body)
            ids.append(answer["context"]["decision_id"])
        headers = {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/docs/7", "X-User-Id": "bob"}
        reply = await asyncio.to_thread(request, pdp.port, "GET", "/forward-auth", headers)
        assert reply.status == 403
        ids.append(reply.header("X-PDP-Decision-Id"))

        def lines() -> list[dict[str, Any]]:
            text = pdp.proc.log.read_text()
            return [json.loads(x) for x in text.splitlines() if x.startswith("{")]

        await asyncio.to_thread(poll, lambda: len(lines()) >= 3, 15, "decision lines", pdp.proc)
    finally:
        assert await asyncio.to_thread(pdp.stop) == 0
    written = lines()
    assert [line["decision_id"] for line in written] == ids
    assert written[0]["subject"] == {"type": "user", "id": "alice"}
    assert written[0]["resource"] == {"type": "doc", "id": "1"}
    assert (written[0]["action"], written[0]["decision"], written[0]["reason"]) == (
        {"name": "read"}, True, "granted",
    )  # fmt: skip
    assert (written[1]["decision"], written[1]["reason"], written[1]["tenant"]) == (False, "no_grant", T)
    assert (written[2]["endpoint"], written[2]["resource"]) == ("forward_auth", {"type": "doc", "id": "7"})
    assert datetime.datetime.fromisoformat(written[0]["time"]).tzinfo is not None
    assert written[0]["revision"]
    assert written[0]["latency_ms"] >= 0
    assert await pg.fetchval("SELECT count(*) FROM pdp.decision_log") == 0


def _day(offset: int) -> datetime.date:
    return datetime.datetime.now(datetime.UTC).date() + datetime.timedelta(days=offset)


def _partition(offset: int) -> str:
    return f"decision_log_p{_day(offset):%Y%m%d}"


async def _partitions(pg: asyncpg.Connection) -> set[str]:
    rows = await pg.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'pdp.decision_log'::regclass"
    )
    return {r["relname"] for r in rows}


def _as_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.netloc.rsplit('@', 1)[-1]}"))


async def test_partitions_are_created_ahead_and_dropped_past_retention_by_the_sidecar_role(
    db_url: str, pg: asyncpg.Connection
) -> None:
    # An old partition (made by hand, as the owner), holding a row.
    old = _day(-40)
    await pg.execute(
        f"CREATE TABLE pdp.{_partition(-40)} PARTITION OF pdp.decision_log "
        f"FOR VALUES FROM ('{old}T00:00:00Z') TO ('{old + datetime.timedelta(days=1)}T00:00:00Z')"
    )
    await pg.execute(
        "INSERT INTO pdp.decision_log VALUES ('x', $1, 'evaluation', 't', 'user', 'u', 'read', "
        "'doc', '1', true, 'granted', NULL, 0.1)",
        datetime.datetime.combine(old, datetime.time(12), datetime.UTC),
    )
    login = f"pdp_sidecar_test_{uuid.uuid4().hex[:8]}"  # roles are cluster-wide
    await pg.execute(f"CREATE ROLE {login} LOGIN IN ROLE pdp_sidecar")
    try:
        sink = PgDecisionLog(_as_user(db_url, login), 30 * 86400.0)
        async with sink.opened() as opened:
            assert await _partitions(pg) == {_partition(d) for d in (-1, 0, 1, 2)}
            log = DecisionLog(_Dropped())
            log.record(
                None,
                time.time(),
                "evaluation",
                T,
                "user",
                "u",
                "read",
                "doc",
                "1",
                True,
                "granted",
                None,
                0.001,
            )
            await opened.write([log._take()[0]])  # the sidecar role may COPY
        assert await pg.fetchval("SELECT count(*) FROM pdp.decision_log") == 1
        async with PgDecisionLog(_as_user(db_url, login), 30 * 86400.0, ahead_days=3).opened():
            assert _partition(3) in await _partitions(pg)
        # ... but may not read it, nor may the admin role.
        sidecar = await asyncpg.connect(_as_user(db_url, login))
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await sidecar.fetch("SELECT * FROM pdp.decision_log")
        finally:
            await sidecar.close()
    finally:
        await pg.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", login
        )
        await pg.execute(f"DROP ROLE {login}")
    with pytest.raises(asyncpg.RaiseError, match="retention must be at least 1 day"):
        await pg.fetch("SELECT * FROM pdp.decision_log_maintain(2, interval '1 hour')")


async def test_a_writer_whose_connection_dies_is_restarted(
    db_url: str, pg: asyncpg.Connection, aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    await pg.execute(BASE)
    client = await _client(aiohttp_client, _settings(tmp_path), db_url)
    first = (await _evaluate(client, "alice"))["context"]["decision_id"]
    await _count_at_least(pg, 1)
    killed = await pg.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
        APP_NAME,
    )
    assert killed == 1
    # The next write fails on the dead connection: a crash, counted, and a restart.
    kept: list[str] = []

    async def restarted() -> bool:
        kept.append((await _evaluate(client, "alice"))["context"]["decision_id"])
        return await _metric(client, "pdp_worker_restarts_total", worker="decision_log") >= 1

    await _until(restarted)
    later = (await _evaluate(client, "bob"))["context"]["decision_id"]

    async def arrived() -> bool:
        return later in await _rows(pg)

    await _until(arrived)
    assert first in await _rows(pg)
    # Each entry is either written or counted as dropped (the batch of the failed write).
    dropped = await _metric(client, "pdp_decision_log_dropped_total")
    rows = await _rows(pg)
    assert len([i for i in kept if i in rows]) + dropped == len(kept)


async def test_erase_subject_pseudonymises_the_decision_log(
    db_url: str, pg: asyncpg.Connection, aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    await pg.execute(BASE)
    client = await _client(aiohttp_client, _settings(tmp_path), db_url)
    for user in ("alice", "alice", "bob"):
        await _evaluate(client, user)
    await _count_at_least(pg, 3)
    # The same user id in another tenant is someone else.
    await pg.execute(
        "INSERT INTO pdp.decision_log VALUES ('y', now(), 'evaluation', 'other', 'user', "
        "'alice', 'read', 'doc', '1', false, 'no_grant', NULL, 0.1)"
    )
    key = b"k" * 32
    erased = await erasure.erase(pg, T, "alice", key)
    assert erased.rewritten["decision_log"] == 2
    assert "decision_log rows pseudonymised: 2" in erased.lines()
    subjects = await pg.fetch("SELECT tenant_id, subject_id FROM pdp.decision_log ORDER BY 1, 2")
    alias = erasure.pseudonym(key, T, "alice")
    assert sorted((r["tenant_id"], r["subject_id"]) for r in subjects) == sorted(
        [(T, alias), (T, alias), (T, "bob"), ("other", "alice")]
    )


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("PDP_DECISION_LOG", "file", "PDP_DECISION_LOG: must be one of off, stdout, postgres"),
        ("PDP_DECISION_LOG_SAMPLE", "1.5", "PDP_DECISION_LOG_SAMPLE: must be a number from 0 to 1"),
        ("PDP_DECISION_LOG_SAMPLE", "half", "PDP_DECISION_LOG_SAMPLE: not a number"),
        (
            "PDP_DECISION_LOG_DENIES",
            "never",
            "PDP_DECISION_LOG_DENIES: must be one of always, sampled",
        ),
        (
            "PDP_DECISION_LOG_QUEUE_SIZE",
            "0",
            "PDP_DECISION_LOG_QUEUE_SIZE: must be a positive integer",
        ),
        (
            "PDP_DECISION_LOG_BATCH_SIZE",
            "-1",
            "PDP_DECISION_LOG_BATCH_SIZE: must be a positive integer",
        ),
        ("PDP_DECISION_LOG_RETENTION", "12h", "PDP_DECISION_LOG_RETENTION: must be at least 1d"),
        ("PDP_DECISION_LOG_RETENTION", "soon", "PDP_DECISION_LOG_RETENTION: not a duration"),
    ],
)
def test_bad_settings_name_their_variable(variable: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({variable: value})
    assert str(caught.value).startswith(message)


def test_settings_defaults_and_values() -> None:
    default = Settings.from_env({})
    assert (default.decision_log, default.decision_log_sample, default.decision_log_denies) == (
        "off", 1.0, "always",
    )  # fmt: skip
    assert default.decision_log_retention_seconds == 30 * 86400
    chosen = Settings.from_env(
        {"PDP_DECISION_LOG": "postgres", "PDP_DECISION_LOG_SAMPLE": "0.25",
         "PDP_DECISION_LOG_DENIES": "sampled", "PDP_DECISION_LOG_RETENTION": "7d"}
    )  # fmt: skip
    assert (chosen.decision_log, chosen.decision_log_sample) == ("postgres", 0.25)
    assert chosen.decision_log_retention_seconds == 7 * 86400


async def test_with_logging_off_answers_carry_no_decision_id_and_nothing_is_written(
    db_url: str, pg: asyncpg.Connection, aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    await pg.execute(BASE)
    client = await _client(aiohttp_client, _settings(tmp_path, decision_log="off"), db_url)
    assert "decision_id" not in (await _evaluate(client, "alice"))["context"]
    assert "decision_id" not in (await _evaluate(client, "bob"))["context"]
    status, decision_id = await _forward(client, "bob")
    assert (status, decision_id) == (403, None)  # a deny names no log row
    status, decision_id = await _forward(client, "alice")
    assert status == 200
    assert decision_id  # an allow still carries its id, as before
    assert await _metric(client, "pdp_worker_up", worker="decision_log") == 0.0
    assert await pg.fetchval("SELECT count(*) FROM pdp.decision_log") == 0


async def test_partition_maintenance_gives_up_behind_a_long_reader_and_writes_go_on(
    db_url: str, pg: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    sink = PgDecisionLog(db_url, 30 * 86400.0)
    async with sink.opened() as opened:  # today's partitions exist
        await pg.execute(f"DROP TABLE pdp.{_partition(2)}")  # work for the next turn
        reader = await asyncpg.connect(db_url)
        try:
            async with reader.transaction():  # a long report over the log
                await reader.execute("LOCK TABLE pdp.decision_log IN ACCESS SHARE MODE")
                started = time.monotonic()
                created, dropped = await sink.maintain(opened._conn)  # type: ignore[attr-defined]
                assert (created, dropped) == ([], [])
                assert time.monotonic() - started < 10
                log = DecisionLog(_Dropped())
                log.record(None, time.time(), "evaluation", T, "user", "u", "read", "doc", "1",
                           True, "granted", None, 0.001)  # fmt: skip
                await opened.write([log._take()[0]])  # COPY is not blocked by the reader
        finally:
            await reader.close()
        assert "partitions not maintained" in caplog.text
        assert await pg.fetchval("SELECT count(*) FROM pdp.decision_log") == 1
        created, _ = await sink.maintain(opened._conn)  # type: ignore[attr-defined]
        assert created == [_partition(2)]  # the next turn, with the reader gone


def test_shared_stdout_lines_from_two_writers_never_interleave_on_a_pipe() -> None:
    """`pdp serve --workers`: each worker writes the same stdout pipe."""
    read_end, write_end = os.pipe()
    received = bytearray()

    def drain() -> None:
        while chunk := os.read(read_end, 65536):
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()

    def writer(name: str) -> None:
        # Its own stream on the pipe, as each worker process has its own stdout buffer.
        with os.fdopen(os.dup(write_end), "wb") as stream:
            sink = StdoutSink(stream, shared=True)
            for n in range(20):
                entries = [
                    (f"{name}-{n}-{i}", 0.0, "evaluation", "t", "user", name * (i * 10), "read",
                     "doc", "d", True, "ok", None, 0.0)
                    for i in range(200)
                ]  # fmt: skip
                sink._write(entries)

    threads = [threading.Thread(target=writer, args=(w,)) for w in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    os.close(write_end)
    reader.join()
    os.close(read_end)
    lines = bytes(received).splitlines()
    assert len(lines) == 2 * 20 * 200
    ids = {json.loads(line)["decision_id"] for line in lines}  # each line whole JSON
    assert len(ids) == len(lines)
