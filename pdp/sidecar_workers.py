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
This module is the owner; a worker's life after the fork is `pdp.sidecar_worker`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry

from pdp import sidecar
from pdp.backoff import Backoff
from pdp.config import Settings
from pdp.errors import PdpError
from pdp.metrics import Metrics
from pdp.pg.embedded import database_url
from pdp.readiness import Health
from pdp.replica import Replica
from pdp.sidecar_worker import (
    Loaded,
    WorkerSpec,
    reuseport_socket,
    serve_registry,
    worker_process,
)
from pdp.supervisor import Supervisor
from sync import worker_channel
from sync.pg_verifier import PgVerifier
from sync.service import SyncService
from sync.worker_channel import Link, Publisher

log = logging.getLogger(__name__)

HTTP_WORKER = "http"  # the `worker` label of a worker process's restarts
READY_TIMEOUT = 60.0  # a new generation's worker not serving within this is replaced


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
        metrics_site = await serve_registry(self.registry, self.run_dir / "owner.sock")
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

    def _spec(self) -> WorkerSpec:
        return WorkerSpec(self.settings, self.url, self.loaded, self.run_dir, self.address)

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
                code = worker_process(self._spec(), slot, theirs, owner_pid, self.replica)
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
