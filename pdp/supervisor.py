"""Supervision of background workers: start, watch, restart with backoff, report.

A worker is an async context manager factory (`Lifespan`): entering it starts the
worker (connects, proves what it must) and yields its body, a coroutine function
that runs until cancelled; leaving it releases what it holds. The supervisor enters
every worker once at start, and a failure there propagates (a sidecar that cannot
start says so and exits). After that, a body that raises or returns has crashed:
the traceback is logged once, the crash counted (`pdp_worker_restarts_total`), the
worker left and, after a capped jittered backoff, entered again (a restart that
cannot start, say while the database is down, is logged in one line and retried). While a critical
worker is down the supervisor reports it in `down`, which readiness reads.

    async with supervisor.running():   # every worker started, or the first failure raised
        ...                            # serve
                                       # leaving: every worker cancelled and left, in reverse

No aiohttp: the composition root adapts `running()` to the app's cleanup context.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from pdp.backoff import Backoff

log = logging.getLogger(__name__)

Body = Callable[[], Coroutine[Any, Any, None]]
Lifespan = Callable[[], AbstractAsyncContextManager[Body]]


class WorkerMetrics(Protocol):
    def worker_restarted(self, worker: str) -> None: ...
    def worker_up(self, worker: str, up: bool) -> None: ...


class NullWorkerMetrics:
    def worker_restarted(self, worker: str) -> None: ...
    def worker_up(self, worker: str, up: bool) -> None: ...


@dataclass(slots=True)
class _Worker:
    name: str
    lifespan: Lifespan
    critical: bool
    backoff: Backoff
    up: bool = False
    crashes: int = 0
    started: asyncio.Future[None] | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class Supervisor:
    """Runs named workers and restarts the ones that crash.

    `stable_after`: a worker that ran this long before crashing restarts after the
    initial delay again (its backoff is reset), so one crash a day is not slowed by
    the crashes of last week.
    """

    def __init__(
        self,
        metrics: WorkerMetrics | None = None,
        *,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
        stable_after: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics or NullWorkerMetrics()
        self._backoff = (backoff_initial, backoff_max)
        self._stable_after = stable_after
        self._clock = clock
        self._workers: list[_Worker] = []
        self.changed = asyncio.Event()  # set on every up/down transition (tests wait on it)

    def add(self, name: str, lifespan: Lifespan, *, critical: bool = False) -> None:
        """Register a worker; `critical` ones make the sidecar not ready while down."""
        if any(w.name == name for w in self._workers):
            raise ValueError(f"worker {name!r} added twice")
        self._workers.append(_Worker(name, lifespan, critical, Backoff(*self._backoff)))

    @property
    def down(self) -> tuple[str, ...]:
        """Names of the critical workers not running now (crashed, waiting to restart)."""
        return tuple(w.name for w in self._workers if w.critical and not w.up)

    def crashes(self, name: str) -> int:
        """How many times the worker `name` has crashed."""
        return next(w.crashes for w in self._workers if w.name == name)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Supervisor]:
        """Start every worker (in order), yield, then stop them (in reverse order)."""
        started: list[_Worker] = []
        try:
            for worker in self._workers:
                worker.started = asyncio.get_running_loop().create_future()
                worker.task = asyncio.create_task(self._supervise(worker), name=worker.name)
                started.append(worker)
                await asyncio.shield(worker.started)
            yield self
        finally:
            for worker in reversed(started):
                await self._stop(worker)

    async def _stop(self, worker: _Worker) -> None:
        task = worker.task
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        worker.task = None
        self._set_up(worker, False)

    async def _supervise(self, worker: _Worker) -> None:
        assert worker.started is not None
        while True:
            began, entered = self._clock(), False
            try:
                async with worker.lifespan() as body:
                    entered = True
                    if not worker.started.done():
                        worker.started.set_result(None)
                    self._set_up(worker, True)
                    await body()
                log.error("worker %s stopped on its own; restarting it", worker.name)
            except Exception as exc:
                if not worker.started.done():  # a failed first start is the caller's to report
                    worker.started.set_exception(exc)
                    return
                if entered:
                    log.exception("worker %s crashed; restarting it", worker.name)
                else:
                    log.warning("worker %s could not restart (%r); retrying", worker.name, exc)
            self._set_up(worker, False)
            if entered:
                worker.crashes += 1
                self._metrics.worker_restarted(worker.name)
                if self._clock() - began >= self._stable_after:
                    worker.backoff.reset()
            await worker.backoff.wait()

    def _set_up(self, worker: _Worker, up: bool) -> None:
        if worker.up != up:
            worker.up = up
            self._metrics.worker_up(worker.name, up)
            changed, self.changed = self.changed, asyncio.Event()
            changed.set()
