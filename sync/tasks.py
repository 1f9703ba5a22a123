"""Cancellation that a library may swallow.

redis-py can absorb a cancellation that lands while it reads a reply (the command
then returns normally), so a loop around Redis calls would never stop. Such loops
call `raise_if_cancelling()` on every turn.
"""

from __future__ import annotations

import asyncio


def raise_if_cancelling() -> None:
    """Raise CancelledError when the current task has been asked to stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
