"""Whether the sidecar may be routed to: one policy that `/readyz` and `pdp_ready` share.

Ready means: not draining (after SIGTERM `pdp.sidecar` calls `drain()`, so the
orchestrator stops routing here while requests are still served), a snapshot is
loaded, no critical worker is down (the supervisor is restarting the sync worker,
say), and the data was proven current within `max_staleness` seconds. Decisions
have their own gate (stale data is denied in `deny` mode whatever readiness says);
readiness tells the orchestrator the truth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pdp.replica import Replica


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reason: str  # "ok", "draining", "not_loaded", "worker_down" or "stale"
    staleness: float
    workers_down: tuple[str, ...] = ()


def _nothing_down() -> tuple[str, ...]:
    return ()


class Health:
    """Readiness of one sidecar: its replica's freshness and its critical workers."""

    def __init__(
        self,
        replica: Replica,
        max_staleness: float,
        workers_down: Callable[[], tuple[str, ...]] = _nothing_down,
    ) -> None:
        self.replica = replica
        self.max_staleness = max_staleness
        self._workers_down = workers_down
        self.draining = False

    def drain(self) -> None:
        """From now on not ready (reason `draining`): the process is about to stop."""
        self.draining = True

    def readiness(self) -> Readiness:
        staleness = self.replica.staleness()
        down = self._workers_down()
        if self.draining:
            return Readiness(False, "draining", staleness, down)
        if not self.replica.ready:
            return Readiness(False, "not_loaded", staleness, down)
        if down:
            return Readiness(False, "worker_down", staleness, down)
        if staleness > self.max_staleness:
            return Readiness(False, "stale", staleness, down)
        return Readiness(True, "ok", staleness)
