"""Locust users that drive a pdp sidecar over the AuthZEN API, and a writer that
measures how long a committed permission change takes to become visible.

The dataset comes from the JSON manifest named by $PDP_LOADTEST_MANIFEST, written by
`loadtests/run.py` from the seeded database: labelled probes (tenant, user, resource,
action, and the decision PostgreSQL's `pdp.check` gave), Zipf-weighted subjects,
scoped resource ids, the writer's target rows and the mix (how many users of each
class, at what rate). Nothing here imports `pdp` or `sync`: Locust runs on gevent.

Stats table (type / name):
    POST  evaluation {scoped,tenant-wide} {allow,deny}   single checks (the gated ones)
    POST  evaluations batch                              /access/v1/evaluations
    POST  search {subject,resource,action}               /access/v1/search/*
    POST  writer poll / writer min-revision              the writer's own checks
    pg    commit                                         the writer's COMMIT round trip
    commit-to-visible  poll / min-revision               commit acknowledged -> decision
                                                         flipped (see Writer)
A single check that answers the wrong decision is a failure, so the run also proves
the sidecar right under load.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from bisect import bisect
from collections.abc import Callable
from itertools import accumulate
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import gevent
import locust.runners
import locust.stats
import pg8000.native
from locust import (
    FastHttpUser,
    User,
    between,
    constant,
    constant_pacing,
    events,
    task,
)  # fmt: skip
from locust.contrib.fasthttp import FastHttpSession, ResponseContextManager
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

MANIFEST_ENV = "PDP_LOADTEST_MANIFEST"
DATABASE_ENV = "PDP_LOADTEST_DATABASE_URL"  # the writer's; never written to the manifest
EVALUATION = "/access/v1/evaluation"
EVALUATIONS = "/access/v1/evaluations"
JSON_HEADERS = {"Content-Type": "application/json"}
MIN_REVISION = "X-PDP-Min-Revision"
POLL_DEADLINE_S = 30.0  # a change not visible by then is a failure
TIMELINE_PERIOD_S = 2.0  # 5 s on a master: workers report their stats every 3 s
SLOW_MS = 100.0  # the timeline counts single evaluations at least this slow
_ALLOW = b'"decision":true'
WaitTime = Callable[[User], float]  # what Locust calls as `wait_time`


def _load_manifest() -> dict[str, Any]:
    path = os.environ.get(MANIFEST_ENV)
    if not path:
        raise SystemExit(f"{MANIFEST_ENV} is not set: run the load test via `make loadtest`")
    manifest: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))
    return manifest


def _fine_bucket(ms: float) -> float:
    """Locust rounds response times below 100 ms to whole milliseconds; a check takes
    about one, so keep tenths below 10 ms (Locust looks this function up per request)."""
    if ms < 10:
        return round(ms, 1)
    if ms < 100:
        return float(round(ms))
    return float(_coarse_bucket(ms))


_coarse_bucket = locust.stats.bucket_response_time
# Locust declares whole-millisecond (int) buckets; finer float buckets are the point here.
locust.stats.bucket_response_time = _fine_bucket  # type: ignore[assignment]

# Distributed mode: the master counts a worker missing after 3 heartbeats (1 s apart)
# that did not arrive, takes its users away and stops the test when none is left. On
# this shared 2-core machine a starved worker (5,000 greenlets waiting seconds for a
# CPU) misses that many and the run collapses to 0 users; allow 30 s. Read by the
# master when a worker connects and on each heartbeat (a module global).
locust.runners.HEARTBEAT_LIVENESS = 30

MANIFEST = _load_manifest()
MIX: dict[str, Any] = MANIFEST["mix"]


# --- request bodies, serialized once ---------------------------------------------------


def _entry(tenant: str, user: str, rtype: str, rid: str, action: str) -> dict[str, Any]:
    return {
        "subject": {"type": "user", "id": user, "properties": {"tenant": tenant}},
        "resource": {"type": rtype, "id": rid},
        "action": {"name": action},
    }


def _body(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _post(
    session: FastHttpSession,
    path: str,
    body: bytes,
    name: str,
    headers: dict[str, str] | None = None,
) -> ResponseContextManager:
    """POST a serialized body, the response caught for checking."""
    # FastHttpSession sends bytes as they are (its docstring: "String/bytes"), but its
    # `data` parameter is annotated `str | dict | None`.
    return session.post(
        path, data=body, headers=headers or JSON_HEADERS, name=name,  # type: ignore[arg-type]
        catch_response=True,
    )  # fmt: skip


class ProbePool:
    """Labelled single checks, drawn by kind (scoped / tenant-wide) and expected
    decision in the mix's proportions. The Zipf skew over subjects is in the probes:
    the runner drew their subjects by Zipf rank, so hot subjects repeat."""

    def __init__(self, probes: dict[str, dict[str, list[list[str]]]], mix: dict[str, Any]) -> None:
        self.names: list[str] = []
        self.pools: list[list[bytes]] = []
        self.allowed: list[bool] = []
        weights = []
        for kind, share in (
            ("scoped", mix["scoped_share"]),
            ("tenant-wide", 1 - mix["scoped_share"]),
        ):
            for decision, odds in (("allow", mix["allow_share"]), ("deny", 1 - mix["allow_share"])):
                rows = probes.get(kind, {}).get(decision, [])
                if rows and share * odds > 0:
                    self.names.append(f"evaluation {kind} {decision}")
                    self.pools.append([_body(_entry(*row)) for row in rows])
                    self.allowed.append(decision == "allow")
                    weights.append(share * odds)
        if not self.pools:
            raise SystemExit("the manifest has no probes")
        self._cumulative = list(accumulate(weights))

    def draw(self) -> tuple[str, bytes, bool]:
        """(request name, body, expected decision)."""
        i = bisect(self._cumulative, random.random() * self._cumulative[-1])
        i = min(i, len(self.pools) - 1)
        return self.names[i], random.choice(self.pools[i]), self.allowed[i]


PROBES = ProbePool(MANIFEST["probes"], MIX)
_SUBJECTS = MANIFEST["subjects"]  # [tenant, user, weight], hottest first
_SUBJECT_WEIGHTS = list(accumulate(s[2] for s in _SUBJECTS))
_RESOURCES = MANIFEST["resources"]  # [tenant, type, id]
_ACTIONS = MANIFEST["actions"]
_TYPES = MANIFEST["types"]


def _subject() -> tuple[str, str]:
    tenant, user, _ = random.choices(_SUBJECTS, cum_weights=_SUBJECT_WEIGHTS)[0]
    return tenant, user


def _rate(total: float, users: int) -> WaitTime:
    return _poisson(total / users) if total > 0 and users > 0 else constant(1)


def _poisson(rate: float) -> WaitTime:
    """Pacing at `rate` tasks/s per user, arrivals on a Poisson schedule.

    Locust's `constant_throughput` keeps each user on a fixed period: users held up
    together by one slow moment (spawning, a GC pause) come back in step and then
    fire in bursts of hundreds, every period, for the rest of the run. Measured with
    a minimal locustfile against the same sidecar, 1,000 users at 2,000 requests/s:
    p50 73 ms with `constant_throughput`, 1 ms with these exponential gaps (same mean
    rate). Arrivals are scheduled, not slept after a response, so the rate holds
    whatever the response time; at most one second of backlog is ever made up.
    """

    def wait(user: User) -> float:
        # The schedule lives on the user, as Locust's own constant_pacing keeps its state.
        state = vars(user)
        now = time.monotonic()
        due: float = state.get("_next_arrival", now) + random.expovariate(rate)
        state["_next_arrival"] = arrival = max(due, now - 1.0)
        return max(0.0, arrival - now)

    return wait


def _stagger(total: float, users: int) -> None:
    """Start a paced user at a random phase of its period. Users spawned together and
    paced on a fixed period otherwise stay in step and fire in bursts of
    hundreds, which measures the burst's queue, not the sidecar."""
    if total > 0 and users > 0:
        gevent.sleep(random.random() * users / total)


def _eval_wait() -> WaitTime:
    if MIX["eval_rate"]:
        return _rate(MIX["eval_rate"], MIX["eval_users"])
    if MIX["think_time"]:
        return between(*MIX["think_time"])
    return constant(0)


def _decision_failure(content: bytes | None, expected: bool) -> str:
    try:
        answer = json.loads(content or b"")
        got, reason = answer["decision"], answer.get("context", {}).get("reason")
    except (ValueError, KeyError, TypeError):
        return "not an AuthZEN decision"
    want = "allow" if expected else "deny"
    return f"wrong decision: expected {want}, got {'allow' if got else 'deny'} ({reason})"


# --- users ---------------------------------------------------------------------------


class Evaluator(FastHttpUser):
    """Single checks at the mix's rate (or think time), Zipf-skewed subjects."""

    fixed_count = MIX["eval_users"]
    wait_time = _eval_wait()
    network_timeout = 10.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        _stagger(MIX["eval_rate"] or 0.0, MIX["eval_users"])

    @task
    def evaluate(self) -> None:
        name, body, expected = PROBES.draw()
        with _post(self.client, EVALUATION, body, name) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
            elif (_ALLOW in (response.content or b"")) is not expected:
                response.failure(_decision_failure(response.content, expected))


class BatchEvaluator(FastHttpUser):
    """`/access/v1/evaluations` batches of `batch_size` labelled probes."""

    fixed_count = MIX["batch_users"]
    wait_time = _rate(MIX["batch_rate"], MIX["batch_users"])
    network_timeout = 10.0

    def on_start(self) -> None:
        _stagger(MIX["batch_rate"], MIX["batch_users"])

    @task
    def evaluate_batch(self) -> None:
        drawn = [PROBES.draw() for _ in range(MIX["batch_size"])]
        body = b'{"evaluations":[' + b",".join(d[1] for d in drawn) + b"]}"
        with _post(self.client, EVALUATIONS, body, "evaluations batch") as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
                return
            answers = [e["decision"] for e in response.json()["evaluations"]]
            if answers != [d[2] for d in drawn]:
                response.failure("wrong decision in batch")


class Searcher(FastHttpUser):
    """Reverse queries: who may act on a resource, what a subject may reach, which actions."""

    fixed_count = MIX["search_users"]
    wait_time = _rate(MIX["search_rate"], MIX["search_users"])
    network_timeout = 10.0

    def on_start(self) -> None:
        _stagger(MIX["search_rate"], MIX["search_users"])

    def _search(self, kind: str, body: dict[str, Any]) -> None:
        with _post(
            self.client, f"/access/v1/search/{kind}", _body(body), f"search {kind}"
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
            elif "results" not in response.json():
                response.failure("no results member")

    @task
    def subjects_of_resource(self) -> None:
        tenant, rtype, rid = random.choice(_RESOURCES)
        body = _entry(tenant, "", rtype, rid, random.choice(_ACTIONS))
        body["subject"] = {"type": "user", "properties": {"tenant": tenant}}
        self._search("subject", body)

    @task
    def resources_of_subject(self) -> None:
        tenant, user = _subject()
        body = _entry(tenant, user, random.choice(_TYPES), "", random.choice(_ACTIONS))
        body["resource"] = {"type": body["resource"]["type"]}
        self._search("resource", body)

    @task
    def actions_on_resource(self) -> None:
        tenant, user = _subject()
        _, rtype, rid = random.choice(_RESOURCES)
        body = _entry(tenant, user, rtype, rid, "")
        del body["action"]
        self._search("action", body)


class Writer(FastHttpUser):
    """Commits permission changes to PostgreSQL at `writer_rate` per second.

    Each change toggles one target row of pdp.user_roles (a role granting
    `type:action` on a resource id no one else holds), so it flips one decision.
    Even changes are measured by polling the sidecar without a revision until the
    decision flips; odd ones by one check carrying `X-PDP-Min-Revision` (the
    transaction's xid8), which the sidecar must answer with the new decision.
    Both are timed from the COMMIT's acknowledgement, reported as request type
    `commit-to-visible` and appended to `propagation-<pid>.jsonl` for the plots.
    """

    fixed_count = 1
    wait_time = constant_pacing(1 / MIX["writer_rate"]) if MIX["writer_rate"] else constant(1)
    network_timeout = 10.0
    connection_timeout = 2.0

    def on_start(self) -> None:
        self.targets = MANIFEST["writer"]
        self.present = [False] * len(self.targets)
        self.turn = itertools.count()
        self.db = _connect(os.environ[DATABASE_ENV])
        self.db.run("DELETE FROM pdp.user_roles WHERE scope LIKE '%:lt-%'")
        out = Path(MANIFEST["samples_dir"]) / f"propagation-{os.getpid()}.jsonl"
        self.samples = out.open("a", encoding="utf-8")

    def on_stop(self) -> None:
        self.db.run("DELETE FROM pdp.user_roles WHERE scope LIKE '%:lt-%'")
        self.db.close()
        self.samples.close()

    @task
    def change(self) -> None:
        n = next(self.turn)
        i = n % len(self.targets)
        tenant, user, role, rtype, rid, action = self.targets[i]
        self.present[i] = not self.present[i]
        xid, committed = self._commit(tenant, user, role, f"{rtype}:{rid}", self.present[i])
        body = _body(_entry(tenant, user, rtype, rid, action))
        if n % 2 == 0:
            self._poll(body, self.present[i], committed)
        else:
            self._min_revision(body, self.present[i], xid, committed)

    def _commit(
        self, tenant: str, user: str, role: str, scope: str, grant: bool
    ) -> tuple[str, float]:
        db = self.db
        db.run("START TRANSACTION")
        db.run("SET LOCAL pdp.actor = 'loadtest'")
        params = {"t": tenant, "u": user, "r": role, "s": scope}
        if grant:
            db.run(
                "INSERT INTO pdp.user_roles (tenant_id, user_id, role_id, scope)"
                " VALUES (:t, :u, :r, :s) ON CONFLICT DO NOTHING", **params,
            )  # fmt: skip
        else:
            db.run(
                "DELETE FROM pdp.user_roles WHERE tenant_id = :t AND user_id = :u"
                " AND role_id = :r AND scope = :s", **params,
            )  # fmt: skip
        xid = db.run("SELECT pg_current_xact_id()::text")[0][0]
        started = time.perf_counter()
        db.run("COMMIT")
        committed = time.perf_counter()
        self._report("pg", "commit", (committed - started) * 1000)
        return xid, committed

    def _poll(self, body: bytes, expected: bool, committed: float) -> None:
        polls = 0
        while True:
            polls += 1
            with _post(self.client, EVALUATION, body, "writer poll") as response:
                seen = response.status_code == 200 and (_ALLOW in response.content) is expected
                response.success()  # a stale answer is what polling expects
            elapsed = time.perf_counter() - committed
            if seen:
                self._propagated("poll", elapsed, polls=polls)
                return
            if elapsed > POLL_DEADLINE_S:
                self._propagated("poll", elapsed, polls=polls, error="not visible in time")
                return

    def _min_revision(self, body: bytes, expected: bool, xid: str, committed: float) -> None:
        headers = {**JSON_HEADERS, MIN_REVISION: xid}
        with _post(self.client, EVALUATION, body, "writer min-revision", headers) as response:
            elapsed = time.perf_counter() - committed
            content = response.content or b""
            if response.status_code != 200 or (_ALLOW in content) is not expected:
                error = _decision_failure(content, expected)
                response.failure(error)
                self._propagated("min-revision", elapsed, error=error)
                return
            reason = json.loads(content).get("context", {}).get("reason")
        self._propagated("min-revision", elapsed, reason=reason)

    def _propagated(
        self, name: str, seconds: float, error: str | None = None, **extra: Any
    ) -> None:
        self._report("commit-to-visible", name, seconds * 1000, error)
        sample = {"kind": name, "ms": round(seconds * 1000, 3), "t": time.time(), **extra}
        if error:
            sample["error"] = error
        self.samples.write(json.dumps(sample) + "\n")
        self.samples.flush()

    def _report(self, rtype: str, name: str, ms: float, error: str | None = None) -> None:
        self.environment.events.request.fire(
            request_type=rtype, name=name, response_time=ms, response_length=0,
            exception=None if error is None else AssertionError(error), context={},
        )  # fmt: skip


# --- the timeline of the gated population (plotted by the runner) ---------------------


# EventHook.add_listener is unannotated: the listener's own annotations still hold.
@events.init.add_listener  # type: ignore[untyped-decorator]
def _start_timeline(environment: Environment, **_: Any) -> None:
    # The master (or the only process) sees every worker's stats; workers write none.
    if not isinstance(environment.runner, WorkerRunner):
        path = Path(MANIFEST["samples_dir"]) / f"timeline-{MANIFEST['phase']}.jsonl"
        period = 5.0 if isinstance(environment.runner, MasterRunner) else TIMELINE_PERIOD_S
        gevent.spawn(_timeline, environment, path, period)


@events.quitting.add_listener  # type: ignore[untyped-decorator]
def _write_final_stats(environment: Environment, **_: Any) -> None:
    """The final stats with their histograms, as `--json-file` writes them; in
    multi-process mode `--json-file` comes out empty, this one has the master's."""
    if environment.runner is None or isinstance(environment.runner, WorkerRunner):
        return
    entries = [e.serialize() for e in environment.runner.stats.entries.values() if e.num_requests]
    path = Path(MANIFEST["samples_dir"]) / f"stats-{MANIFEST['phase']}.json"
    path.write_text(json.dumps(entries), encoding="utf-8")


def _timeline(environment: Environment, path: Path, period: float) -> None:
    """Every period, one line: single-evaluation rate and latency percentiles over the
    period (from Locust's histograms, at this file's finer resolution), how many took
    `SLOW_MS` or more, all requests' rate and failures, and the number of users."""
    previous: dict[float, int] = {}
    requests = failures = 0
    with path.open("a", encoding="utf-8") as out:
        while True:
            gevent.sleep(period)
            runner = environment.runner
            if runner is None:
                continue
            stats = runner.stats
            current: dict[float, int] = {}
            for (name, method), entry in list(stats.entries.items()):
                if method == "POST" and name.startswith("evaluation "):
                    for bucket, count in entry.response_times.items():
                        current[bucket] = current.get(bucket, 0) + count
            window = {
                b: n - previous.get(b, 0) for b, n in current.items() if n > previous.get(b, 0)
            }
            previous = current
            line = {
                "t": time.time(),
                "users": runner.user_count,
                "eval_rps": sum(window.values()) / period,
                "rps": (stats.total.num_requests - requests) / period,
                "fails_per_s": (stats.total.num_failures - failures) / period,
                "over_100ms": sum(n for b, n in window.items() if b >= SLOW_MS),
                **{f"p{q}": _percentile(window, q / 100) for q in (50, 95, 99)},
            }
            requests, failures = stats.total.num_requests, stats.total.num_failures
            out.write(json.dumps(line) + "\n")
            out.flush()


def _percentile(histogram: dict[float, int], q: float) -> float | None:
    total = sum(histogram.values())
    if not total:
        return None
    rank, seen = max(1, int(q * total + 0.999999)), 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return bucket
    return None


def _connect(url: str) -> pg8000.native.Connection:
    """A pg8000 connection from a postgresql:// URL (a `?host=/dir` query is a Unix socket)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    socket_dir = query.get("host", [""])[0]
    options: dict[str, Any] = {
        "user": unquote(parts.username or "postgres"),
        "database": parts.path.lstrip("/") or None,
        "application_name": "pdp-loadtest-writer",
    }
    if parts.password is not None:
        options["password"] = unquote(parts.password)
    if socket_dir.startswith("/"):
        options["unix_sock"] = f"{socket_dir}/.s.PGSQL.{parts.port or 5432}"
    else:
        options["host"] = parts.hostname or "127.0.0.1"
        options["port"] = parts.port or 5432
    return pg8000.native.Connection(**options)
