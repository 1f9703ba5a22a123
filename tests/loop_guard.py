"""A pytest plugin: any exception the event loop reports fails the test that was running.

A task that died unobserved or a callback that raised is reported to the loop's
exception handler and, by default, only logged; here it fails the test, as asyncpg's
test base does. Loaded by conftest (and by `test_loop_guard` in an inner run).
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import AsyncIterator
from typing import Any

import pytest


@pytest.fixture(autouse=True)
async def _unhandled_loop_exceptions_fail_the_test() -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()

    def record(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not _known_upstream(context):
            reported.append(context)

    loop.set_exception_handler(record)
    try:
        yield
    finally:
        loop.set_exception_handler(previous)
    if reported:
        pytest.fail(
            "the event loop reported unhandled exceptions: "
            + "; ".join(_describe(context) for context in reported)
        )


def _known_upstream(context: dict[str, Any]) -> bool:
    """asyncpg's SSL-negotiation future on the side connection it opens to cancel a query
    (after a timeout) fails with this exact error when that connection drops, and nobody
    retrieves it: MagicStack/asyncpg#1310 (fix proposed in #1312). Not ours to observe."""
    exc = context.get("exception")
    return type(exc) is ConnectionError and str(exc) == "unexpected connection_lost() call"


def _describe(context: dict[str, Any]) -> str:
    """The message and exception, and where the future or task was created when the loop
    runs in debug mode (PYTHONASYNCIODEBUG=1), which is what finding the cause needs."""
    text = f"{context.get('message')}: {context.get('exception')!r}"
    owner = context.get("future") or context.get("task")
    created = getattr(owner, "_source_traceback", None)
    if created:
        text += "\ncreated at:\n" + "".join(traceback.format_list(created[-8:]))
    return text
