"""AuthZEN 1.0 HTTP handlers: evaluation, evaluations, the three searches, discovery.

The hot path (`evaluation` with no `X-PDP-Min-Revision`) reads the body, parses it
(`pdp.protocol`: typed with msgspec for the common shape, else the general parser),
asks the in-memory engine, serializes and counts: no database, no lock, no log line,
no await other than reading the body. Parse errors are raised as
`RequestError` and turned into 400 by the one guard around every route (`pdp.web.app`).

Answers that memory cannot give are still decisions (deny, fail closed), each with
its reason in `context`: `not_ready` before the first snapshot, `stale` past
`max_staleness_seconds` in `deny` mode, `revision_unavailable` when a requested
revision did not arrive in time and no SQL fallback exists. With a fallback the
answer comes from PostgreSQL: reason `consistent_fallback`, revision `sql`.
Searches answer the same cases with no results and the reason in `context`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Set
from typing import Any

from aiohttp import hdrs, web
from multidict import istr

from pdp import protocol
from pdp.config import Settings
from pdp.decision_log import DecisionLog
from pdp.engine import Decision, Engine, ResourcesResult, Snapshot
from pdp.errors import DependencyError, RequestError, UnsupportedEncoding
from pdp.metrics import Metrics
from pdp.protocol import MIN_REVISION, Batch, JsonObject, Query, dumps
from pdp.replica import Fallback, Replica
from pdp.web.subject_search import SubjectSearcher, yield_turns

log = logging.getLogger(__name__)

STALE = "X-PDP-Stale"
JSON_TYPE = "application/json"
# Header names as multidict's case-folded `istr`: a lookup skips folding the key
# (~450 instructions each; four on every check).
_MIN_REVISION = istr(MIN_REVISION)
_JSON_HEADERS: dict[str, str] = {hdrs.CONTENT_TYPE: JSON_TYPE}
_BODY_CACHE_LIMIT = 4096
_UNSUPPORTED = "unsupported_subject_type"
_USER_UNAVAILABLE: JsonObject = {
    "reason": "user_unavailable",
    "error": "loading the user's rows from PostgreSQL failed (PDP_CACHE_MODE=on_demand)",
}
_NONE_FAILED: frozenset[tuple[str, str]] = frozenset()
_SEARCH_ATTEMPTS = 3  # a piecewise computation restarted when the engine changes
_LOAD_ROUNDS = 3  # on-demand: loads of a request's users, when others evict them meanwhile


class Consistency(enum.Enum):
    """How a request's `X-PDP-Min-Revision` is met."""

    MEMORY = "memory"  # no header, or the revision is visible in memory
    FALLBACK = "fallback"  # not visible in time: ask PostgreSQL
    UNAVAILABLE = "unavailable"  # not visible in time and no fallback: deny


async def read_json(request: web.Request) -> JsonObject:
    """The body as a JSON object; RequestError (400) for a non-JSON type or body (see
    `read_body`)."""
    return protocol.loads(await read_body(request))


async def read_body(request: web.Request) -> bytes:
    """The raw body of a JSON request; RequestError (400) for a non-JSON type.

    A body over `client_max_size` raises aiohttp's 413 from `read()`. A compressed body
    (any Content-Encoding but identity) is refused with 415 before it is read: it is
    never inflated (a small gzip body can inflate to gigabytes, on the loop).
    """
    headers = request.headers
    encoding = headers.get(hdrs.CONTENT_ENCODING)
    if encoding is not None and encoding.strip().lower() not in ("", "identity"):
        raise UnsupportedEncoding(
            f"Content-Encoding {_shown(encoding)} is not accepted; send the body "
            "uncompressed (identity)",
            "Content-Encoding",
        )
    ctype = headers.get(hdrs.CONTENT_TYPE)
    if ctype != JSON_TYPE and (
        ctype is None or ctype.partition(";")[0].strip().lower() != JSON_TYPE
    ):
        raise RequestError("Content-Type must be application/json", "Content-Type")
    content, length = request.content, request.content_length
    if length is not None and length <= request.client_max_size and content.is_eof():
        # The whole body came with the headers (a check's usually does): take it as is,
        # without `read()`'s loop of awaited reads and its copy into a bytearray.
        return content.read_nowait()
    return await request.read()


def _shown(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


# Batch entries answered from memory are a handful of distinct objects, shared instead
# of built per entry (read-only: they are only serialized). By default an entry is the
# bare decision; with `options.include_reasons` it carries its reason.
_BARE: dict[bool, JsonObject] = {True: {"decision": True}, False: {"decision": False}}
_WITH_REASON: dict[tuple[bool, str], JsonObject] = {
    (allowed, reason): {"decision": allowed, "context": {"reason": reason}}
    for allowed, reasons in (
        (True, ("granted",)),
        (False, ("unknown_tenant", "unknown_user", "user_disabled", "no_grant", "expired")),
    )
    for reason in reasons
}


def _entry_result(allowed: bool, context: JsonObject, reasons: bool) -> JsonObject:
    """A batch entry: the bare decision, or with its context when the caller asked."""
    if not reasons:
        return _BARE[allowed]
    return {"decision": allowed, "context": context}


def json_response(payload: Any, status: int = 200, stale: str | None = None) -> web.Response:
    headers = {"Content-Type": JSON_TYPE}
    if stale is not None:
        headers[STALE] = stale
    return web.Response(body=dumps(payload), status=status, headers=headers)


class AuthzenApi:
    """The AuthZEN endpoints over one replica; bound methods are the route handlers."""

    def __init__(
        self,
        settings: Settings,
        replica: Replica,
        metrics: Metrics,
        fallback: Fallback | None,
        decision_log: DecisionLog | None = None,
    ) -> None:
        self._replica = replica
        self._log = decision_log
        self._metrics = metrics
        self._fallback = fallback
        self._default_tenant = settings.default_tenant
        self._user_types = frozenset(settings.subject_types)
        self._max_batch = settings.max_batch
        self._max_staleness = settings.max_staleness_seconds
        self._serve_stale = settings.stale_mode == "serve"
        self._wait_seconds = settings.consistency_wait_ms / 1000
        self._configuration = dumps(protocol.configuration(settings.public_base_url))
        self._revision_of: Snapshot | None = None
        self._revision_text: str | None = None
        self._bodies: dict[int, tuple[Decision, bytes]] = {}
        self._bodies_revision: Snapshot | None = None
        self._searcher = SubjectSearcher(settings.search_concurrency, share=settings.search_share)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/access/v1/evaluation", self.evaluation),
            web.post("/access/v1/evaluations", self.evaluations),
            web.post("/access/v1/search/subject", self.search_subject),
            web.post("/access/v1/search/resource", self.search_resource),
            web.post("/access/v1/search/action", self.search_action),
            web.get("/.well-known/authzen-configuration", self.configuration),
        ]

    # --- gates -----------------------------------------------------------------------

    def _revision(self) -> str | None:
        """The replica's snapshot as text, formatted once per revision."""
        revision = self._replica.revision
        if revision is not self._revision_of:
            self._revision_of = revision
            self._revision_text = None if revision is None else str(revision)
        return self._revision_text

    async def _consistency(self, raw: str) -> Consistency:
        """Wait (bounded) until the transaction in `X-PDP-Min-Revision` is in memory."""
        xid = protocol.parse_min_revision(raw)
        replica = self._replica
        if replica.has_revision(xid):
            return Consistency.MEMORY
        replica.wake.set()
        if await replica.wait_for_revision(xid, self._wait_seconds):
            return Consistency.MEMORY
        return Consistency.UNAVAILABLE if self._fallback is None else Consistency.FALLBACK

    def _gate(self) -> tuple[Engine | None, JsonObject | None, str | None]:
        """(engine to ask, or None with the deny context saying why; X-PDP-Stale value)."""
        replica = self._replica
        engine = replica.engine
        if engine is None:
            return None, {"reason": "not_ready"}, None
        staleness = replica.staleness()
        if staleness <= self._max_staleness:
            return engine, None, None
        if self._serve_stale:
            return engine, None, f"{staleness:.3f}"
        blocked = {"reason": "stale", "staleness_seconds": round(staleness, 3)}
        return None, blocked, None

    # --- evaluation ------------------------------------------------------------------

    async def evaluation(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        raw = await read_body(request)
        # The common shape decoded typed (msgspec); anything else, and every error
        # message, from the general parser.
        query = protocol.decode_evaluation(raw, self._default_tenant)
        if query is None:
            query = protocol.parse_evaluation(protocol.loads(raw), self._default_tenant)
        failed: Set[tuple[str, str]] | None = None
        replica = self._replica
        if _MIN_REVISION not in request.headers and query.subject_type in self._user_types:
            failed = _NONE_FAILED if replica.users is None else await self._load([query])
        if failed is not None and not failed:  # user types only, no revision asked, user in memory
            engine, stale = replica.fresh(self._max_staleness), None
            if engine is None:  # not ready, or stale: `_gate` says how to answer
                engine, _, stale = self._gate()
            if engine is not None:  # the hot path: fresh (or served stale) memory
                now = time.time()
                decision = engine.check(
                    query.tenant, query.user, query.resource_type, query.resource_id,
                    query.action, now, query.facts,
                )  # fmt: skip
                body = self._body_of(decision, engine.revision)
                seconds = time.perf_counter() - started
                self._metrics.decided("evaluation", decision.allowed, seconds)
                if self._log is not None:
                    body = self._logged(body, query, decision, engine.revision, now, seconds)
                headers = _JSON_HEADERS if stale is None else {**_JSON_HEADERS, STALE: stale}
                return web.Response(body=body, headers=headers)
        return await self._single(request, query, "evaluation", started, failed)

    def _loaded(self, query: Query) -> bool:
        """On-demand mode: whether the query's user is in memory (a batch naming more
        users than PDP_CACHE_USERS evicts its own first ones: those deny)."""
        users = self._replica.users
        return users is None or users.cached(query.tenant, query.user)

    async def _load(self, queries: list[Query]) -> Set[tuple[str, str]] | None:
        """On-demand mode: load the users these queries name; the (tenant, user) pairs
        whose load failed (their checks deny, reason `user_unavailable`: fail closed)."""
        users = self._replica.users
        if users is None:
            return set()
        if self._replica.engine is None:
            return None  # not ready: the gate says so
        keys = list(
            dict.fromkeys((q.tenant, q.user) for q in queries if q.subject_type in self._user_types)
        )
        failed: set[tuple[str, str]] = set()
        for _ in range(_LOAD_ROUNDS):
            done = await asyncio.gather(*(users.ensure(*k) for k in keys), return_exceptions=True)
            for key, result in zip(keys, done, strict=True):
                if isinstance(result, DependencyError):
                    failed.add(key)
                elif isinstance(result, BaseException):
                    raise result
            # Between a load's end and this line other requests ran: one of their loads
            # may have evicted (or expired) a user loaded here. The caller checks with
            # no await after this, so a user cached now is cached at the check.
            keys = [k for k in keys if k not in failed and not users.cached(*k)]
            if not keys:
                break
        else:
            failed.update(keys)  # evicted again and again: the batch outgrows the cache
        if failed:
            log.warning("loading %d users' rows failed; denying their checks", len(failed))
        return failed

    def _body_of(self, decision: Decision, revision: Snapshot) -> bytes:
        """The response body of `decision` at `revision`, serialized once per pair.

        Decisions are few distinct objects (the engine shares them), so most requests
        reuse a body. Keyed by identity; the cache holds the decision, so its id stays
        unique, and it is dropped whole when the revision moves or it grows too big.
        """
        if revision is not self._bodies_revision or len(self._bodies) > _BODY_CACHE_LIMIT:
            self._bodies.clear()
            self._bodies_revision = revision
        cached = self._bodies.get(id(decision))
        if cached is not None and cached[0] is decision:
            return cached[1]
        context = decision.to_context()
        context["revision"] = self._revision() or str(revision)
        body = dumps({"decision": decision.allowed, "context": context})
        self._bodies[id(decision)] = (decision, body)
        return body

    def _logged(  # noqa: PLR0917 -- internal, the decision's parts
        self, body: bytes, query: Query, decision: Decision, revision: Snapshot, now: float,
        seconds: float,
    ) -> bytes:  # fmt: skip
        """`body` with `context.decision_id` spliced in when the decision is logged (the
        cached body ends with the context's closing brace and the object's)."""
        assert self._log is not None
        decision_id = self._log.record(
            None, now, "evaluation", query.tenant, query.subject_type, query.user,
            query.action, query.resource_type, query.resource_id, decision.allowed,
            decision.reason, revision, seconds,
        )  # fmt: skip
        if decision_id is None:
            return body
        return b'%s,"decision_id":"%s"}}' % (body[:-2], decision_id.encode())

    async def _single(
        self, request: web.Request, query: Query, endpoint: str, started: float,
        failed: Set[tuple[str, str]] | None = None,
    ) -> web.Response:  # fmt: skip
        raw = request.headers.get(MIN_REVISION)
        mode = Consistency.MEMORY if raw is None else await self._consistency(raw)
        stale = None
        if mode is Consistency.MEMORY:
            # Loaded after the wait, with no await before the check: never evicted between.
            if failed is None:
                failed = await self._load([query])
            engine, blocked, stale = self._gate()
            if failed and blocked is None:
                blocked, engine = dict(_USER_UNAVAILABLE), None
            allowed, context = self._one(query, engine, blocked, time.time())
        else:
            allowed, context = await self._consistent(query, mode)
        if "revision" not in context:
            revision = self._revision()
            if revision is not None:
                context["revision"] = revision
        seconds = time.perf_counter() - started
        self._metrics.decided(endpoint, allowed, seconds)
        if self._log is not None:
            decision_id = self._log.record(
                None, time.time(), endpoint, query.tenant, query.subject_type, query.user,
                query.action, query.resource_type, query.resource_id, allowed,
                str(context["reason"]), context.get("revision"), seconds,
            )  # fmt: skip
            if decision_id is not None:
                context["decision_id"] = decision_id
        return json_response({"decision": allowed, "context": context}, stale=stale)

    async def _consistent(self, query: Query, mode: Consistency) -> tuple[bool, JsonObject]:
        """Answer a query whose revision memory could not show in time (never from memory)."""
        if query.subject_type not in self._user_types:
            return False, {"reason": _UNSUPPORTED}
        if mode is Consistency.UNAVAILABLE or self._fallback is None:
            return False, {"reason": "revision_unavailable"}
        try:
            allowed = await self._fallback(
                query.tenant, query.user, query.resource_type, query.resource_id, query.action,
                query.facts(),
            )  # fmt: skip
        except DependencyError:
            log.warning("consistent fallback check failed; denying", exc_info=True)
            return False, {"reason": "revision_unavailable", "error": "the SQL check failed"}
        return bool(allowed), {"reason": "consistent_fallback", "revision": "sql"}

    def _one(
        self, query: Query, engine: Engine | None, blocked: JsonObject | None, now: float
    ) -> tuple[bool, JsonObject]:
        """One query answered from memory (or denied with the gate's reason)."""
        if query.subject_type not in self._user_types:
            return False, {"reason": _UNSUPPORTED}
        if engine is None:
            return False, dict(blocked or {"reason": "not_ready"})
        decision = engine.check(
            query.tenant, query.user, query.resource_type, query.resource_id, query.action, now,
            query.facts,
        )  # fmt: skip
        return decision.allowed, decision.to_context()

    # --- evaluations -----------------------------------------------------------------

    async def evaluations(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        body = await read_body(request)
        # The common shape decoded typed (msgspec, ~3x cheaper); anything else, and every
        # error message, from the general parser.
        parsed: Query | Batch | None = protocol.decode_evaluations(
            body, self._default_tenant, self._max_batch
        )
        if parsed is None:
            parsed = protocol.parse_evaluations(
                protocol.loads(body), self._default_tenant, self._max_batch
            )
        if isinstance(parsed, Query):
            return await self._single(request, parsed, "evaluations", started)
        raw = request.headers.get(MIN_REVISION)
        mode = Consistency.MEMORY if raw is None else await self._consistency(raw)
        stale = None
        top: JsonObject = {}
        # Each entry's reason, for the decision log only (a bare entry does not carry it).
        why: list[str] = []
        reasons = None if self._log is None else why
        if mode is Consistency.MEMORY:
            failed = None
            if self._replica.users is not None:
                failed = await self._load([e for e in parsed.entries if isinstance(e, Query)])
            engine, blocked, stale = self._gate()
            results = self._batch_from_memory(parsed, engine, blocked, reasons, failed)
            if blocked is not None:
                top.update(blocked)
        else:
            results = await self._batch_consistent(parsed, mode, reasons)
        revision = self._revision()
        if revision is not None:
            top["revision"] = revision
        allowed = sum(1 for r in results if r["decision"])
        seconds = time.perf_counter() - started
        self._metrics.decided_batch("evaluations", allowed, len(results) - allowed, seconds)
        if self._log is not None:
            self._log_batch(parsed, results, why, top, seconds)
        return json_response({"evaluations": results, "context": top}, stale=stale)

    def _batch_from_memory(
        self, batch: Batch, engine: Engine | None, blocked: JsonObject | None,
        why: list[str] | None = None, failed: Set[tuple[str, str]] | None = None,
    ) -> list[JsonObject]:  # fmt: skip
        """Each entry from memory. A malformed entry always carries its error (it is a
        report to the caller, not a decision's reason). `why`, when given, receives each
        entry's reason in order."""
        semantic, reasons, user_types = batch.semantic, batch.reasons, self._user_types
        reason_only = {"reason": "not_ready" if blocked is None else blocked["reason"]}
        # One user's entries share their work (exactly `check`'s answers; see BatchCheck).
        checks = None if engine is None else engine.batch(time.time())
        results: list[JsonObject] = []
        for entry in batch.entries:
            if isinstance(entry, RequestError):
                result, reason = protocol.entry_error(entry), "bad_request"
            elif entry.subject_type not in user_types:
                result = _entry_result(False, {"reason": _UNSUPPORTED}, reasons)
                reason = _UNSUPPORTED
            elif checks is None:
                result, reason = _entry_result(False, reason_only, reasons), reason_only["reason"]
            elif failed is not None and (
                (entry.tenant, entry.user) in failed or not self._loaded(entry)
            ):
                result = _entry_result(False, dict(_USER_UNAVAILABLE), reasons)
                reason = "user_unavailable"
            else:
                decision = checks.check(
                    entry.tenant, entry.user, entry.resource_type, entry.resource_id,
                    entry.action, entry.facts,
                )  # fmt: skip
                if not reasons:
                    result = _BARE[decision.allowed]
                else:
                    result = _WITH_REASON.get((decision.allowed, decision.reason)) or {
                        "decision": decision.allowed,
                        "context": {"reason": decision.reason},
                    }
                reason = decision.reason
            results.append(result)
            if why is not None:
                why.append(reason)
            if semantic != "execute_all" and protocol.stops_after(semantic, result["decision"]):
                break
        return results

    def _log_batch(
        self, batch: Batch, results: list[JsonObject], why: list[str], top: JsonObject,
        seconds: float,
    ) -> None:  # fmt: skip
        """Log each decided entry as `<batch id>.<index>`; the batch id goes in the top
        context (`decision_id`), each entry's also in its context when it has one.

        Entries keep their bare `{"decision": ...}` otherwise: AuthZEN clients compare
        them exactly. Every entry is given the whole request's latency."""
        assert self._log is not None
        batch_id, now, kept = self._log.new_id(), time.time(), False
        revision = top.get("revision")
        for index, (entry, result) in enumerate(zip(batch.entries, results, strict=False)):
            if isinstance(entry, RequestError):
                continue  # malformed: no decision to log
            context = result.get("context")
            entry_id = self._log.record(
                f"{batch_id}.{index}", now, "evaluations", entry.tenant, entry.subject_type,
                entry.user, entry.action, entry.resource_type, entry.resource_id,
                result["decision"], why[index], revision, seconds,
            )  # fmt: skip
            if entry_id is not None:
                kept = True
                if context is not None:
                    results[index] = {**result, "context": {**context, "decision_id": entry_id}}
        if kept:
            top["decision_id"] = batch_id

    async def _batch_consistent(
        self, batch: Batch, mode: Consistency, why: list[str] | None = None
    ) -> list[JsonObject]:
        results: list[JsonObject] = []
        for entry in batch.entries:
            if isinstance(entry, RequestError):
                result, reason = protocol.entry_error(entry), "bad_request"
            else:
                allowed, context = await self._consistent(entry, mode)
                result = _entry_result(allowed, context, batch.reasons)
                reason = str(context["reason"])
            results.append(result)
            if why is not None:
                why.append(reason)
            if protocol.stops_after(batch.semantic, result["decision"]):
                break
        return results

    # --- search ----------------------------------------------------------------------

    async def _search_engine(
        self, request: web.Request
    ) -> tuple[Engine | None, JsonObject, str | None]:
        """The engine to search and the response context, or None and the context saying
        why not (the search then answers no results: fail closed); and X-PDP-Stale."""
        raw = request.headers.get(MIN_REVISION)
        if raw is not None and await self._consistency(raw) is not Consistency.MEMORY:
            # A search has no SQL counterpart to fall back on.
            engine, context, stale = None, {"reason": "revision_unavailable"}, None
        else:
            engine, blocked, stale = self._gate()
            context = {} if blocked is None else blocked
        revision = self._revision()
        if revision is not None:
            context["revision"] = revision
        return engine, context, stale

    async def search_subject(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        async with self._searcher.turn() as meter:
            with meter.timing():
                search = protocol.parse_subject_search(body, self._default_tenant)
            if self._replica.users is not None:
                raise RequestError(
                    "subject search needs every user in memory: not available with "
                    "PDP_CACHE_MODE=on_demand (use the SQL reference pdp.check per user)",
                    "subject",
                )
            engine, context, stale = await self._search_engine(request)
            ids: tuple[str, ...] = ()
            if engine is not None and search.subject_type in self._user_types:
                question = (search.tenant, search.resource_type, search.resource_id, search.action)
                ids = await self._searcher.subjects(engine, question, meter)
                # Who only a conditional grant allows depends on the request's
                # properties: decided per request, never cached with the question.
                extra, undecided = await self._conditional_subjects(engine, search)
                if extra:
                    with meter.timing():
                        ids = tuple(sorted(set(ids).union(extra)))
                _say_undecided(context, undecided)
            with meter.timing():
                render = _subject_renderer(search.subject_type)
                results, page = protocol.paged(ids, search.page, render)
                payload = {"page": page, "context": context, "results": results}
                response = json_response(payload, stale=stale)
        return response

    async def _conditional_subjects(
        self, engine: Engine, search: protocol.SubjectSearch
    ) -> tuple[list[str], tuple[str, ...]]:
        """Who only a conditional grant allows, in pieces with a turn between them (a
        condition costs tens of us); restarted like `_subjects` if the engine changes."""
        args = (search.tenant, search.resource_type, search.resource_id, search.action)
        now = time.time()
        for _ in range(_SEARCH_ATTEMPTS):
            version, found, undecided = engine.version, [], set()
            for allowed, unsure in engine.conditional_subject_chunks(*args, now, search.facts):
                found.extend(allowed)
                undecided.update(unsure)
                await yield_turns()
                if engine.version != version:
                    break
            else:
                return found, tuple(sorted(undecided))
        return engine.conditional_subjects(*args, now, search.facts)

    async def _resources(self, engine: Engine, search: protocol.ResourceSearch) -> ResourcesResult:
        """The resource search, with a turn for other requests between pieces of
        inventory decided by conditions; in one go if the engine changes meanwhile."""
        args = (search.tenant, search.user, search.resource_type, search.action)
        now = time.time()
        version = engine.version
        steps = engine.resource_steps(*args, now, search.facts)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                result: ResourcesResult = done.value
                return result
            await yield_turns()
            if engine.version != version:
                return engine.resources(*args, now, search.facts)

    async def _load_searcher(self, subject_type: str, tenant: str, user: str) -> bool:
        """On-demand mode: load the searching user; whether that failed."""
        users = self._replica.users
        if users is None or self._replica.engine is None or subject_type not in self._user_types:
            return False
        try:
            await users.ensure(tenant, user)
        except DependencyError:
            log.warning("loading the user's rows failed; the search answers nothing")
            return True
        return False

    async def search_resource(self, request: web.Request) -> web.Response:
        search = protocol.parse_resource_search(await read_json(request), self._default_tenant)
        engine, context, stale = await self._search_engine(request)
        unavailable = await self._load_searcher(search.subject_type, search.tenant, search.user)
        if unavailable and engine is not None:
            engine, context = None, {**context, **_USER_UNAVAILABLE}
        ids: tuple[str, ...] = ()
        if engine is not None and search.subject_type in self._user_types:
            found = await self._resources(engine, search)
            ids = found.ids
            if found.all_resources:
                context["all_resources"] = True
            if found.truncated:
                context["inventory_truncated"] = True
            _say_undecided(context, found.undecided)
        render = _resource_renderer(search.resource_type)
        results, page = protocol.paged(ids, search.page, render)
        return json_response({"page": page, "context": context, "results": results}, stale=stale)

    async def search_action(self, request: web.Request) -> web.Response:
        search = protocol.parse_action_search(await read_json(request), self._default_tenant)
        engine, context, stale = await self._search_engine(request)
        unavailable = await self._load_searcher(search.subject_type, search.tenant, search.user)
        if unavailable and engine is not None:
            engine, context = None, {**context, **_USER_UNAVAILABLE}
        names: tuple[str, ...] = ()
        if engine is not None and search.subject_type in self._user_types:
            found = engine.actions(
                search.tenant, search.user, search.resource_type, search.resource_id,
                time.time(), search.facts,
            )  # fmt: skip
            names = found.actions
            if found.all_actions:
                context["all_actions"] = True
            _say_undecided(context, found.undecided)
        results, page = protocol.paged(names, search.page, _render_action)
        return json_response({"page": page, "context": context, "results": results}, stale=stale)

    # --- discovery -------------------------------------------------------------------

    async def configuration(self, request: web.Request) -> web.Response:
        return web.Response(body=self._configuration, headers={"Content-Type": JSON_TYPE})


def _say_undecided(context: JsonObject, undecided: tuple[str, ...]) -> None:
    """Name the conditions a search could not decide with the properties it was given:
    the results leave out what they would allow (fail closed), and say so."""
    if undecided:
        context["undecided_conditions"] = list(undecided)


def _subject_renderer(stype: str) -> Callable[[str], JsonObject]:
    def render(user_id: str) -> JsonObject:
        return {"type": stype, "id": user_id}

    return render


def _render_action(name: str) -> JsonObject:
    return {"name": name}


def _resource_renderer(rtype: str) -> Callable[[str], JsonObject]:
    def render(rid: str) -> JsonObject:
        return {"type": rtype, "id": rid}

    return render
