"""The test harness itself: an exception no one observed fails the test it happened in."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["pytester"]

INNER = '''
import asyncio


async def test_task_dies_unobserved() -> None:
    async def boom() -> None:
        raise RuntimeError("nobody awaits me")

    task = asyncio.get_running_loop().create_task(boom())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    del task  # dropped with its exception never retrieved: the loop reports it


async def test_callback_raises() -> None:
    loop = asyncio.get_running_loop()
    loop.call_soon(lambda: 1 / 0)
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_clean() -> None:
    await asyncio.sleep(0)


async def test_known_asyncpg_leak_is_tolerated() -> None:
    future = asyncio.get_running_loop().create_future()
    future.set_exception(ConnectionError("unexpected connection_lost() call"))
    del future
'''


def test_unobserved_exceptions_fail_the_test(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makepyfile(test_inner=INNER)
    pytester.makeini("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n")
    result = pytester.runpytest_subprocess("-p", "tests.loop_guard", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*Failed: the event loop reported unhandled exceptions*nobody awaits me*",
            "*Failed: the event loop reported unhandled exceptions*ZeroDivisionError*",
            "ERROR test_inner.py::test_task_dies_unobserved*",
            "ERROR test_inner.py::test_callback_raises*",
        ]
    )
