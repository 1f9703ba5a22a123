"""A worker process of `pdp serve --workers N`: from the fork to its exit.

`pdp.sidecar_workers` (the owner) forks; the child calls `worker_process`, which
leaves the owner's state behind (signal handlers reset, PR_SET_PDEATHSIG SIGKILL so it
dies with the owner, every inherited descriptor but its channel pointed at /dev/null)
and runs a fresh event loop: the sidecar's app (`pdp.web.app.build_app`) over a
`Replica` installed from the owner's engine (shared copy-on-write), fed by the owner's
channel (`sync.worker_channel.Follower`, its critical sync worker), on its own
SO_REUSEPORT listening socket. It stops on SIGTERM/SIGINT (draining), when its channel
ends (the owner retires it: exit 0) or breaks (exit `EXIT_BROKEN`; the owner forks a
fresh one). Each process also serves its own metrics on a private Unix socket
(`serve_registry`); a worker's /metrics merges every process's (`_scrape`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from ssl import SSLContext

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from pdp import sidecar
from pdp.config import Settings
from pdp.engine import Engine
from pdp.http_edge import EdgeLimits, default_max_connections, raise_file_limit
from pdp.metrics import Metrics, merge_expositions
from pdp.replica import Replica
from pdp.supervisor import Supervisor
from pdp.web.api_keys import ApiKeys
from pdp.web.forward_auth import Gateway, gateway_from_settings
from pdp.web.tls import server_context
from sync import worker_channel
from sync.worker_channel import Follower

log = logging.getLogger(__name__)

WORKER_HEADER = "X-PDP-Worker"
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


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What every worker of one `pdp serve` shares: settings, files, the address."""

    settings: Settings
    url: str
    loaded: Loaded
    run_dir: Path  # the private directory of the metrics sockets
    address: tuple[str, int]


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


# --- the process --------------------------------------------------------------------


def worker_process(
    spec: WorkerSpec, slot: int, channel: socket.socket, owner_pid: int, owner: Replica
) -> int:
    """The forked worker's whole life, from the fork on (returns its exit code; never
    returns to the owner's loop, which stays frozen on the stack below): `owner` is the
    owner's replica, whose engine the worker shares."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != owner_pid:  # the owner died before the prctl
        return 1
    _release_inherited(keep={0, 1, 2, channel.fileno()})
    engine, epoch, synced_at = owner.engine, owner.epoch, owner.synced_at
    assert engine is not None
    assert epoch is not None
    assert synced_at is not None
    sidecar.event_loop_policy()
    worker = Worker(spec, slot)
    return asyncio.run(worker.run(channel, engine, epoch, synced_at))


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

    def __init__(self, spec: WorkerSpec, slot: int) -> None:
        self.settings = spec.settings
        self.url = spec.url
        self.loaded = spec.loaded
        self.run_dir = spec.run_dir
        self.address = spec.address
        self.slot = slot
        self.code = 0

    async def run(
        self, channel: socket.socket, engine: Engine, epoch: str, synced_at: float
    ) -> int:
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
        family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
        sock = reuseport_socket(family, self.address)
        sock.listen(settings.backlog)
        max_connections = settings.max_connections or default_max_connections(raise_file_limit())
        limits = EdgeLimits(settings.request_read_timeout_seconds, max_connections)
        own = self.run_dir / f"{self.slot}.sock"
        metrics_site = await serve_registry(registry, own)
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
        return sidecar.api_app(
            settings, self.url, replica, registry, metrics, supervisor,
            api_keys=self.loaded.api_keys, gateway=self.loaded.gateway,
            scrape=self._scrape(registry), headers={WORKER_HEADER: str(self.slot)},
        )  # fmt: skip

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


async def serve_registry(registry: CollectorRegistry, path: Path) -> web.AppRunner:
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
