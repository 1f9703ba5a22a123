"""A pytest plugin: any exception the event loop reports fails the test that was running.

A task that died unobserved or a callback that raised is reported to the loop's
exception handler and, by default, only logged; here it fails the test, as asyncpg's
test base does. Loaded by conftest (and by `test_loop_guard` in an inner run).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest


@pytest.fixture(autouse=True)
async def _unhandled_loop_exceptions_fail_the_test() -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        yield
    finally:
        loop.set_exception_handler(previous)
    if reported:
        pytest.fail(
            "the event loop reported unhandled exceptions: "
            + "; ".join(f"{c.get('message')}: {c.get('exception')!r}" for c in reported)
        )
