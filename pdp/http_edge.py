"""The HTTP edge: what happens to a connection before and around pdp's handlers.

aiohttp's server is used as it is, with its request handler (`web_protocol`) and
server subclassed at the few points where a sidecar must be stricter:

- **Whole-request read timeout.** From the first byte of a request, its line, headers
  and body must arrive within `read_timeout` seconds. Headers late: a 408 JSON answer
  is written and the connection closed. Body late while a handler reads it: the read
  raises `RequestReadTimeout`, which the route guard answers 408 and closes. (A
  connection that sends nothing is closed by aiohttp's keep-alive timeout.)
- **Errors aiohttp answers itself** (a bad request line, a 64 KB header, 1,000
  headers, a bad Content-Length, ...) get a JSON 4xx instead of `text/plain`, and at
  most one WARNING line per `LOG_INTERVAL` seconds, without a traceback. A client that
  disconnects is not an error.
- **A connection cap.** At `max_connections` open connections a new one first closes
  the oldest idle one (no request pending: an idle keep-alive connection, or one that
  sent nothing yet); when every connection is busy the new one is answered 503 and
  closed, counted in `pdp_http_connections_rejected_total` and logged (rate-limited).
  So `/healthz` stays answerable while idle sockets pile up, and the process never
  runs out of file descriptors on accept.

- **Drain.** After `EdgeServer.drain()` every answer carries `Connection: close`.

`EdgeRunner` is `web.AppRunner` with these in place; the app's own error mapping
(`pdp.web.app`) is unchanged. aiohttp's automatic request decompression is off
(`build_app` sets `auto_decompress=False`): compressed bodies are refused with 415.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from pdp.errors import RequestReadTimeout
from pdp.metrics import Metrics
from pdp.protocol import error_body

log = logging.getLogger(__name__)

LOG_INTERVAL = 10.0  # seconds between two WARNING lines of one kind
UNPARSED = "unparsed"  # the route label of requests aiohttp refused before any route
_FD_RESERVE_MIN = 32  # descriptors kept for PostgreSQL, logs, files
# An app's hot routes, served without the router (`EdgeServer._dispatch`): exact path ->
# its POST handler; and (path, its handler, the handler of the paths under it), any
# method (forward-auth's two routes).
DIRECT: web.AppKey[dict[str, Handler]] = web.AppKey("direct_routes")
DIRECT_PREFIX: web.AppKey[tuple[str, Handler, Handler]] = web.AppKey("direct_prefix")


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    read_timeout: float  # seconds for a whole request (line, headers, body)
    max_connections: int


class Throttled:
    """A logger that emits a line at most once per `interval`, counting those it skipped."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL) -> None:
        self._logger = logger
        self._interval = interval
        self._next: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next.get(kind, 0.0):
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return
        self._next[kind] = now + self._interval
        skipped = self._skipped.pop(kind, 0)
        if skipped:
            message += f" (and {skipped} more since the last such line)"
        self._logger.warning(message, *args)


def raise_file_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (logged); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # e.g. an unlimited hard limit on macOS
            log.warning("open-file limit stays %d (hard %d): %s", soft, hard, exc)
            return soft
        log.info("open-file limit raised from %d to the hard limit %d", soft, hard)
        return hard
    log.info("open-file limit %d (soft = hard)", soft)
    return soft


def default_max_connections(file_limit: int) -> int:
    """Connections allowed under `file_limit` descriptors, leaving some for the rest."""
    reserve = max(_FD_RESERVE_MIN, file_limit // 10)
    return max(1, file_limit - reserve)


def _raw_response(status: int, reason: str, error: str, message: str) -> bytes:
    body = error_body(error, message)
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


_CAP_REFUSAL = _raw_response(
    503, "Service Unavailable", "unavailable", "too many open connections; retry"
)
_HEADER_TIMEOUT = _raw_response(
    408, "Request Timeout", "request_timeout", "the request line and headers did not arrive in time"
)


class EdgeHandler(RequestHandler):
    """One connection: aiohttp's handler plus the read deadline and idleness."""

    __slots__ = ("_body", "_due", "_edge", "_phase", "_timer")

    def __init__(self, edge: EdgeServer, **kwargs: Any) -> None:
        super().__init__(edge, **kwargs)
        self._edge = edge
        # The read deadline: `_due` is when the request being read must be whole (None:
        # none pending). One timer per connection checks it and re-arms itself when a
        # later request moved the deadline, instead of a timer made and cancelled per
        # request (a keep-alive connection's requests then cost a float store each).
        self._due: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._phase = "idle"  # idle -> headers -> body -> handling (-> headers ...)
        self._body: Any = None  # the payload being read in phase "body"

    @property
    def idle(self) -> bool:
        """No request pending: nothing received since the last answer, or ever."""
        return self._between() and not self._messages

    def _between(self) -> bool:
        """Between requests: none read yet, or the last one answered (aiohttp's loop
        then waits for the next message; phase "handling" lasts until new bytes come)."""
        phase = self._phase
        return phase == "idle" or (phase == "handling" and self._waiter is not None)

    def data_received(self, data: bytes) -> None:
        if data and (self._phase == "idle" or self._between()):
            self._phase = "headers"
            self._arm()
        before = self._request_count
        super().data_received(data)
        if self._request_count != before and self._phase == "headers" and self._messages:
            payload = self._messages[-1][1]
            if payload.is_eof():
                self._handling()
            else:
                self._phase, self._body = "body", payload
                payload.on_eof(self._handling)

    def _arm(self) -> None:
        due = self._loop.time() + self._edge.limits.read_timeout
        self._due = due
        if self._timer is None:
            self._timer = self._loop.call_at(due, self._late)

    def _disarm(self) -> None:
        self._due = None  # the timer, if it fires, finds nothing pending

    def _stop_timer(self) -> None:
        self._due = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _handling(self) -> None:
        if self._phase in ("headers", "body"):
            self._phase, self._body = "handling", None
            self._disarm()

    def _late(self) -> None:
        self._timer = None
        due = self._due
        if due is None:  # the request was whole in time; the next one arms again
            return
        if self._loop.time() < due:  # a later request's deadline: wait for it
            self._timer = self._loop.call_at(due, self._late)
            return
        self._due = None
        limit = self._edge.limits.read_timeout
        if self._phase == "headers" and self.transport is not None:
            self._edge.throttled.warning(
                "read_timeout", "request headers not received within %gs: closed", limit
            )
            self._edge.count(408)
            self.transport.write(_HEADER_TIMEOUT)
            self.force_close()
        elif self._phase == "body" and self._body is not None:
            self._edge.throttled.warning(
                "read_timeout", "request body not received within %gs: answered 408", limit
            )
            if self._current_request is not None:
                self._lingering_time = 0.0  # closed after the 408: read no more of it
                self._body.set_exception(
                    RequestReadTimeout(f"the request body did not arrive within {limit:g} s")
                )
            else:  # answered already (the handler did not read the body): just close
                self.force_close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._edge.admit(self, transport):
            super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_timer()
        self._edge.forget(self)
        super().connection_lost(exc)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> StreamResponse:
        """A JSON answer for what aiohttp refuses itself; one throttled line, no traceback.

        A 500 here is an error escaping a handler (every route has pdp's guard, so this is
        a bug): logged with its traceback, as aiohttp does.
        """
        if request.writer.output_size > 0:  # a response was sent already
            raise ConnectionError("response already sent")
        if status >= 500:
            self.logger.error("error handling a request", exc_info=exc)
            text, error = "internal error", "internal"
        else:
            text = _shorten(message or getattr(exc, "message", None) or str(exc or "bad request"))
            error = "bad_request" if status == 400 else "http_error"
            self._edge.throttled.warning(
                "bad_request", "refused a malformed request with %d: %s", status, text
            )
        self._edge.count(status)
        response = web.Response(
            status=status, body=error_body(error, text), content_type="application/json"
        )
        response.force_close()
        return response


def _shorten(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def _closing(answer: Awaitable[StreamResponse]) -> StreamResponse:
    """The answer, closing its connection: the process is about to stop and clients
    should move elsewhere (`EdgeServer.drain`)."""
    response = await answer
    response.force_close()
    return response


class EdgeServer(web.Server):
    """aiohttp's server making `EdgeHandler`s, holding the connection cap."""

    def __init__(
        self,
        plain: web.Server,
        limits: EdgeLimits,
        metrics: Metrics,
        direct: dict[str, Handler] | None = None,
        prefix: tuple[str, Handler, Handler] | None = None,
        **kwargs: Any,
    ) -> None:
        self._routed = plain.request_handler
        self._direct = direct or {}
        # A path no request has (NUL) when there is no prefix route.
        self._prefix, self._at, self._under = prefix or ("\0", self._routed, self._routed)
        self._prefix_dir = self._prefix + "/"
        super().__init__(
            self._dispatch,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **kwargs,
        )
        self.limits = limits
        self.metrics = metrics
        self.throttled = Throttled(log)
        self.draining = False  # answers carry Connection: close once set (`drain`)
        self._live: dict[EdgeHandler, None] = {}  # insertion order: oldest first

    def __call__(self) -> RequestHandler:
        return EdgeHandler(self, loop=self._loop, **self._kwargs)

    def _dispatch(self, request: BaseRequest) -> Awaitable[StreamResponse]:
        """Every request's handler: a POST to a path of `direct` (exactly: no query
        string, no other spelling), or any request to `prefix` or a path under it, goes
        straight to its handler; anything else, and anything with Expect, through
        aiohttp's router (`Application._handle`, which also answers Expect:
        100-continue). After `drain` the answer closes its connection.

        The router's resolve, match-info bookkeeping and their coroutines cost ~16,000
        of the ~265,000 instructions of a whole check request (callgrind; README,
        Benchmarks). Not a coroutine itself: it hands aiohttp the handler's. A direct
        handler is the very one the router holds (guard, API key
        and all), so the answer is the same either way; `request.match_info` is simply
        not filled in, which those handlers never read.
        """
        path = request.raw_path
        handler = self._direct.get(path)
        if handler is not None and request.method != "POST":
            handler = None
        elif handler is None:
            if path.startswith(self._prefix_dir):
                handler = self._under
            elif path == self._prefix:
                handler = self._at
        if handler is None or hdrs.EXPECT in request.headers:
            answer = self._routed(request)
        else:
            answer = handler(cast(web.Request, request))
        # The handler's own coroutine, not one more around it (a frame per request),
        # but after `drain`.
        return _closing(answer) if self.draining else answer

    def admit(self, handler: EdgeHandler, transport: asyncio.BaseTransport) -> bool:
        """Room for one more connection (closing the oldest idle one if need be), else
        answer 503, close it, count and log the refusal."""
        if len(self._live) >= self.limits.max_connections and not self._evict_idle():
            self.metrics.connection_rejected()
            self.throttled.warning(
                "cap",
                "refused a connection: %d open, all busy (PDP_MAX_CONNECTIONS)",
                len(self._live),
            )
            writable = cast(asyncio.WriteTransport, transport)  # uvloop's is no subclass
            writable.write(_CAP_REFUSAL)
            writable.close()
            return False
        self._live[handler] = None
        return True

    def _evict_idle(self) -> bool:
        for handler in self._live:
            if handler.idle:
                del self._live[handler]
                handler.force_close()
                return True
        return False

    def drain(self) -> None:
        """From now on every answer closes its connection (`Connection: close`), so a
        client's pool reconnects elsewhere before the listener closes."""
        self.draining = True

    def forget(self, handler: EdgeHandler) -> None:
        self._live.pop(handler, None)

    def count(self, status: int) -> None:
        self.metrics.http_request(UNPARSED, status)


class EdgeRunner(web.AppRunner):
    """`web.AppRunner` serving through `EdgeServer` (its other arguments as aiohttp's)."""

    def __init__(
        self, app: web.Application, limits: EdgeLimits, metrics: Metrics, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self._edge = (limits, metrics)

    async def _make_server(self) -> web.Server:
        # aiohttp's own server (app startup, frozen app) with its handler arguments,
        # rebuilt as an EdgeServer: aiohttp has no public hook for the handler class.
        plain = await super()._make_server()
        # aiohttp runs `on_response_prepare` only for routed requests: an app with such
        # a signal is served through the router alone.
        app = self.app
        if app.on_response_prepare:
            return EdgeServer(plain, *self._edge, **plain._kwargs)
        return EdgeServer(
            plain, *self._edge, app.get(DIRECT), app.get(DIRECT_PREFIX), **plain._kwargs
        )
