"""The composition root: the one place that wires sync, the replica, workers and the web app.

`sidecar_app` builds the whole sidecar for one database; `serve` runs it as the
`pdp serve` process, the only code that owns the event loop and the signals
(`pdp.sidecar_workers` reuses `serve_app` and the builders here for `--workers
N`). Besides the CLI and `pdp.sidecar_workers` this is the only pdp module that
imports `sync` (import-linter holds it). Workers run under one `Supervisor` inside
the app's cleanup context: they start before the first request is served and stop,
in reverse order, after the last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from ssl import SSLContext

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from pdp.config import Settings, redact_url
from pdp.decision_log import DecisionLog, StdoutSink
from pdp.errors import ConfigError, PdpError
from pdp.http_edge import (
    EdgeLimits,
    EdgeRunner,
    EdgeServer,
    default_max_connections,
    raise_file_limit,
)
from pdp.metrics import Metrics, RelayMetrics
from pdp.pg.embedded import database_url
from pdp.readiness import Health
from pdp.replica import Replica
from pdp.supervisor import Supervisor
from pdp.web.api_keys import ApiKeys
from pdp.web.app import GATEWAY, HEALTH, METRICS, CleanupContext, build_app
from pdp.web.forward_auth import Gateway, RouteBox, gateway_from_settings, load_routes
from pdp.web.tls import server_context
from sync.file_snapshot import SnapshotFile
from sync.options import RelayOptions, SyncOptions
from sync.pg_decision_log import PgDecisionLog
from sync.pg_fallback import PgFallback
from sync.pg_verifier import PgVerifier
from sync.redis_follower import RedisFollower
from sync.relay import Relay
from sync.service import SyncService
from sync.user_cache import UserLoader

log = logging.getLogger(__name__)

SHUTDOWN_SECONDS = 5.0  # after the drain: how long requests in flight may still take
SYNC_WORKER = "sync"
VERIFIER_WORKER = "verifier"
DECISION_LOG_WORKER = "decision_log"


def sync_options(settings: Settings) -> SyncOptions:
    return SyncOptions(
        poll_interval=settings.poll_interval_seconds,
        heartbeat=settings.heartbeat_seconds,
        on_demand=settings.cache_mode == "on_demand",
        load_processes=settings.load_processes or default_load_processes(),
    )


def default_load_processes() -> int:
    """The CPUs this process may run on (its affinity, as a container's cpuset sets
    it), at most 4: past that, the parent's share (absorbing the parts) dominates."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def sidecar_app(
    settings: Settings, url: str, *, restart_backoff: tuple[float, float] = (1.0, 30.0)
) -> web.Application:
    """The whole sidecar for the database at `url`: sync, verifier, fallback, API.

    `restart_backoff`: (first, longest) delay before a crashed worker restarts.
    Raises ConfigError for a bad route table or JWKS file (read here, at start).
    """
    gateway = gateway_from_settings(settings)
    replica = Replica()
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    supervisor = Supervisor(
        metrics, backoff_initial=restart_backoff[0], backoff_max=restart_backoff[1]
    )
    if settings.sync_source == "redis":
        # Relay mode: the replica follows the relay's stream; PostgreSQL is read only to
        # bootstrap when Redis holds no usable snapshot, and by the SQL fallback. The
        # verifier needs a catch-up of its own to share a snapshot: off in this mode.
        assert settings.redis_url is not None  # Settings holds it
        follower = RedisFollower(
            settings.redis_url, url, replica, metrics, sync_options(settings),
            settings.redis_stream,
        )  # fmt: skip
        supervisor.add(SYNC_WORKER, follower.lifespan, critical=True)
    else:
        service = SyncService(
            url, replica, metrics, sync_options(settings),
            snapshot_file=snapshot_file_for(settings, metrics),
            read_url=settings.read_database_url,
        )  # fmt: skip
        supervisor.add(SYNC_WORKER, service.lifespan, critical=True)
        if settings.cache_mode == "full":
            # The verifier imports the catch-up's exported snapshot: from the same server.
            # In on-demand mode the engine holds a subset of the rows: no digest to match.
            verifier = PgVerifier(
                settings.read_database_url or url, service.sync, metrics,
                settings.verify_interval_seconds,
            )  # fmt: skip
            supervisor.add(VERIFIER_WORKER, verifier.lifespan)
    loader = None
    if settings.cache_mode == "on_demand":
        # Users' rows are read from the primary: always at least as new as the replica.
        loader = UserLoader(
            url, replica, metrics, size=settings.cache_users, ttl=settings.cache_ttl_seconds
        )
        replica.users = loader
    api_keys = None if settings.api_keys_file is None else ApiKeys.load(settings.api_keys_file)
    return api_app(
        settings, url, replica, registry, metrics, supervisor,
        api_keys=api_keys, gateway=gateway, loader=loader,
    )  # fmt: skip


def api_app(  # noqa: PLR0917 -- what the composition root assembled
    settings: Settings,
    url: str,
    replica: Replica,
    registry: CollectorRegistry,
    metrics: Metrics,
    supervisor: Supervisor,
    *,
    api_keys: ApiKeys | None,
    gateway: Gateway | None,
    loader: UserLoader | None = None,
    scrape: Callable[[], Awaitable[bytes]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Application:
    """The check API over `replica`, with its SQL fallback and decision log (writer added
    to `supervisor`); the app's cleanup runs them and the supervisor's workers. `headers`
    are set on every answer (`build_app`)."""
    fallback = PgFallback(url)
    decision_log = decision_log_for(settings, url, metrics, supervisor)
    return build_app(
        settings,
        replica=replica,
        registry=registry,
        metrics=metrics,
        health=Health(replica, settings.max_staleness_seconds, lambda: supervisor.down),
        fallback=fallback,
        api_keys=api_keys,
        gateway=gateway,
        decision_log=decision_log,
        cleanup=[workers_context(fallback, supervisor, loader)],
        scrape=scrape,
        headers=headers,
    )


def snapshot_file_for(settings: Settings, metrics: Metrics) -> SnapshotFile | None:
    if settings.snapshot_file is None:
        return None
    return SnapshotFile(
        settings.snapshot_file, settings.snapshot_file_interval_seconds,
        settings.snapshot_file_max_age_seconds, metrics,
    )  # fmt: skip


def decision_log_for(
    settings: Settings, url: str, metrics: Metrics, supervisor: Supervisor
) -> DecisionLog | None:
    """The decision log as PDP_DECISION_LOG says, its writer added to `supervisor` (not
    critical: checks go on, and entries are dropped and counted, while it is down)."""
    if settings.decision_log == "off":
        return None
    decision_log = DecisionLog.from_settings(settings, metrics)
    if settings.decision_log == "postgres":
        sink = PgDecisionLog(url, settings.decision_log_retention_seconds).opened
    else:
        sink = StdoutSink(shared=settings.workers > 1).opened
    supervisor.add(DECISION_LOG_WORKER, decision_log.lifespan(sink))
    return decision_log


def workers_context(
    fallback: PgFallback, supervisor: Supervisor, loader: UserLoader | None = None
) -> CleanupContext:
    async def cleanup(_app: web.Application) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if loader is not None:
                await stack.enter_async_context(loader.running())
            await stack.enter_async_context(fallback.running())
            await stack.enter_async_context(supervisor.running())
            yield

    return cleanup


def warn_if_open(settings: Settings) -> None:
    loopback = settings.host in ("127.0.0.1", "::1", "localhost")
    if not loopback and settings.api_keys_file is None and settings.tls_client_ca_file is None:
        log.warning(
            "the check API listens on %s with no client authentication: anyone who reaches "
            "the port can ask; set PDP_API_KEYS_FILE or PDP_TLS_CLIENT_CA_FILE",
            settings.host,
        )


def reload_routes_on_sighup(app: web.Application) -> None:
    """On SIGHUP, read PDP_ROUTES again and swap the table in (the old one stays if bad).

    The file is read and compiled in a worker thread; the swap is one assignment, so
    requests in flight finish with the table they started with and none is dropped.
    """
    gateway = app[GATEWAY]
    if gateway is None or gateway.routes.path is None:
        return
    box = gateway.routes

    async def install(_app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task[None]] = set()

        def on_signal() -> None:
            task = loop.create_task(_reload_routes(box))
            pending.add(task)
            task.add_done_callback(pending.discard)

        loop.add_signal_handler(signal.SIGHUP, on_signal)
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGHUP)

    app.cleanup_ctx.append(install)


async def _reload_routes(box: RouteBox) -> None:
    assert box.path is not None
    try:
        table = await asyncio.to_thread(load_routes, box.path)
    except ConfigError as exc:
        log.error("route table not reloaded, the old one stays in force: %s", exc)
        return
    box.table = table  # on the loop: a request sees the old table or the new one
    log.info("route table reloaded from %s: %d entries", box.path, len(table))


# CPython's GIL hand-off interval, shorter than its 5 ms default. While a worker thread
# builds (a reload, a tenant replaced whole, the snapshot file's image), the event loop
# waits up to this long for the GIL each time it gave it up (a socket wait, a send): at
# 5 ms checks answered during a tenant reload in p50 10 / p99 112 ms, at 1 ms in 3.7 /
# 28 ms (`loadtests/bench_tenant_reload.py`, 100,000 users). With no other thread
# running nothing switches, so the hot path is unchanged.
SWITCH_INTERVAL = 0.001


def event_loop_policy() -> None:
    """The serving process's runtime: uvloop when installed, the short GIL interval."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        import uvloop  # noqa: PLC0415  (optional: the `fast` extra)
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def serve(settings: Settings) -> int:
    """Run the sidecar until SIGINT/SIGTERM, then drain (`PDP_DRAIN_SECONDS`) and stop.

    Raises PdpError "cannot listen on HOST:PORT: reason" when the address cannot be bound.
    """
    event_loop_policy()
    ssl_context = server_context(settings)  # bad files fail here, before anything starts
    warn_if_open(settings)
    max_connections = settings.max_connections or default_max_connections(raise_file_limit())
    limits = EdgeLimits(settings.request_read_timeout_seconds, max_connections)
    with database_url(settings) as url:
        app = sidecar_app(settings, url)
        reload_routes_on_sighup(app)
        asyncio.run(serve_app(app, settings, ssl_context, limits))
    return 0


def edge_runner(app: web.Application, settings: Settings, limits: EdgeLimits) -> EdgeRunner:
    """The runner `pdp serve` serves `app` with: pdp's HTTP edge under `limits`, the
    keep-alive and read timeouts of `settings` (benchmarks measure through it too)."""
    return EdgeRunner(
        app, limits, app[METRICS],
        access_log=None,
        keepalive_timeout=settings.keepalive_timeout_seconds,
        lingering_time=settings.request_read_timeout_seconds,
        shutdown_timeout=SHUTDOWN_SECONDS,
    )  # fmt: skip


async def serve_app(
    app: web.Application,
    settings: Settings,
    ssl_context: SSLContext | None,
    limits: EdgeLimits,
    *,
    sock: socket.socket | None = None,
    stop: asyncio.Queue[str] | None = None,
    serving: Callable[[], None] | None = None,
) -> None:
    """Serve `app` until a stop: a signal's name (drain `settings.drain_seconds`), or any
    other reason put in `stop` (no drain: stop accepting, finish what is in flight).

    `sock`: a listening socket to serve on instead of binding PDP_HOST:PDP_PORT (a
    worker of `pdp.sidecar_workers`); `serving` is called once requests are accepted.
    """
    runner = edge_runner(app, settings, limits)
    stop = stop_signals(stop)
    try:
        if not await _set_up(runner, stop):
            return
        site: web.BaseSite
        if sock is not None:
            site = web.SockSite(runner, sock, ssl_context=ssl_context)
        else:
            # Gateways open many connections at once; aiohttp's default queue is 128.
            site = web.TCPSite(
                runner, settings.host, settings.port, ssl_context=ssl_context,
                backlog=settings.backlog,
            )  # fmt: skip
        try:
            await site.start()
        except OSError as exc:
            where = f"{settings.host}:{settings.port}"
            raise PdpError(f"cannot listen on {where}: {listen_reason(exc)}") from None
        scheme = "https" if ssl_context is not None else "http"
        log.info(
            "serving the check API on %s://%s:%d (at most %d connections)",
            scheme, settings.host, _bound_port(runner, settings.port), limits.max_connections,
        )  # fmt: skip
        if serving is not None:
            serving()
        signame = await stop.get()
        drain = settings.drain_seconds if signame in STOP_SIGNALS else 0.0
        await _drain(app, runner, stop, signame, drain)
    finally:
        await runner.cleanup()


async def _set_up(runner: web.AppRunner, stop: asyncio.Queue[str]) -> bool:
    """Start the app (its workers) unless a stop signal comes first (then False)."""
    setup = asyncio.ensure_future(runner.setup())
    signalled = asyncio.ensure_future(stop.get())
    await asyncio.wait({setup, signalled}, return_when=asyncio.FIRST_COMPLETED)
    if setup.done():
        signalled.cancel()
        setup.result()  # raises what the start raised
        return True
    setup.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await setup
    log.info("%s before the sidecar had started: stopping", signalled.result())
    return False


STOP_SIGNALS = ("SIGTERM", "SIGINT")


def stop_signals(queue: asyncio.Queue[str] | None = None) -> asyncio.Queue[str]:
    """A queue (`queue`, or a new one) that receives the name of each SIGTERM/SIGINT
    from now on."""
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue() if queue is None else queue
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, queue.put_nowait, sig.name)
    return queue


async def _drain(
    app: web.Application, runner: web.AppRunner, stop: asyncio.Queue[str], signame: str,
    seconds: float,
) -> None:  # fmt: skip
    """Not ready from now on; keep serving `seconds` (a second signal cuts it short),
    each answer closing its connection so that clients' pools reconnect elsewhere."""
    app[HEALTH].drain()
    if isinstance(runner.server, EdgeServer):
        runner.server.drain()
    log.info(
        "%s: draining: /readyz answers 503, requests are served for %gs more, "
        "then those in flight finish and pdp exits",
        signame, seconds,
    )  # fmt: skip
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.get(), seconds)


def listen_reason(exc: OSError) -> str:
    """`exc` in a few words ("address already in use"); asyncio wraps the bind error's
    text in its own sentence, which names the address again."""
    if isinstance(exc, socket.gaierror) or not exc.errno or exc.errno < 0:
        return str(exc.strerror or exc)
    return os.strerror(exc.errno).lower()


def _bound_port(runner: web.AppRunner, asked: int) -> int:
    for address in runner.addresses:
        return int(address[1])
    return asked


# --- pdp relay ------------------------------------------------------------------------


def relay(settings: Settings) -> int:
    """Run the relay (`sync.relay`) until SIGINT/SIGTERM; /metrics and /healthz on
    PDP_HOST:PDP_RELAY_PORT. Raises PdpError when Redis or the port is unusable."""
    if settings.redis_url is None:
        raise ConfigError("pdp relay needs PDP_REDIS_URL (where it publishes)")
    if settings.read_database_url is not None:
        # Its entries say when their data was proven current; from a standby that
        # needs the primary-snapshot proof of direct mode, which the relay lacks.
        raise ConfigError(
            "pdp relay reads the primary (PDP_DATABASE_URL) only: unset PDP_READ_DATABASE_URL"
        )
    event_loop_policy()
    with database_url(settings) as url:
        asyncio.run(_relay(settings, url, settings.redis_url))
    return 0


async def _relay(settings: Settings, url: str, redis_url: str) -> None:
    registry = CollectorRegistry()
    metrics = RelayMetrics(registry)
    options = RelayOptions(
        stream=settings.redis_stream,
        maxlen=settings.relay_stream_maxlen,
        snapshot_interval=settings.relay_snapshot_interval_seconds,
        verify_interval=settings.verify_interval_seconds,
    )
    worker = Relay(url, redis_url, metrics, sync_options(settings), options)
    supervisor = Supervisor(metrics)
    supervisor.add("relay", worker.lifespan, critical=True)
    runner = web.AppRunner(_relay_app(registry, worker, supervisor), access_log=None)
    await runner.setup()
    stop = stop_signals()
    try:
        site = web.TCPSite(runner, settings.host, settings.relay_port)
        try:
            await site.start()
        except OSError as exc:
            where = f"{settings.host}:{settings.relay_port}"
            raise PdpError(f"cannot listen on {where}: {listen_reason(exc)}") from None
        async with supervisor.running():  # Redis not answering: DependencyError
            log.info(
                "relay %s: PostgreSQL -> %s stream %r; metrics on http://%s:%d/metrics",
                worker.name, redact_url(redis_url), options.stream, settings.host,
                _bound_port(runner, settings.relay_port),
            )  # fmt: skip
            signame = await stop.get()
            log.info("%s: the relay stops (its lock is released)", signame)
    finally:
        await runner.cleanup()


def _relay_app(
    registry: CollectorRegistry, worker: Relay, supervisor: Supervisor
) -> web.Application:
    async def metrics_page(_request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        up = not supervisor.down
        state = {"status": "ok" if up else "down", "leader": worker.leading.is_set()}
        return web.json_response(state, status=200 if up else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/healthz", healthz)
    return app
