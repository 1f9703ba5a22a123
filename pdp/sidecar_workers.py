"""`pdp serve --workers N`: N processes answer checks on one port, one process syncs.

The owner (the process `pdp serve` started) runs the sync exactly as one sidecar does
(`sync.service.SyncService`: LISTEN, catch-ups, the verifier, the snapshot file) but
serves no checks. Once the first snapshot is in, it forks N workers (`gc.collect();
gc.freeze()` first, so the collector never writes to the engine's pages and they stay
shared copy-on-write). Each worker binds its own listening socket with SO_REUSEPORT on
the owner's address, so the kernel spreads connections over them; the owner holds the
address bound (not listening) from the start, which also resolves port 0 once.

Every batch the owner's catch-up reads is shipped, before the owner applies it, to
every worker over its Unix socketpair (`sync.worker_channel`, the relay's entry
encoding and continuity check) and applied there in the same order. So every worker
stands at the owner's revision or one batch behind, for as long as a frame takes to
cross: staleness, readiness and X-PDP-Min-Revision hold per worker, each waiting on
its own replica (a worker's wake is forwarded to the owner's catch-up loop).

A full reload (epoch change, purge horizon, TRUNCATE, too many keys) is not shipped:
the owner forks a new generation of workers from its new state (pages shared again)
and, once they serve, closes the old ones' channels; an old worker then stops
accepting, finishes what it has in flight and exits. Connections still in a closed
socket's accept queue are reset by the kernel (Linux SO_REUSEPORT), as at any restart.

Supervision: a worker that exits unasked (crash, kill, broken chain) is logged,
counted (`pdp_worker_restarts_total{worker="http"}`) and forked again, after a capped
backoff, from the owner's current state. SIGTERM/SIGINT to the owner is passed to
every worker: each drains (PDP_DRAIN_SECONDS, /readyz 503) while still following the
owner's batches; the owner exits 0 once all have exited. A worker dies with its
owner (PR_SET_PDEATHSIG SIGKILL) and leaves at once when its channel reaches end of
file, so no worker outlives the owner.

Responses carry `X-PDP-Worker: <slot>`. Metrics: each process keeps its own registry;
a scrape of /metrics on any worker returns every process's series (the owner's sync
metrics and each worker's), each sample labelled `process` ("owner", "1".."N"), read
over private Unix sockets in a temporary directory at scrape time. The decision log
has one writer per worker: each record is written once, by the worker that decided.

Not with PDP_CACHE_MODE=on_demand or PDP_SYNC_SOURCE=redis (`pdp.config` refuses).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
import socket
import sys
import tempfile
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from ssl import SSLContext

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from pdp import sidecar
from pdp.backoff import Backoff
from pdp.config import Settings
from pdp.engine import Engine
from pdp.errors import PdpError
from pdp.http_edge import EdgeLimits, default_max_connections, raise_file_limit
from pdp.metrics import Metrics, merge_expositions
from pdp.pg.embedded import database_url
from pdp.readiness import Health
from pdp.replica import Replica
from pdp.supervisor import Supervisor
from pdp.web.api_keys import ApiKeys
from pdp.web.app import build_app
from pdp.web.forward_auth import Gateway, gateway_from_settings
from pdp.web.tls import server_context
from sync import worker_channel
from sync.pg_fallback import PgFallback
from sync.pg_verifier import PgVerifier
from sync.service import SyncService
from sync.worker_channel import Follower, Link, Publisher

log = logging.getLogger(__name__)

WORKER_HEADER = "X-PDP-Worker"
HTTP_WORKER = "http"  # the `worker` label of a worker process's restarts
READY_TIMEOUT = 60.0  # a new generation's worker not serving within this is replaced
SCRAPE_TIMEOUT = 2.0  # seconds to read a sibling's metrics at scrape time
EXIT_BROKEN = 3  # a worker whose chain broke exits with this code
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class Loaded:
    """What the workers need read from files, read once by the owner at start (so a bad
    file fails `pdp serve` with ConfigError before any fork); each worker gets a copy."""

    ssl_context: SSLContext | None
    gateway: Gateway | None
    api_keys: ApiKeys | None

    @classmethod
    def read(cls, settings: Settings) -> Loaded:
        api_keys = None if settings.api_keys_file is None else ApiKeys.load(settings.api_keys_file)
        return cls(server_context(settings), gateway_from_settings(settings), api_keys)


def serve_workers(settings: Settings) -> int:
    """Run the owner and `settings.workers` workers until SIGTERM/SIGINT; 0 when clean."""
    loaded = Loaded.read(settings)
    sidecar.warn_if_open(settings)
    with database_url(settings) as url, tempfile.TemporaryDirectory(prefix="pdp-") as run_dir:
        owner = Owner(settings, url, loaded, Path(run_dir))
        asyncio.run(owner.run())
    return 0


# --- addresses ------------------------------------------------------------------------


def _address(host: str, port: int) -> tuple[socket.AddressFamily, tuple[str, int]]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _type, _proto, _name, address = infos[0]
    return family, (str(address[0]), int(address[1]))


def reuseport_socket(family: socket.AddressFamily, address: tuple[str, int]) -> socket.socket:
    """A TCP socket bound to `address` with SO_REUSEPORT (every worker binds its own)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


# --- the owner ------------------------------------------------------------------------


@dataclass(slots=True)
class _Child:
    slot: int
    pid: int
    link: Link
    generation: int
    ready: asyncio.Future[None]
    exited: asyncio.Future[int]
    retiring: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class Owner:
    """Syncs, forks and supervises the workers; serves no checks itself."""

    def __init__(self, settings: Settings, url: str, loaded: Loaded, run_dir: Path) -> None:
        self.settings = settings
        self.url = url
        self.loaded = loaded
        self.run_dir = run_dir
        self.replica = Replica()
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.publisher = Publisher(self.replica)
        self.children: dict[int, _Child] = {}  # by pid
        self.generation = 0
        self.stopping = False
        self._backoff = {slot: Backoff(1.0, 30.0) for slot in range(1, settings.workers + 1)}
        self._pending: set[asyncio.Task[None]] = set()
        self._family: socket.AddressFamily = socket.AF_INET
        self.address: tuple[str, int] = ("", 0)

    def _supervisor(self) -> tuple[Supervisor, SyncService]:
        settings = self.settings
        supervisor = Supervisor(self.metrics)
        service = SyncService(
            self.url, self.replica, self.metrics, sidecar.sync_options(settings),
            sink=self.publisher.sink,
            snapshot_file=sidecar.snapshot_file_for(settings, self.metrics),
            read_url=settings.read_database_url,
        )  # fmt: skip
        supervisor.add(sidecar.SYNC_WORKER, service.lifespan, critical=True)
        verifier = PgVerifier(
            settings.read_database_url or self.url, service.sync, self.metrics,
            settings.verify_interval_seconds,
        )  # fmt: skip
        supervisor.add(sidecar.VERIFIER_WORKER, verifier.lifespan)
        # The owner's own series (process="owner"): its replica is the one forked from.
        self.metrics.watch(
            Health(self.replica, settings.max_staleness_seconds, lambda: supervisor.down)
        )
        return supervisor, service

    async def run(self) -> None:
        settings = self.settings
        try:
            self._family, wanted = _address(settings.host, settings.port)
            reserve = reuseport_socket(self._family, wanted)
        except OSError as exc:
            where = f"{settings.host}:{settings.port}"
            raise PdpError(f"cannot listen on {where}: {sidecar.listen_reason(exc)}") from None
        self.address = reserve.getsockname()[:2]
        stop = sidecar.stop_signals()
        supervisor, _service = self._supervisor()
        metrics_site = await _serve_registry(self.registry, self.run_dir / "owner.sock")
        try:
            async with supervisor.running():
                log.info(
                    "pdp serve: owner %d syncs; %d workers will serve on %s:%d",
                    os.getpid(), settings.workers, *self.address,
                )  # fmt: skip
                signame = await self._main(stop)
                log.info("%s: stopping the %d workers", signame, len(self.children))
                await self._stop_all(signame)
        finally:
            await metrics_site.cleanup()
            reserve.close()

    async def _main(self, stop: asyncio.Queue[str]) -> str:
        """Fork and re-fork workers until a stop signal; its name."""
        generations = asyncio.ensure_future(self._generations())
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._signal_all, signal.SIGHUP)
        try:
            signame = await stop.get()
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
            self.stopping = True
            generations.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await generations
        return signame

    async def _generations(self) -> None:
        """A generation of workers whenever the owner's engine is replaced: the first
        load, then each full reload (the sink stopped shipping to the old one)."""
        engine = None
        while True:
            while self.replica.engine is engine:
                await self.replica.advanced()
            engine = self.replica.engine
            self.publisher.reloaded.clear()
            await self._new_generation()

    def _signal_all(self, sig: signal.Signals) -> None:
        """SIGHUP (reload the route table) goes to every worker: each holds its own.
        Without PDP_ROUTES there is nothing to reload (and a worker has no handler)."""
        if self.settings.routes_path is None:
            log.info("%s: no route table (PDP_ROUTES) to reload; ignored", sig.name)
            return
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    async def _new_generation(self) -> None:
        self.generation += 1
        old = [c for c in self.children.values() if c.generation < self.generation]
        fresh = [await self._fork(slot) for slot in range(1, self.settings.workers + 1)]
        log.info(
            "generation %d: workers %s forked at %s",
            self.generation, [c.pid for c in fresh], self.replica.revision,
        )  # fmt: skip
        if old:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(READY_TIMEOUT):
                    await asyncio.gather(*(c.ready for c in fresh), return_exceptions=True)
            for child in old:
                child.retiring = True
                child.link.close()  # end of file: the worker stops accepting and exits

    async def _fork(self, slot: int) -> _Child:
        """Fork a worker for `slot` from the owner's current state. No await between the
        fork and the link joining the publisher, so no batch can pass in between."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        gc.collect()
        gc.freeze()
        sys.stdout.flush()  # what the owner's buffers hold is not the child's to write too
        sys.stderr.flush()
        owner_pid = os.getpid()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12)
            pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _worker_process(self, slot, theirs, owner_pid)
            except BaseException:
                log.exception("worker %d failed", slot)
            finally:
                os._exit(code)
        theirs.close()
        link = Link(f"{slot} (pid {pid})", reader, writer)
        self.publisher.attach(link)
        child = _Child(slot, pid, link, self.generation, loop.create_future(), loop.create_future())
        self.children[pid] = child
        self._watch(child)
        return child

    def _watch(self, child: _Child) -> None:
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(child.pid)

        def reaped() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            _, status = os.waitpid(child.pid, 0)
            if not child.exited.done():
                child.exited.set_result(os.waitstatus_to_exitcode(status))
            self._exited(child)

        loop.add_reader(pidfd, reaped)
        task = loop.create_task(self._upstream(child))
        child.tasks.add(task)
        task.add_done_callback(child.tasks.discard)

    async def _upstream(self, child: _Child) -> None:
        """What the worker says: READY once, WAKE when it wants a catch-up now."""
        reader = child.link.reader
        with contextlib.suppress(OSError):
            while signal_ := await reader.read(64):
                if worker_channel.READY in signal_ and not child.ready.done():
                    child.ready.set_result(None)
                    self._backoff[child.slot].reset()
                if worker_channel.WAKE in signal_:
                    self.replica.wake.set()

    def _exited(self, child: _Child) -> None:
        del self.children[child.pid]
        child.link.close()
        self.publisher.links.remove(child.link)
        code = child.exited.result()
        how = f"signal {-code}" if code < 0 else f"code {code}"
        if self.stopping or child.retiring or child.generation < self.generation:
            log.info("worker %d (pid %d) exited (%s)", child.slot, child.pid, how)
            return
        log.error("worker %d (pid %d) exited (%s); forking it again", child.slot, child.pid, how)
        self.metrics.worker_restarted(HTTP_WORKER)
        task = asyncio.get_running_loop().create_task(self._refork(child.slot))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _refork(self, slot: int) -> None:
        await self._backoff[slot].wait()
        # During a full reload the next generation replaces every worker anyway; and
        # one may have filled the slot meanwhile.
        taken = any(c.slot == slot and c.generation == self.generation
                    for c in self.children.values())  # fmt: skip
        if not (self.stopping or self.publisher.reloaded.is_set() or taken):
            await self._fork(slot)

    async def _stop_all(self, signame: str) -> None:
        for task in self._pending:
            task.cancel()
        sig = signal.SIGTERM if signame == "SIGTERM" else signal.SIGINT
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        grace = self.settings.drain_seconds + sidecar.SHUTDOWN_SECONDS + 5.0
        exits = [c.exited for c in self.children.values()]
        try:
            async with asyncio.timeout(grace):
                await asyncio.gather(*exits)
        except TimeoutError:
            for pid in list(self.children):
                log.error("worker pid %d did not stop within %gs: killed", pid, grace)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await asyncio.gather(*(c.exited for c in self.children.values()))


# --- a worker -------------------------------------------------------------------------


def _worker_process(owner: Owner, slot: int, channel: socket.socket, owner_pid: int) -> int:
    """The forked worker's whole life (returns its exit code; never returns to the owner's
    loop, which stays frozen on this stack)."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != owner_pid:  # the owner died before the prctl
        return 1
    _release_inherited(keep={0, 1, 2, channel.fileno()})
    engine, epoch = owner.replica.engine, owner.replica.epoch
    assert engine is not None
    assert epoch is not None
    synced_at = owner.replica.synced_at
    assert synced_at is not None
    sidecar.event_loop_policy()
    worker = Worker(owner.settings, owner.url, owner.loaded, owner.run_dir, slot)
    return asyncio.run(worker.run(channel, engine, epoch, synced_at, owner.address))


def _release_inherited(keep: set[int]) -> None:
    """Point every inherited descriptor but `keep` at /dev/null: the owner's database
    sockets, its event loop's. dup2, not close: the owner's objects still name these
    numbers, and a number closed here and reused could be closed by one of them."""
    null = os.open(os.devnull, os.O_RDWR)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep and fd != null:
            with contextlib.suppress(OSError):
                os.dup2(null, fd)
    os.close(null)


class Worker:
    """One worker process: the sidecar's app over a replica fed by the owner's channel."""

    def __init__(
        self, settings: Settings, url: str, loaded: Loaded, run_dir: Path, slot: int
    ) -> None:
        self.settings = settings
        self.url = url
        self.loaded = loaded
        self.run_dir = run_dir
        self.slot = slot
        self.code = 0

    async def run(
        self, channel: socket.socket, engine: Engine, epoch: str, synced_at: float,
        address: tuple[str, int],
    ) -> int:  # fmt: skip
        settings = self.settings
        replica = Replica()
        replica.install(engine, epoch, synced_at)
        registry = CollectorRegistry()
        metrics = Metrics(registry)
        stop: asyncio.Queue[str] = asyncio.Queue()

        def broken(reason: str) -> None:
            retired = reason == worker_channel.CLOSED
            self.code = 0 if retired else EXIT_BROKEN
            log.log(
                logging.INFO if retired else logging.ERROR,
                "worker %d: %s: stopping", self.slot, reason,
            )  # fmt: skip
            stop.put_nowait("channel")

        follower = Follower(channel, replica, metrics, on_broken=broken)
        app = self._app(replica, registry, metrics, follower)
        sidecar.reload_routes_on_sighup(app)
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = reuseport_socket(family, address)
        sock.listen(settings.backlog)
        max_connections = settings.max_connections or default_max_connections(raise_file_limit())
        limits = EdgeLimits(settings.request_read_timeout_seconds, max_connections)
        own = self.run_dir / f"{self.slot}.sock"
        metrics_site = await _serve_registry(registry, own)
        try:
            await sidecar.serve_app(
                app, settings, self.loaded.ssl_context, limits, sock=sock, stop=stop,
                serving=lambda: follower.send(worker_channel.READY),
            )  # fmt: skip
        finally:
            await metrics_site.cleanup()
        return self.code

    def _app(
        self, replica: Replica, registry: CollectorRegistry, metrics: Metrics, follower: Follower
    ) -> web.Application:
        settings = self.settings
        supervisor = Supervisor(metrics)
        # Critical, never restarted: a broken chain stops the worker (`broken`).
        supervisor.add(sidecar.SYNC_WORKER, follower.lifespan, critical=True)
        fallback = PgFallback(self.url)
        decision_log = sidecar.decision_log_for(settings, self.url, metrics, supervisor)
        app = build_app(
            settings,
            replica=replica,
            registry=registry,
            metrics=metrics,
            health=Health(replica, settings.max_staleness_seconds, lambda: supervisor.down),
            fallback=fallback,
            api_keys=self.loaded.api_keys,
            gateway=self.loaded.gateway,
            decision_log=decision_log,
            cleanup=[sidecar.workers_context(fallback, supervisor)],
            scrape=self._scrape(registry),
        )
        slot = str(self.slot)

        async def stamp(_request: web.Request, response: web.StreamResponse) -> None:
            response.headers[WORKER_HEADER] = slot

        app.on_response_prepare.append(stamp)
        return app

    def _scrape(self, registry: CollectorRegistry) -> Callable[[], Awaitable[bytes]]:
        """Every process's metrics: this worker's own, the others' over their sockets."""
        run_dir, slot = self.run_dir, str(self.slot)

        async def scrape() -> bytes:
            texts = {slot: generate_latest(registry).decode()}
            others = sorted(p for p in run_dir.glob("*.sock") if p.stem != slot)
            got = await asyncio.gather(*(_read_metrics(p) for p in others))
            texts.update((p.stem, text) for p, text in zip(others, got, strict=True) if text)
            return merge_expositions(texts)

        return scrape


async def _serve_registry(registry: CollectorRegistry, path: Path) -> web.AppRunner:
    """This process's own metrics on a private Unix socket (what a sibling's scrape reads)."""

    async def page(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry))

    app = web.Application()
    app.router.add_get("/metrics", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    return runner


async def _read_metrics(path: Path) -> str | None:
    """A sibling's metrics text; None when it does not answer (exiting, being replaced)."""
    try:
        connector = aiohttp.UnixConnector(path=str(path))
        timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.get("http://pdp/metrics") as response,
        ):
            return await response.text()
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None
