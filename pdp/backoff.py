"""Capped exponential backoff with jitter: the one retry pacing of every pdp loop."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    """Delays that double from `initial` up to `maximum`, each drawn in [half, whole].

    The jitter spreads a fleet of sidecars that lost the same server, so they do not
    reconnect in lockstep. `reset()` after a success starts over from `initial`.
    """

    initial: float
    maximum: float
    factor: float = 2.0
    rng: Callable[[], float] = field(default=random.random, repr=False)
    _current: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError(f"backoff needs 0 < initial <= maximum, got {self}")
        self._current = self.initial

    def next_delay(self) -> float:
        """The delay to wait now; the next one is `factor` times longer (up to `maximum`)."""
        delay = self._current * (0.5 + 0.5 * self.rng())
        self._current = min(self._current * self.factor, self.maximum)
        return delay

    def reset(self) -> None:
        self._current = self.initial

    async def wait(self) -> float:
        """Sleep for `next_delay()`; returns how long it slept."""
        delay = self.next_delay()
        await asyncio.sleep(delay)
        return delay
