"""Shared data and builders for the web tests (no tests here).

A hand-written tenant whose every decision is known, a replica on a fake clock
(staleness is driven by moving the clock, never by sleeping) and `make_app`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from pdp.conditions import Facts
from pdp.config import Settings
from pdp.decision_log import DecisionLog
from pdp.engine import Engine, Snapshot
from pdp.metrics import Metrics
from pdp.replica import Fallback, Replica
from pdp.web.api_keys import ApiKeys
from pdp.web.app import build_app

TENANT = "acme"
REVISION = Snapshot(100, 105, frozenset({102}))
PAST = time.time() - 3600
# 25 users who may read every document: enough for several pages of subject search.
READERS = tuple(f"reader-{i:02d}" for i in range(25))
# Resources `pager` may read one by one: several pages of resource search.
PAGER_DOCS = tuple(f"p{i:02d}" for i in range(12))


def rows() -> dict[str, list[tuple[Any, ...]]]:
    t = TENANT
    return {
        "tenants": [(t,), ("globex",)],
        "users": [
            (t, "alice", "active"),
            (t, "bob", "active"),
            (t, "carol", "disabled"),
            (t, "dave", "active"),
            (t, "erin", "active"),
            (t, "pager", "active"),
            *((t, r, "active") for r in READERS),
            ("globex", "zed", "active"),
        ],
        "roles": [(t, "viewer"), (t, "editor"), (t, "admin"), ("globex", "admin")],
        "role_inherits": [(t, "editor", "viewer")],
        "role_permissions": [
            (t, "viewer", "document:read"),
            (t, "editor", "document:write"),
            (t, "admin", "document:*"),
            ("globex", "admin", "*:*"),
        ],
        "groups": [(t, "eng")],
        "group_members": [(t, "eng", "dave")],
        "user_roles": [
            (t, "alice", "admin", "*", None),
            (t, "bob", "viewer", "document:d1", None),
            (t, "bob", "editor", "document:d2", None),
            (t, "carol", "viewer", "*", None),
            (t, "erin", "viewer", "document:d3", PAST),
            *((t, "pager", "viewer", f"document:{d}", None) for d in PAGER_DOCS),
            *((t, r, "viewer", "document:*", None) for r in READERS),
            ("globex", "zed", "admin", "*", None),
        ],
        "group_roles": [(t, "eng", "editor", "document:*", None)],
    }


@dataclass
class Clock:
    """A monotonic clock the test moves by hand."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class RecordingFallback:
    """A `Fallback` that answers `allowed` and records every call."""

    allowed: bool = True
    calls: list[tuple[str, ...]] = field(default_factory=list)

    async def __call__(
        self,
        tenant: str,
        user: str,
        rtype: str,
        rid: str,
        action: str,
        facts: Facts | None = None,
    ) -> bool:
        self.calls.append((tenant, user, rtype, rid, action))
        return self.allowed


def engine(revision: Snapshot = REVISION) -> Engine:
    return Engine.build(rows(), revision)


def loaded_replica(clock: Clock, revision: Snapshot = REVISION) -> Replica:
    replica = Replica(clock=clock)
    replica.install(engine(revision), epoch="e", synced_at=clock())
    return replica


def settings(**changes: Any) -> Settings:
    base = Settings(default_tenant=TENANT, max_batch=50, max_body_bytes=64 * 1024)
    return dataclasses.replace(base, **changes)


def make_app(
    replica: Replica,
    config: Settings | None = None,
    *,
    fallback: Fallback | None = None,
    registry: CollectorRegistry | None = None,
    metrics: Metrics | None = None,
    api_keys: ApiKeys | None = None,
    decision_log: DecisionLog | None = None,
) -> web.Application:
    return build_app(
        config or settings(),
        replica=replica,
        registry=registry or CollectorRegistry(),
        metrics=metrics,
        fallback=fallback,
        api_keys=api_keys,
        decision_log=decision_log,
    )


def evaluation(
    user: str = "alice",
    action: str = "read",
    rtype: str = "document",
    rid: str = "d1",
    **subject_extra: Any,
) -> dict[str, Any]:
    return {
        "subject": {"type": "user", "id": user, **subject_extra},
        "action": {"name": action},
        "resource": {"type": rtype, "id": rid},
    }


def ids(results: Sequence[dict[str, Any]]) -> list[str]:
    return [r["id"] for r in results]
