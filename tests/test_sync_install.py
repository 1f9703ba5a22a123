"""`sync.apply.install`: a full load's engine is swapped in and kept out of the collector's way.

Every install freezes the heap (`gc.freeze`), so the cyclic collector never walks the
engine's millions of objects again, and collects first, the first load too: requests
served while the build ran with the collector off leave cyclic garbage (measured: 8
objects a connection, 28 for a malformed request line, 44 for a read timeout), which
a freeze without a collection would keep for the life of the process.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from pdp.engine import Engine, Snapshot
from pdp.replica import Replica
from sync import apply
from sync.metrics import NullMetrics
from sync.pg_read import Batch


class _Node:
    """A cycle of two of these is garbage only the cyclic collector frees."""

    other: _Node | None = None


@pytest.fixture(autouse=True)
def collector_off() -> Iterator[None]:
    """As during a full read: the collector is off until the install."""
    was = gc.isenabled()
    gc.disable()
    yield
    if was:
        gc.enable()


def _engine(revision: int) -> Engine:
    return Engine.build(
        {"tenants": [("t",)], "users": [("t", "u", "active")]}, Snapshot(revision, revision)
    )


def _cycle() -> weakref.ref[_Node]:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def _frozen(engine: Engine) -> bool:
    """Whether the engine's tenant state sits in the permanent generation (no other)."""
    state = engine.states()[0]
    assert gc.is_tracked(state)
    return not any(state is held for gen in range(3) for held in gc.get_objects(gen))


def _install(replica: Replica, engine: Engine) -> None:
    batch = Batch(engine.revision, "epoch", 0.0, engine=engine, reload_reason="test")
    apply.install(replica, engine, batch, NullMetrics(), 0.1)


@pytest.mark.parametrize("serving", [False, True], ids=["first load", "reload while serving"])
def test_an_install_collects_the_garbage_before_freezing(serving: bool) -> None:
    replica = Replica()
    if serving:
        _install(replica, _engine(1))
    engine = _engine(2)
    garbage = _cycle()  # what requests left while the load was built
    assert garbage() is not None  # the collector is off: the cycle is still there
    assert not _frozen(engine)
    _install(replica, engine)
    assert replica.engine is engine
    assert replica.engine.revision == Snapshot(2, 2)
    assert _frozen(engine)
    assert garbage() is None  # collected, not frozen
