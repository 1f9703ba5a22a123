"""The supervisor on its own: start, crash, restart with backoff, report; and Backoff."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from pdp.backoff import Backoff
from pdp.supervisor import Body, Supervisor


@dataclass
class Recorder:
    restarts: list[str] = field(default_factory=list)
    up: list[tuple[str, bool]] = field(default_factory=list)

    def worker_restarted(self, worker: str) -> None:
        self.restarts.append(worker)

    def worker_up(self, worker: str, up: bool) -> None:
        self.up.append((worker, up))


@dataclass
class FlakyWorker:
    """Crashes its first `crashes` runs, then runs until cancelled; logs its lifecycle."""

    crashes: int
    events: list[str] = field(default_factory=list)
    running: asyncio.Event = field(default_factory=asyncio.Event)

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[Body]:
        self.events.append("enter")
        try:
            yield self.run
        finally:
            self.events.append("exit")

    async def run(self) -> None:
        if self.crashes > 0:
            self.crashes -= 1
            raise ValueError("a bug")
        self.running.set()
        await asyncio.Event().wait()


async def _wait_up(supervisor: Supervisor, name: str, within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while name in supervisor.down:
            await supervisor.changed.wait()


async def _wait_down(supervisor: Supervisor, names: tuple[str, ...], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while supervisor.down != names:
            await supervisor.changed.wait()


async def test_a_crash_is_logged_once_counted_and_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Recorder()
    supervisor = Supervisor(metrics, backoff_initial=0.01, backoff_max=0.02)
    worker = FlakyWorker(crashes=3)
    supervisor.add("w", worker.lifespan, critical=True)
    async with supervisor.running():
        await asyncio.wait_for(worker.running.wait(), 5)
        assert supervisor.down == ()
        assert supervisor.crashes("w") == 3
    assert metrics.restarts == ["w", "w", "w"]
    crashes = [r for r in caplog.records if r.getMessage() == "worker w crashed; restarting it"]
    assert len(crashes) == 3
    assert all(r.exc_info is not None and r.exc_info[0] is ValueError for r in crashes)
    # Every run was entered and left (its resources released), the last one at stop.
    assert worker.events == ["enter", "exit"] * 4
    assert metrics.up[-1] == ("w", False)


async def test_a_critical_worker_is_down_until_it_runs_again() -> None:
    supervisor = Supervisor(backoff_initial=0.3, backoff_max=0.3)
    worker = FlakyWorker(crashes=1)
    supervisor.add("sync", worker.lifespan, critical=True)
    supervisor.add("other", FlakyWorker(crashes=1).lifespan)  # not critical: never "down"
    async with supervisor.running():
        await _wait_down(supervisor, ("sync",))
        await _wait_up(supervisor, "sync")
        assert worker.running.is_set()
        assert supervisor.down == ()


async def test_a_failed_first_start_raises_and_stops_the_others() -> None:
    first = FlakyWorker(crashes=0)

    @contextlib.asynccontextmanager
    async def cannot_start() -> AsyncIterator[Body]:
        raise ConnectionRefusedError("database down")
        yield first.run  # pragma: no cover

    supervisor = Supervisor()
    supervisor.add("first", first.lifespan)
    supervisor.add("second", cannot_start)
    with pytest.raises(ConnectionRefusedError, match="database down"):
        async with supervisor.running():
            pytest.fail("must not get here")
    assert first.events == ["enter", "exit"]


async def test_a_failing_restart_is_one_line_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    attempts = 0
    healthy = asyncio.Event()

    async def crash() -> None:
        raise RuntimeError("bug")

    async def run() -> None:
        healthy.set()
        await asyncio.Event().wait()

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[Body]:
        nonlocal attempts
        attempts += 1
        if attempts in (2, 3):  # the restarts after the crash cannot start at first
            raise OSError("connection refused")
        yield crash if attempts == 1 else run

    supervisor = Supervisor(backoff_initial=0.01, backoff_max=0.01)
    supervisor.add("w", lifespan)
    with caplog.at_level(logging.WARNING, logger="pdp.supervisor"):
        async with supervisor.running():
            await asyncio.wait_for(healthy.wait(), 5)
    assert attempts == 4
    assert supervisor.crashes("w") == 1  # failed restarts are not new crashes
    retried = [r for r in caplog.records if "could not restart" in r.getMessage()]
    assert len(retried) == 2
    assert all(r.exc_info is None for r in retried)


async def test_a_body_that_returns_is_restarted(caplog: pytest.LogCaptureFixture) -> None:
    runs = 0
    again = asyncio.Event()

    async def body() -> None:
        nonlocal runs
        runs += 1
        if runs > 1:
            again.set()
            await asyncio.Event().wait()

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[Body]:
        yield body

    supervisor = Supervisor(backoff_initial=0.01, backoff_max=0.01)
    supervisor.add("w", lifespan)
    async with supervisor.running():
        await asyncio.wait_for(again.wait(), 5)
    assert "worker w stopped on its own; restarting it" in caplog.text


def test_names_are_unique() -> None:
    supervisor = Supervisor()
    supervisor.add("w", FlakyWorker(0).lifespan)
    with pytest.raises(ValueError, match="added twice"):
        supervisor.add("w", FlakyWorker(0).lifespan)


def test_backoff_doubles_up_to_the_cap_with_jitter_and_resets() -> None:
    draws = iter([1.0, 0.0, 1.0, 1.0, 1.0, 0.5])
    backoff = Backoff(0.1, 0.5, rng=lambda: next(draws))
    delays = [backoff.next_delay() for _ in range(5)]
    assert delays == pytest.approx([0.1, 0.1, 0.4, 0.5, 0.5])  # 0.0 draws half: 0.2 -> 0.1
    backoff.reset()
    assert backoff.next_delay() == pytest.approx(0.075)  # 0.1 * (0.5 + 0.5 * 0.5)
    with pytest.raises(ValueError, match="initial <= maximum"):
        Backoff(2.0, 1.0)
