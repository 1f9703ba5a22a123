"""Waiting on a condition with a deadline, where the code under test rings no bell.

A test waits for what it needs (never a fixed sleep); when the state lives behind an
HTTP API, a worker or PostgreSQL, there is no event to await, so it is polled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

POLL = 0.02  # seconds between two looks


async def until(condition: Callable[[], bool], within: float, what: str = "") -> None:
    """Return once `condition()` holds; fail (TimeoutError) after `within` seconds."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 -- no event to wait on
            await asyncio.sleep(POLL)
    assert condition(), what


async def until_true(predicate: Callable[[], Awaitable[bool]], within: float = 15.0) -> None:
    """Return once `await predicate()` is true; fail (TimeoutError) after `within` seconds."""
    async with asyncio.timeout(within):
        while not await predicate():  # noqa: ASYNC110 -- no event to wait on
            await asyncio.sleep(POLL)
