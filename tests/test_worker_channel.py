"""The owner -> worker channel (`sync.worker_channel`) over a real socketpair: batches
arrive and apply in order, a gap or a bad frame breaks the chain, a worker attached
while a frame is being shipped gets that frame too, a full batch is never shipped."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from pdp.engine import Engine, Row, RowChange, Snapshot
from pdp.replica import Replica
from sync import worker_channel
from sync.pg_read import Batch
from sync.worker_channel import Follower, Link, Publisher

EPOCH = "e1"
TENANT_ROW: Row = ("t",)


def _replica(at: str) -> Replica:
    replica = Replica()
    tables = {"tenants": [TENANT_ROW]}
    replica.install(Engine.build(tables, Snapshot.parse(at)), EPOCH, 0.0)
    return replica


def _user(user: str) -> RowChange:
    return RowChange("users", ("t", user), ("t", user, "active", "{}"))


def _batch(to: str, *changes: RowChange) -> Batch:
    return Batch(Snapshot.parse(to), EPOCH, asyncio.get_running_loop().time(), changes=[*changes])


@dataclass
class Pair:
    owner: Replica
    publisher: Publisher
    worker: Replica
    follower: Follower
    broken: list[str] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def ship(self, batch: Batch) -> None:
        """What the owner's catch-up does: the sink, then the owner's own apply."""
        await self.publisher.sink(batch)
        if batch.full is None:
            self.owner.apply(batch.changes, batch.snapshot, batch.synced_at)

    async def until_worker_at(self, revision: str) -> None:
        async with asyncio.timeout(10):
            while str(self.worker.revision) != revision and not self.broken:
                await self.worker.advanced()


async def _link(publisher: Publisher, sock: socket.socket, name: str = "1") -> Link:
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    link = Link(name, reader, writer)
    publisher.attach(link)
    return link


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    ours, theirs = socket.socketpair()
    owner = _replica("10:10:")
    publisher = Publisher(owner)
    await _link(publisher, ours)
    worker = _replica("10:10:")
    broken: list[str] = []
    follower = Follower(theirs, worker, on_broken=broken.append)
    made = Pair(owner, publisher, worker, follower, broken)
    async with follower.lifespan() as body:
        task = asyncio.create_task(body())
        yield made
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    for link in publisher.links:
        link.close()
        await link.writer.wait_closed()


async def test_batches_apply_in_order_on_the_worker(pair: Pair) -> None:
    await pair.ship(_batch("11:11:", _user("alice")))
    await pair.ship(_batch("12:12:"))  # a heartbeat: nothing changed, proven current
    await pair.ship(_batch("13:13:", _user("bob"), RowChange("users", ("t", "alice"), None)))
    await pair.until_worker_at("13:13:")
    assert pair.broken == []
    assert pair.follower.entries == 3
    engine = pair.worker.engine
    assert engine is not None
    assert engine.counts()["users"] == 1  # bob; alice came and went
    assert pair.worker.staleness() < 5


async def test_a_tenant_replaced_whole_is_built_off_the_event_loop(
    pair: Pair, tenant_builds: list[bool]
) -> None:
    users: list[Row] = [("t", f"u{i}", "active", "{}") for i in range(50)]
    rows: dict[str, list[Row]] = {"tenants": [TENANT_ROW], "users": users}
    replaced = _batch("11:11:")
    replaced.tenants = {"t": rows}
    await pair.ship(replaced)
    await pair.until_worker_at("11:11:")
    assert pair.broken == []
    engine = pair.worker.engine
    assert engine is not None
    assert engine.counts()["users"] == 50
    assert tenant_builds == [False]  # the worker built it in a thread


async def test_a_gap_breaks_the_chain(pair: Pair) -> None:
    await pair.ship(_batch("11:11:", _user("alice")))
    await pair.until_worker_at("11:11:")
    # The owner moves on without shipping (as if a frame were lost): the next one
    # starts where the worker does not stand.
    pair.owner.apply([_user("carol")], Snapshot.parse("12:12:"), 0.0)
    await pair.ship(_batch("13:13:", _user("bob")))
    async with asyncio.timeout(10):
        while not pair.broken:  # noqa: ASYNC110 -- the callback sets no event
            await asyncio.sleep(0.01)
    assert "continues from e1|12:12:" in pair.broken[0]
    assert str(pair.worker.revision) == "11:11:"  # nothing applied past the gap


async def test_the_owner_closing_the_channel_is_a_clean_end(pair: Pair) -> None:
    pair.publisher.links[0].close()
    async with asyncio.timeout(10):
        while not pair.broken:  # noqa: ASYNC110 -- the callback sets no event
            await asyncio.sleep(0.01)
    assert pair.broken == [worker_channel.CLOSED]


async def test_a_full_batch_is_not_shipped_and_stops_the_links(pair: Pair) -> None:
    full = _batch("20:20:")
    full.full = {"tenants": [TENANT_ROW]}
    await pair.publisher.sink(full)
    assert pair.publisher.reloaded.is_set()
    assert not any(link.live for link in pair.publisher.links)
    assert pair.publisher.shipped == 0


async def test_a_worker_attached_while_a_frame_ships_gets_it() -> None:
    owner = _replica("10:10:")
    publisher = Publisher(owner)
    first_ours, first_theirs = socket.socketpair()
    await _link(publisher, first_ours)
    big = [_user(f"u{i:05d}-" + "x" * 200) for i in range(500)]
    shipping = asyncio.create_task(publisher.sink(_batch("11:11:", *big)))
    async with asyncio.timeout(10):
        while publisher._frame is None:  # noqa: ASYNC110 -- the in-flight frame
            await asyncio.sleep(0)
    # Forked now, the new worker is a copy of the owner, which has not applied it yet.
    ours, theirs = socket.socketpair()
    await _link(publisher, ours, "2")
    worker = _replica("10:10:")
    broken: list[str] = []
    follower = Follower(theirs, worker, on_broken=broken.append)
    async with follower.lifespan() as body:
        task = asyncio.create_task(body())
        async with asyncio.timeout(10):
            while str(worker.revision) != "11:11:":
                await worker.advanced()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert broken == []
    await asyncio.wait_for(shipping, 10)
    first_theirs.close()
    for link in publisher.links:
        link.close()
        await link.writer.wait_closed()
