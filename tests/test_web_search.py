"""Subject search on a large answer yields to other requests and stays of one state."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry

from pdp.config import Settings
from pdp.engine import Engine, RowChange, Snapshot
from pdp.metrics import Metrics
from pdp.protocol import Page, SubjectSearch
from pdp.replica import Replica
from pdp.web.authzen import AuthzenApi

USERS = 2_500  # more than two pieces of 1,000


def _engine() -> Engine:
    users = [("t", f"u{i:05d}", "active") for i in range(USERS)]
    return Engine.build(
        {
            "tenants": [("t",)],
            "users": users,
            "roles": [("t", "reader")],
            "role_permissions": [("t", "reader", "doc:read")],
            "user_roles": [("t", uid, "reader", "*", None) for _, uid, _ in users],
        },
        Snapshot(1, 1),
    )


def _api(engine: Engine) -> AuthzenApi:
    replica = Replica()
    replica.install(engine, "e", time.monotonic())
    return AuthzenApi(Settings(), replica, Metrics(CollectorRegistry()), None)


SEARCH = SubjectSearch(
    tenant="t", subject_type="user", resource_type="doc", resource_id="1", action="read",
    page=Page(0, 100, ""),
)


def test_chunks_are_the_answer_in_pieces() -> None:
    engine = _engine()
    pieces = list(engine.subject_chunks("t", "doc", "1", "read", time.time()))
    assert len(pieces) == 3
    assert sorted(uid for piece in pieces for uid in piece) == list(
        engine.subjects("t", "doc", "1", "read", time.time())
    )


async def test_other_work_runs_between_pieces_and_a_change_restarts_the_walk() -> None:
    engine = _engine()
    api = _api(engine)
    turns = 0

    async def meanwhile() -> None:
        nonlocal turns
        while turns < 2:  # runs only when the search yields
            turns += 1
            if turns == 1:
                change = RowChange.upsert("users", ("t", "u00000", "disabled"))
                engine.apply([change], Snapshot(2, 2))
            await asyncio.sleep(0)

    other = asyncio.create_task(meanwhile())
    found = await api._subjects(engine, SEARCH)
    await other
    assert turns == 2, "the search never gave the loop a turn"
    assert len(found) == USERS - 1  # the answer is of the state after the change
    assert "u00000" not in found
