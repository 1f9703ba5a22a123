"""Subject search on a large answer yields to other requests, stays of one state, computes
one at a time and answers repeats from a cache that a change invalidates."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pdp.config import Settings
from pdp.engine import Engine, RowChange, Snapshot
from pdp.errors import ConfigError
from pdp.web.subject_search import CACHE_SECONDS, REQUEST_COST, Question, SubjectSearcher

USERS = 2_500  # more than two pieces of 1,000 (ten of the searcher's 250)


def _tables() -> dict[str, list[tuple[Any, ...]]]:
    users = [("t", f"u{i:05d}", "active") for i in range(USERS)]
    return {
        "tenants": [("t",)],
        "users": users,
        "roles": [("t", "reader")],
        "role_permissions": [("t", "reader", "doc:read")],
        "user_roles": [("t", uid, "reader", "*", None) for _, uid, _ in users],
    }


def _engine() -> Engine:
    return Engine.build(_tables(), Snapshot(1, 1))


QUESTION = ("t", "doc", "1", "read")


async def _ask(searcher: SubjectSearcher, engine: Engine, question: Question) -> tuple[str, ...]:
    async with searcher.turn() as meter:
        return await searcher.subjects(engine, question, meter)


class Clock:
    """A monotonic clock the test moves (the cache's time bound)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_chunks_are_the_answer_in_pieces() -> None:
    engine = _engine()
    pieces = list(engine.subject_chunks("t", "doc", "1", "read", time.time()))
    assert len(pieces) == 4  # an empty one after the groups (a turn), then three of 1,000
    assert pieces[0] == []
    assert sorted(uid for piece in pieces for uid in piece) == list(
        engine.subjects("t", "doc", "1", "read", time.time())
    )


async def test_other_work_runs_between_slices_and_a_change_restarts_the_walk() -> None:
    engine = _engine()
    searcher = SubjectSearcher(slice_seconds=0.0)  # a turn after every piece
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
    found = await _ask(searcher, engine, QUESTION)
    await other
    assert turns == 2, "the search never gave the loop a turn"
    assert len(found) == USERS - 1  # the answer is of the state after the change
    assert "u00000" not in found
    assert found == engine.subjects(*QUESTION, time.time())


async def test_the_answer_is_the_engines_sorted_answer() -> None:
    engine = _engine()
    for budget in (0.0, 0.001, 10.0):
        searcher = SubjectSearcher(slice_seconds=budget)
        for question in [QUESTION, ("t", "doc", "2", "write"), ("nope", "doc", "1", "read")]:
            expected = engine.subjects(*question, time.time())
            assert await _ask(searcher, engine, question) == expected


async def test_the_cache_answers_repeats_and_a_change_or_time_invalidates_it() -> None:
    engine = _engine()
    clock = Clock()
    searcher = SubjectSearcher(clock=clock)
    first = await _ask(searcher, engine, QUESTION)
    for _ in range(5):  # a client paging: the same question at the same state
        assert await _ask(searcher, engine, QUESTION) is first
    assert searcher.computed == 1
    engine.apply([RowChange.upsert("users", ("t", "u00007", "disabled"))], Snapshot(3, 3))
    changed = await _ask(searcher, engine, QUESTION)
    assert searcher.computed == 2
    assert "u00007" in first
    assert "u00007" not in changed
    assert await _ask(searcher, engine, QUESTION) is changed
    clock.now += CACHE_SECONDS + 0.01  # an assignment may have expired meanwhile
    assert await _ask(searcher, engine, QUESTION) == changed
    assert searcher.computed == 3
    # Another engine (a full reload) is another state, even at the same version.
    other = _engine()
    assert await _ask(searcher, other, QUESTION) == other.subjects(*QUESTION, time.time())
    assert searcher.computed == 4


async def test_one_search_computes_at_a_time_and_waiters_reuse_its_answer() -> None:
    engine = _engine()
    searcher = SubjectSearcher(concurrency=1, slice_seconds=0.0)
    answers = await asyncio.gather(*(_ask(searcher, engine, QUESTION) for _ in range(4)))
    assert searcher.computed == 1  # the three waiting found the first one's answer
    assert all(answer is answers[0] for answer in answers)
    distinct = [("t", "doc", str(i), "read") for i in range(3)]
    counting = CountingEngine.build(_tables(), Snapshot(1, 1))
    assert isinstance(counting, CountingEngine)
    await asyncio.gather(*(_ask(searcher, counting, q) for q in distinct))
    assert searcher.computed == 4
    assert counting.most == 1, "two searches computed at once"


class CountingEngine(Engine):
    """An engine that counts the subject walks in progress (the most at once)."""

    computing = 0
    most = 0

    def subject_chunks(self, *args: Any, **kw: Any) -> Iterator[list[str]]:
        self.computing += 1
        self.most = max(self.most, self.computing)
        try:
            yield from super().subject_chunks(*args, **kw)
        finally:
            self.computing -= 1


async def test_a_turn_is_held_for_the_cool_down_its_cpu_earned() -> None:
    """Searches together take at most `share` of the loop: after the answer the turn is
    held for (1/share - 1) times the CPU spent, and the next search waits for it."""
    engine = _engine()
    searcher = SubjectSearcher(concurrency=1, share=0.25)
    order: list[str] = []

    async def first() -> None:
        async with searcher.turn() as meter:
            await searcher.subjects(engine, QUESTION, meter)
            order.append("answered")
            spent.append(meter.spent)
        order.append("released")

    async def second() -> None:
        await asyncio.sleep(0)  # asks after the first has its turn
        async with searcher.turn():
            order.append("second")

    spent: list[float] = []
    started = time.monotonic()
    await asyncio.gather(first(), second())
    took = time.monotonic() - started
    assert order == ["answered", "released", "second"]
    assert spent[0] > 0
    assert took >= spent[0] * 4 * 0.9, (took, spent)


class PieceCountingEngine(Engine):
    """An engine that counts the pieces of subject walks it handed out."""

    pieces = 0

    def subject_chunks(self, *args: Any, **kw: Any) -> Iterator[list[str]]:
        for piece in super().subject_chunks(*args, **kw):
            self.pieces += 1
            yield piece


async def test_a_request_of_a_few_steps_waits_at_most_one_piece() -> None:
    """A check is a few steps on the loop (bytes read, handler started, answer written);
    asyncio runs ready callbacks in order, so a search that yielded one turn per piece
    would put a piece before each step. It yields `YIELDS` turns: one piece at most."""
    engine = PieceCountingEngine.build(_tables(), Snapshot(1, 1))
    assert isinstance(engine, PieceCountingEngine)
    searcher = SubjectSearcher(slice_seconds=0.0)
    waited: list[int] = []

    async def request(steps: int) -> None:
        # Arrives while the search is under way: turns of the loop are the point here.
        while engine.pieces < 3:  # noqa: ASYNC110
            await asyncio.sleep(0)
        for _ in range(10):
            before = engine.pieces
            for _ in range(steps):
                await asyncio.sleep(0)
            waited.append(engine.pieces - before)

    await asyncio.gather(_ask(searcher, engine, QUESTION), request(3))
    assert engine.pieces >= 40  # the search ran on in between (2,500 users, pieces of 50)
    assert max(waited) <= 1, waited


async def test_even_a_cached_answer_pays_for_the_http_work_around_it() -> None:
    """A turn is charged at least REQUEST_COST (aiohttp's parse and write, which no meter
    in the handler sees), so clients looping a cached page still take a bounded share."""
    engine = _engine()
    searcher = SubjectSearcher(concurrency=1, share=0.25)
    await _ask(searcher, engine, QUESTION)  # computed; the repeats below hit the cache
    started = time.monotonic()
    for _ in range(20):
        await _ask(searcher, engine, QUESTION)
    took = time.monotonic() - started
    assert searcher.computed == 1
    assert took >= 20 * REQUEST_COST * 3, took


def test_the_share_is_configured_and_bounded() -> None:
    assert Settings.from_env({}).search_share == 0.1
    assert Settings.from_env({"PDP_SEARCH_SHARE": "0.1"}).search_share == 0.1
    for bad in ("0", "-0.5", "1.5", "nan", "lots"):
        with pytest.raises(ConfigError, match="PDP_SEARCH_SHARE"):
            Settings.from_env({"PDP_SEARCH_SHARE": bad})
